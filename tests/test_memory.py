"""Memory bounds of issue 2, measured in child processes through peak RSS (Linux /proc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_memory.py")
pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset"
)


def child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, BENCH, "--child", *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_scan_extra_memory_at_bamba_9b_shapes_4096_tokens_under_1_gib():
    r = child("scan", "bamba", "4096")
    assert r["peak_extra_bytes"] < 2**30, r


def test_load_then_forward_peak_rss_under_1_3x_weights(tmp_path):
    import torch

    from bamba import BambaConfig, BambaForCausalLM

    cfg = BambaConfig(
        vocab_size=32768,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        attn_layer_indices=[3],
        mamba_n_heads=16,
        mamba_d_state=64,
    )
    torch.manual_seed(0)
    BambaForCausalLM(cfg).save_pretrained(tmp_path, max_shard_size="100MB")
    r = child("load", "bamba", str(tmp_path))
    assert r["weights_bytes"] > 150e6
    assert r["peak_rss_load_and_forward"] < 1.3 * r["weights_bytes"], r
