"""benchmarks/bench_9b.py's checkpoint writer (issue 19) at its small shape: what it writes is what
transformers' save_pretrained writes for the same config (the shard split, the index, each shard's
safetensors header), and it loads through `from_pretrained` (ours and transformers') with that config."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors import safe_open

from bamba import BambaForCausalLM, Tokenizer
from bamba.checkpoint import read_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
bench_9b = pytest.importorskip("bench_9b")  # (it needs transformers and huggingface_hub, as bench.py does)
SHARD = "2MB"  # the small shape's 9 MB cut into several shards


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The small shape (the demo model's, untied) written by bench_9b, and the same config saved by transformers' save_pretrained."""
    import transformers

    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    bench_9b.write_checkpoint(str(ours), "small", max_shard_size=SHARD)
    cfg = transformers.BambaConfig(**bench_9b.shape_config("small"))
    transformers.BambaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(theirs, max_shard_size=SHARD)
    return ours, theirs


def _header(path) -> bytes:
    """A safetensors file's 8-byte header length and JSON header (dtypes, shapes, offsets, order)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return n.to_bytes(8, "little") + f.read(n)


def test_shards_index_and_headers_are_the_ones_save_pretrained_writes(written):
    ours, theirs = written
    shards = sorted(f for f in os.listdir(theirs) if f.endswith(".safetensors"))
    assert len(shards) > 3
    assert sorted(f for f in os.listdir(ours) if f.endswith(".safetensors")) == shards
    index = "model.safetensors.index.json"
    assert (ours / index).read_text() == (theirs / index).read_text()  # byte for byte
    for name in shards:
        assert _header(ours / name) == _header(theirs / name), name
        assert os.path.getsize(ours / name) == os.path.getsize(theirs / name), name


def test_the_checkpoint_loads_with_its_config(written):
    """Ours and transformers' from_pretrained load it; the config is the shape's, the tensors the files'
    (random: weights ~N(0, 0.02), A = -exp(A_log) in -[1, 16], softplus(dt_bias) in [1e-3, 0.1])."""
    import transformers

    ours, _ = written
    want = bench_9b.shape_config("small")
    cfg = read_config(str(ours))
    assert {k: getattr(cfg, k) for k in want} == want
    model = BambaForCausalLM.from_pretrained(str(ours))
    assert model.config.vocab_size == want["vocab_size"]
    state = model.state_dict()
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(state)
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in state.values())
    for key, shard in index["weight_map"].items():
        with safe_open(ours / shard, "pt") as f:
            assert torch.equal(f.get_tensor(key), state[key].to(torch.bfloat16)), key
    w = state["model.layers.0.feed_forward.up_proj.weight"].float()
    assert abs(w.std().item() - 0.02) < 0.002  # 131072 samples: the std's standard error is ~0.3%
    a = -state["model.layers.0.mamba.A_log"].float().exp()
    assert a.min() >= -16.1 and a.max() <= -0.99  # (bf16 rounding of log A: 0.4%)
    dt = torch.nn.functional.softplus(state["model.layers.0.mamba.dt_bias"].float())
    assert dt.min() >= 0.99e-3 and dt.max() <= 0.101
    hf = transformers.BambaForCausalLM.from_pretrained(ours)
    assert torch.equal(hf.lm_head.weight, state["lm_head.weight"].to(hf.lm_head.weight.dtype))


def test_the_tokenizer_has_the_vocabulary_and_llama3_special_tokens(written):
    ours, _ = written
    tok = Tokenizer.from_pretrained(str(ours))
    want = bench_9b.shape_config("small")
    assert tok.vocab_size == want["vocab_size"]
    assert tok.bos_token_id == want["bos_token_id"] and tok.eos_token_id == want["eos_token_id"]
    text = "Bamba at 9B, on 24 GiB."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
