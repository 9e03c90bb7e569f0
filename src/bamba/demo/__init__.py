"""The embedded demo model: a small hybrid Bamba trained on Tiny Shakespeare, shipped as a HF folder.

The recipe that produced it is `recipes/train_demo.sh` (corpus path as an argument).
"""

from __future__ import annotations

import os

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))


def demo_path() -> str:
    """The folder of the embedded demo model (config.json, model.safetensors, tokenizer.json, ...)."""
    if not os.path.isfile(os.path.join(DEMO_DIR, "model.safetensors")):
        raise FileNotFoundError(
            f"{DEMO_DIR}: the embedded demo model is missing (model.safetensors); reinstall bamba"
        )
    return DEMO_DIR
