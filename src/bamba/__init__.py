"""bamba: a standalone, fast, pure-PyTorch implementation of IBM's Bamba hybrid Mamba-2 / attention LM."""

from .cache import HybridMambaAttentionDynamicCache
from .config import BambaConfig, preset
from .data import DataCollatorWithFlattening
from .model import BambaForCausalLM, BambaModel
from .pipeline import pipeline
from .quantize import quantize  # `bamba.quantize(model, "int8_weight_only")`; the module: bamba.quantize
from .streamers import TextIteratorStreamer, TextStreamer
from .tokenizer import Tokenizer

__all__ = [
    "BambaConfig",
    "BambaForCausalLM",
    "BambaModel",
    "DataCollatorWithFlattening",
    "HybridMambaAttentionDynamicCache",
    "TextIteratorStreamer",
    "TextStreamer",
    "Tokenizer",
    "pipeline",
    "quantize",
    "preset",
]
__version__ = "0.1.0"
