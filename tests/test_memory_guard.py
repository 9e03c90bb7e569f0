"""The memory guard (bamba.memory) and the memory bounds of quantizing while loading (issue 19), CI-sized:
a faked low limit stands in for a small machine, a ~65M-parameter model for Bamba-9B."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from test_memory import quantized_load, save_model

from bamba import BambaForCausalLM, memory
from bamba import checkpoint as checkpoint_module
from bamba.info import model_info
from bamba.memory import InsufficientMemoryError, available_memory, load_needs, predicted_peak_rss

quantize_module = importlib.import_module("bamba.quantize")  # (`bamba.quantize` is also the function)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """test_memory's random ~65M-parameter Bamba (untied lm_head, the largest Linear: 32768 x 512), bf16."""
    folder = tmp_path_factory.mktemp("guard")
    save_model(folder, torch.bfloat16)
    return str(folder)


def meta_model(folder: str) -> BambaForCausalLM:
    with torch.device("meta"):
        return BambaForCausalLM(checkpoint_module.read_config(folder), init=False)


# ----- what the machine has ---------------------------------------------------------------------------------
def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    "v1_limit, v2_limit, expected, source",
    [
        (4 << 30, "max", (4 << 30) - (3 << 30) + (512 << 20), "memory/job"),  # v1 below MemAvailable
        (9223372036854771712, "max", 8_000_000 * 1024, "MemAvailable"),  # v1's "no limit", v2 "max"
        (9223372036854771712, str(5 << 30), (5 << 30) - (4 << 30) + (256 << 20), "cg/job"),  # v2 limit
        (4 << 30, str(3 << 30), 0, "cg/job"),  # usage over the limit: nothing available, not negative
    ],
)
def test_available_memory_is_the_lower_of_meminfo_and_the_cgroup_limits(
    tmp_path, v1_limit, v2_limit, expected, source
):
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    write(proc / "meminfo", "MemTotal:       24683772 kB\nMemAvailable:    8000000 kB\n")
    write(proc / "self" / "cgroup", "5:cpu:/job\n4:memory:/job\n0::/job\n")
    write(cg / "memory" / "job" / "memory.limit_in_bytes", f"{v1_limit}\n")
    write(cg / "memory" / "job" / "memory.usage_in_bytes", f"{3 << 30}\n")
    write(cg / "memory" / "job" / "memory.stat", f"cache 1\ntotal_inactive_file {512 << 20}\n")
    write(cg / "job" / "memory.max", f"{v2_limit}\n")
    write(cg / "job" / "memory.current", f"{4 << 30}\n")
    write(cg / "job" / "memory.stat", f"anon 1\ninactive_file {256 << 20}\n")
    available, where = available_memory(str(proc), str(cg))
    assert available == expected, (available, where)
    assert source in where, where


def test_available_memory_without_cgroup_files_is_meminfo(tmp_path):
    write(tmp_path / "meminfo", "MemAvailable:    1234 kB\n")
    assert available_memory(str(tmp_path), str(tmp_path / "none")) == (
        1234 * 1024,
        f"MemAvailable in {tmp_path / 'meminfo'}",
    )


# ----- the guard ----------------------------------------------------------------------------------------------
def fake_available(monkeypatch, n: int) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda: (n, "a faked limit"))


def test_the_guard_refuses_before_reading_weights_naming_both_figures_and_a_setting_that_fits(
    saved, monkeypatch
):
    model = meta_model(saved)
    plain = load_needs(model, torch.bfloat16)
    int8, int4 = (load_needs(model, torch.bfloat16, None, q) for q in ("int8", "int4"))
    assert int4.total < int8.total < plain.total
    available = (int4.total + int8.total) // 2  # int4 fits, int8 does not
    fake_available(monkeypatch, available)
    with monkeypatch.context() as m:
        m.setattr(checkpoint_module, "_read_tensors", lambda *a: pytest.fail("weights read before the check"))
        with pytest.raises(InsufficientMemoryError) as e:
            BambaForCausalLM.from_pretrained(saved)
    message = str(e.value)
    assert f"needs about {memory._size(plain.total)} of memory" in message, message
    assert f"but {memory._size(available)} is available (a faked limit)" in message, message
    assert f"quantization='int4_weight_only' needs about {memory._size(int4.total)}" in message, message
    assert "BAMBA_MEMORY_CHECK=0" in message
    assert isinstance(e.value, MemoryError)
    # what the message offers loads; so does anything when the check is turned off
    assert BambaForCausalLM.from_pretrained(saved, quantization="int4").quantization_config
    assert BambaForCausalLM.from_pretrained(saved, check_memory=False) is not None
    monkeypatch.setenv("BAMBA_MEMORY_CHECK", "0")
    assert BambaForCausalLM.from_pretrained(saved) is not None


