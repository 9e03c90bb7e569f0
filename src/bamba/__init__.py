"""bamba: a standalone, fast, pure-PyTorch implementation of IBM's Bamba hybrid Mamba-2 / attention LM."""

from .cache import HybridMambaAttentionDynamicCache
from .config import BambaConfig, preset
from .model import BambaForCausalLM, BambaModel

__all__ = ["BambaConfig", "BambaForCausalLM", "BambaModel", "HybridMambaAttentionDynamicCache", "preset"]
__version__ = "0.1.0"
