"""Shared fixtures: tiny random transformers Bamba models saved to folders (the oracle)."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

# the compiled GEMV of bamba.linear needs one (without it, its gate keeps the older paths)
HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    attn_layer_indices=[1],
    mamba_n_heads=4,
    mamba_d_state=8,
    mamba_n_groups=1,
    mamba_d_conv=4,
    mamba_chunk_size=8,
    pad_token_id=0,
)


def hf_model(seed: int = 0, **overrides):
    """A transformers BambaForCausalLM with random weights: A_log, D, the norms and every bias (dt_bias,
    and the in_proj / out_proj / conv1d / attention / MLP biases where the config has them) randomised
    too, since transformers initialises them to 0 or 1, where a dropped or misplaced one goes unseen."""
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.BambaConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.BambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "bias", "D")) or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def relative_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    """RMS of (got - want) over the RMS of want, in fp32: how far a low-precision run is from the fp32 one."""
    got, want = got.float(), want.float()
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()


@pytest.fixture
def hf_folder(tmp_path):
    """Factory: save a random transformers model, return (model, folder)."""

    def make(seed: int = 0, **overrides):
        model = hf_model(seed, **overrides)
        folder = tmp_path / f"hf-{seed}"
        model.save_pretrained(folder)
        return model, str(folder)

    return make


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads stall badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_fp32():
    """The embedded demo model in fp32 (no bf16 ties between near-equal logits) and its tokenizer."""
    from bamba import BambaForCausalLM, Tokenizer
    from bamba.demo import demo_path

    folder = demo_path()
    return BambaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), Tokenizer.from_pretrained(
        folder
    )
