"""bamba: a standalone, fast, pure-PyTorch implementation of IBM's Bamba hybrid Mamba-2 / attention LM."""

from .config import BambaConfig, preset

__all__ = ["BambaConfig", "preset"]
__version__ = "0.1.0"