def test_the_guard_says_when_even_int4_does_not_fit(saved, monkeypatch):
    int4 = load_needs(meta_model(saved), torch.bfloat16, None, "int4")
    fake_available(monkeypatch, int4.total // 2)
    with pytest.raises(InsufficientMemoryError, match="even quantization='int4_weight_only' needs about"):
        BambaForCausalLM.from_pretrained(saved, quantization="int8")


def test_converted_copies_are_counted_until_the_load_returns(saved):
    """fp32 from bf16 files: every float is a copy (the input embedding too), and a quantized layer's
    copy stays until the load returns, so quantizing after converting needs more than the mapped way."""
    model = meta_model(saved)
    mapped, converted = load_needs(model, torch.bfloat16), load_needs(model, torch.bfloat16, torch.float32)
    embed = model.model.embed_tokens.weight.numel()
    assert converted.resident - 2 * mapped.resident == 4 * embed  # fp32, and the embedding is held
    q_mapped = load_needs(model, torch.bfloat16, None, "int4")
    q_converted = load_needs(model, torch.bfloat16, torch.float32, "int4")
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert q_converted.loading - q_mapped.loading == 4 * linears


def test_bamba_info_prints_each_variants_predicted_peak(saved):
    info = model_info(saved)
    model = meta_model(saved)
    expected = {
        name: predicted_peak_rss(load_needs(model, torch.bfloat16, None, q))
        for name, q in (("as stored", None), ("int8", "int8"), ("int4", "int4"))
    }
    assert info["predicted_peak_rss"] == expected


# ----- measured: quantizing while loading holds one float layer at a time -----------------------------------
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("method", ["int8_weight_only", "int4_weight_only"])
def test_quantizing_at_load_holds_one_float_layer_at_a_time(saved, method):
    """Beside the quantized layers, loading holds about one float layer: the largest, the lm_head (32 MiB
    in bf16), plus the C heap's slack. Quantizing a whole weight at once held several fp32 copies of it:
    the peak was 296-417 MB where it is now 61-103 MB (int4, int8). The guard's estimate bounds it."""
    r = quantized_load(saved, method)
    layer = 32768 * 512 * 2  # the lm_head in bf16: the largest float layer
    assert r["peak_load"] - r["quantized"] < 2.5 * layer, (
        r,
        layer,
    )  # measured 1.1-1.65x (once over 2x on a busy machine); before: 8-11x
    assert r["peak_run"] <= r["needs"], r


# ----- blocked quantizers against the whole-weight references --------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_quantizers_equal_the_whole_weight_formulas_bit_for_bit(monkeypatch, dtype):
    """Blocks of a few rows (the last one short and zero-padded) give exactly the whole-weight result;
    so do the blocked dequantizers."""
    monkeypatch.setattr(quantize_module, "QUANTIZE_BLOCK", 3 * 256)  # 3 rows (int8) / 64 rows (int4) a block
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(200, 256, generator=gen) * 0.02).to(dtype)
    w[5, :40] = 0  # a flat group
    for got, want in [
        (quantize_module.quantize_int8(w), quantize_module.quantize_int8_reference(w)),
        (quantize_module.quantize_int4(w, 128), quantize_module.quantize_int4_reference(w, 128)),
        (quantize_module.quantize_int4(w, 32), quantize_module.quantize_int4_reference(w, 32)),
    ]:
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)
    # and the dequantizers that prompts use, against the plain ones (the references' own)
    q8, s8 = quantize_module.quantize_int8(w)
    packed, sz = quantize_module.quantize_int4(w, 32)
    for out in (torch.float32, torch.bfloat16):
        a, b = (
            quantize_module.dequantize_int8_blocked(q8, s8, out),
            quantize_module.dequantize_int8(q8, s8, out),
        )
        assert a.dtype == b.dtype == out and torch.equal(a, b)
        a = quantize_module.dequantize_int4_blocked(packed, sz, 32, out)
        b = quantize_module.dequantize_int4(packed, sz, 32, out)
        assert a.dtype == b.dtype == out and torch.equal(a, b)
    assert torch.get_num_threads() == threads  # (restored after the one-thread sections)
