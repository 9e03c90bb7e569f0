"""Quantization: packed kernels against their references, accuracy bounds, save/load."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from conftest import HAS_CXX, TINY, relative_rms

from bamba import BambaConfig, BambaForCausalLM
from bamba.evaluate import perplexity
from bamba.quantize import (
    INT4_KERNEL_MAX_ROWS,
    INT8_KERNEL_MAX_ROWS,
    Int4WeightOnlyLinear,
    Int8DynamicActivationInt8WeightLinear,
    Int8WeightOnlyLinear,
    dequantize_int4,
    dequantize_int8,
    int_mm_takes_uint8,
    linear_int4,
    linear_int4_reference,
    linear_int8,
    linear_int8_dynamic,
    linear_int8_dynamic_reference,
    linear_int8_reference,
    pack_int4,
    quantize,
    quantize_int4,
    quantize_int8,
    quantize_rows_int8,
    shifted_row_sums,
    unpack_int4,
)

DQ = "int8_dynamic_activation_int8_weight"

# int4-friendly shapes: out features multiples of 64, in features multiples of 128 (in_proj: padded to 576 rows)
CFG = {
    **TINY,
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "mamba_d_head": 64,
    "mamba_d_state": 16,
    "mamba_chunk_size": 16,
}


def close_to_reference(out: torch.Tensor, ref: torch.Tensor, kernel: bool) -> None:
    """The packed int8 / int4 kernels round the activations and their output to bf16: within one bf16 step
    (2**-7) of the output's largest value (measured: 0.14-0.26% of it for int8, 0.29-0.35% for int4).
    Past the kernels' rows, the dequantized weight in an fp32 GEMM: the reference's own sum (measured:
    exact), within fp32 rounding."""
    bound = (2**-7 if kernel else 1e-5) * ref.abs().max().item()
    torch.testing.assert_close(out, ref, atol=bound, rtol=0)


def tiny(seed: int = 0) -> BambaForCausalLM:
    torch.manual_seed(seed)
    return BambaForCausalLM(BambaConfig(**CFG)).eval()


# kernel path (few rows) and the dequantize-then-GEMM path (more than *_KERNEL_MAX_ROWS rows)
@pytest.mark.parametrize("rows", [1, 5, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1])
def test_int8_linear_matches_reference(rows):
    torch.manual_seed(0)
    w, x, bias = torch.randn(192, 256) * 0.05, torch.randn(rows, 256), torch.randn(192)
    q, s = quantize_int8(w)
    ref = linear_int8_reference(x, q, s, bias)
    close_to_reference(linear_int8(x, q, s, bias), ref, kernel=rows <= INT8_KERNEL_MAX_ROWS)
    # the quantization error itself: |w - q s| <= s / 2 per element (plus bf16 rounding of s)
    assert (dequantize_int8(q, s) - w).abs().le(s.float()[:, None] * 0.51 + 1e-6).all()


@pytest.mark.parametrize("fast", [False, True])
def test_int8_linear_one_row_takes_the_compiled_gemv_where_it_is_fast(monkeypatch, fast):
    """One row (no gradient) by a large enough int8 weight, where the compiled GEMV measured faster: it
    computes in fp32 (the reference's result within fp32 rounding, which the packed kernel's bf16 misses);
    more rows, or where it is not faster, keep the packed kernel."""
    from bamba import linear

    if fast and not HAS_CXX:
        pytest.skip("no C++ compiler: the compiled GEMV cannot be built here")
    quantize_mod = sys.modules["bamba.quantize"]  # (bamba.quantize is also the function)
    monkeypatch.setattr(linear, "compiled_gemv_is_fast", lambda dtype: fast)
    monkeypatch.setattr(linear, "COMPILED_GEMV_MIN_WEIGHTS", 1)
    calls = []
    real = quantize_mod.compiled_gemv
    monkeypatch.setattr(quantize_mod, "compiled_gemv", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    w, bias = torch.randn(192, 256) * 0.05, torch.randn(192)
    q, s = quantize_int8(w)
    for x in (torch.randn(1, 1, 256), torch.randn(2, 256)):
        calls.clear()
        ref = linear_int8_reference(x, q, s, bias)
        out = linear_int8(x, q, s, bias)
        one_row = x.numel() == 256
        assert len(calls) == (fast and one_row)
        if fast and one_row:
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        else:
            close_to_reference(out, ref, kernel=True)


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_int8_dynamic_linear_matches_reference(rows):
    """`_int_mm` sums int8 products exactly in int32; the reference sums the same rounded values in fp32."""
    torch.manual_seed(2)
    w, x, bias = torch.randn(96, 200) * 0.05, torch.randn(2, rows, 200), torch.randn(96)
    q, s = quantize_int8(w)
    ref = linear_int8_dynamic_reference(x, q, s, bias)
    out = linear_int8_dynamic(x, q, s, bias)
    assert out.shape == (2, rows, 96) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
    # against the unquantized product: the rounding of activations and weights, a few % at most
    exact = x @ w.t() + bias
    assert (out - exact).abs().max() < 0.03 * exact.abs().max()
    # bf16 inputs come back in bf16, computed from the same rounded values
    torch.testing.assert_close(
        linear_int8_dynamic(x.bfloat16(), q, s), linear_int8_dynamic_reference(x.bfloat16(), q, s)
    )


@pytest.mark.parametrize("rows", [1, 8])
def test_int8_dynamic_uint8_rows_give_the_same_sums(rows):
    """uint8 rows (xq + 128) with 128 * row sums taken back: bit-identical to the int8 x int8 path."""
    if not int_mm_takes_uint8():
        pytest.skip("this PyTorch's CPU _int_mm takes no uint8 input (or not x86): the int8 path is used")
    torch.manual_seed(3)
    w, x = torch.randn(80, 160) * 0.05, torch.randn(rows, 160)
    x[0, 0] = x[0].abs().max() * 1.5  # a row whose largest value maps to q = 127 (uint8 255)
    x[-1, 1] = -x[-1].abs().max() * 1.5  # and one to q = -127 (uint8 1)
    q, s = quantize_int8(w)
    sums = shifted_row_sums(q)
    assert sums is not None and torch.equal(sums, 128 * q.int().sum(1))
    tall = torch.randint(-127, 128, (40000, 128), dtype=torch.int8)  # summed in two blocks of rows
    assert torch.equal(shifted_row_sums(tall), 128 * tall.int().sum(1))
    torch.testing.assert_close(
        linear_int8_dynamic(x, q, s, shifted_sums=sums), linear_int8_dynamic(x, q, s), atol=0, rtol=0
    )


def test_int8_dynamic_module_refreshes_its_sums_on_load():
    """The module's cached row sums follow the weight through load_state_dict (even an in-place copy)."""
    torch.manual_seed(4)
    a, b = torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(64, 32, bias=False)
    mod = Int8DynamicActivationInt8WeightLinear.from_linear(a)
    x = torch.randn(1, 64)
    torch.testing.assert_close(mod(x), linear_int8_dynamic_reference(x, mod.weight, mod.scales))
    ptr = mod.weight.data_ptr()
    mod.load_state_dict(Int8DynamicActivationInt8WeightLinear.from_linear(b).state_dict())  # copies in place
    assert mod.weight.data_ptr() == ptr
    qb, sb = quantize_int8(b.weight.detach())
    torch.testing.assert_close(mod(x), linear_int8_dynamic_reference(x, qb, sb))


def test_quantize_rows_int8():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-1e-3, 3e-3, 2e-3]])
    q, scale = quantize_rows_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 1)
    assert torch.equal(q[0], torch.zeros(3, dtype=torch.int8))  # an all-zero row stays zero
    assert q.abs().amax(-1)[1:].eq(127).all()  # each row's largest value maps to +-127
    assert (q.float() * scale - x).abs().le(scale * 0.5 + 1e-9).all()
    shifted, scale2 = quantize_rows_int8(x, shift=True)
    assert (
        shifted.dtype == torch.uint8
        and torch.equal(shifted.int() - 128, q.int())
        and torch.equal(scale2, scale)
    )


# rows per sequence; 2 sequences (a 3-D input): 2, 10, the kernel's limit, then 2 rows over it
@pytest.mark.parametrize("rows", [1, 5, INT4_KERNEL_MAX_ROWS // 2, INT4_KERNEL_MAX_ROWS // 2 + 1])
def test_int4_linear_matches_reference(rows):
    torch.manual_seed(1)
    w, x = torch.randn(100, 256) * 0.05, torch.randn(2, rows, 256)
    packed, sz = quantize_int4(w, 128)
    assert packed.shape == (128, 128)  # 100 rows padded to 128
    ref = linear_int4_reference(x, packed, sz, 128, out=100)
    close_to_reference(linear_int4(x, packed, sz, 128, out=100), ref, kernel=2 * rows <= INT4_KERNEL_MAX_ROWS)
    scale = sz[..., 0].float().t().repeat_interleave(128, dim=1)  # (out, in)
    assert (dequantize_int4(packed, sz, 128)[:100] - w).abs().le(scale[:100] * 0.51 + 2e-3).all()


def test_int4_layout_roundtrip_and_is_the_cpu_kernels():
    q = torch.randint(0, 16, (128, 256), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (128, 128) and torch.equal(unpack_int4(packed), q)
    kernel = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    if kernel.shape == packed.shape and not torch.equal(kernel, packed):
        pytest.skip("this CPU's int4 kernel uses another layout (int4 layers take the reference path)")
    assert torch.equal(kernel, packed)


@pytest.mark.parametrize("method, bound", [("int8_weight_only", 0.03), ("int4_weight_only", 0.4), (DQ, 0.05)])
def test_quantized_tiny_model_logits_close_to_fp32(method, bound):
    """Relative RMS error of the logits (random weights are the hard case for 4 bits: measured ~0.018
    for int8, ~0.31 for int4, ~0.03 for int8 with dynamic activations), in the multi-token and in the
    decode (kernel) path."""
    model, ids = tiny(), torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        q = quantize(tiny(), method)
        out = q(ids).logits
        rel = relative_rms(out, ref)
        assert rel < bound, rel
        cache_out = q(ids[:, :-1], use_cache=True)
        last = q(ids[:, -1:], past_key_values=cache_out.past_key_values, use_cache=True).logits[:, -1]
        rel_last = relative_rms(last, ref[:, -1])
        assert rel_last < bound, rel_last
    kinds = {type(m) for m in q.modules()}
    expected = {
        "int8_weight_only": Int8WeightOnlyLinear,
        "int4_weight_only": Int4WeightOnlyLinear,
        DQ: Int8DynamicActivationInt8WeightLinear,
    }
    assert expected[method] in kinds
    assert not any(
        isinstance(m, torch.nn.Linear) and n.endswith(("in_proj", "out_proj", "down_proj"))
        for n, m in q.named_modules()
    )
    for name, p in q.named_parameters():  # never quantized
        if name.endswith(("A_log", "D", "dt_bias", "conv1d.weight", "norm.weight", "layernorm.weight")):
            assert p.is_floating_point() and p.dtype == torch.float32, name


@pytest.mark.parametrize("method", ["int8_weight_only", "int4_weight_only", DQ])
def test_quantized_save_load_generate(tmp_path, method):
    q = quantize(tiny(), method)
    q.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "quantization_config.json").read_text())
    assert meta["format"] == method and meta["quant_method"] == "bamba" and meta["modules"]
    loaded = BambaForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.quantization_config["modules"] == meta["modules"]
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, q(ids).logits, atol=0, rtol=0)
    out = loaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)
    fp32_bytes = os.path.getsize(tmp_path / "model.safetensors")
    assert fp32_bytes < sum(p.numel() * 4 for p in tiny().parameters())


def test_from_pretrained_quantization_argument(tmp_path):
    tiny().save_pretrained(tmp_path)
    q = BambaForCausalLM.from_pretrained(str(tmp_path), quantization="int8_weight_only")
    assert isinstance(q.model.layers[0].feed_forward.up_proj, Int8WeightOnlyLinear)
    with pytest.raises(ValueError, match="int4_weight_only"):
        quantize(q, "int4_weight_only")
    with pytest.raises(ValueError, match="expected one of .* or \\('int8', 'int4', 'int8dq'\\)"):
        quantize(tiny(), "int3")
    short = quantize(tiny(), "int8dq")  # the command line's short names work here too
    assert short.quantization_config["format"] == "int8_dynamic_activation_int8_weight"


def test_perplexity_matches_the_loss():
    model = tiny()
    ids = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss
    ppl = perplexity(model, ids, chunk_size=16)  # through the cache in pieces
    assert abs(ppl - loss.exp().item()) < 1e-3 * ppl


def test_top_level_bamba_quantize_is_the_function():
    import bamba
    from bamba.quantize import Int4WeightOnlyLinear

    model = bamba.quantize(tiny(), "int4_weight_only", group_size=128)
    assert isinstance(model.model.layers[0].mamba.in_proj, Int4WeightOnlyLinear)
    assert model.model.layers[0].mamba.A_log.dtype == torch.float32  # never quantized


@pytest.mark.parametrize("method", ["int8_weight_only", "int4_weight_only", DQ])
def test_bf16_quantized_model_generates_a_batch_with_an_untied_lm_head(method):
    """logits_to_keep slices the hidden states: the packed kernels must get dense rows (int4 raised
    'expect A to be contiguous' on a bf16 batch)."""
    q = quantize(tiny().to(torch.bfloat16), method)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = q(ids).logits[:, -1]
        last = q(ids, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(last, full, atol=0, rtol=0)
    assert q.generate(ids, max_new_tokens=3).shape == (2, 12)


@pytest.mark.parametrize("method", ["int8", "int4", "int8dq"])
def test_quantizing_again_the_same_way_is_a_no_op_and_another_way_is_an_error(method):
    model = quantize(tiny(), method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert quantize(model, method) is model  # int8 configs store group_size None: this used to raise
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    other = "int4" if method != "int4" else "int8"
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, other)
    if method == "int4":
        with pytest.raises(ValueError, match="already quantized"):
            quantize(model, method, group_size=32)


def test_a_quantized_folder_reloads_with_its_quantization_given_again(tmp_path):
    """An int4 folder of group size 32, loaded with quantization="int4_weight_only" again, used to be
    re-quantized with group size 128 (an error); group_size reaches the quantizer from from_pretrained."""
    model = tiny()
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    BambaForCausalLM.from_pretrained(
        str(_saved(model, tmp_path / "f")), quantization="int4_weight_only", group_size=32
    ).save_pretrained(tmp_path / "q")
    plain = BambaForCausalLM.from_pretrained(str(tmp_path / "q"))
    assert plain.quantization_config["group_size"] == 32
    for extra in (dict(), dict(group_size=32)):
        again = BambaForCausalLM.from_pretrained(str(tmp_path / "q"), quantization="int4", **extra)
        with torch.inference_mode():
            assert torch.equal(again(ids).logits, plain(ids).logits)
    with pytest.raises(ValueError, match=r"already quantized as int4_weight_only \(group_size=32\); cannot "):
        BambaForCausalLM.from_pretrained(str(tmp_path / "q"), quantization="int4", group_size=64)


def _saved(model: BambaForCausalLM, folder) -> str:
    model.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("group_size", [0, -128, 1.5, True, 128.0, 512, 96])
def test_int4_group_size_must_be_one_the_kernel_takes(group_size):
    """0 raised ZeroDivisionError; 512 quantized, then generation failed inside the CPU kernel."""
    with pytest.raises(ValueError, match=rf"group_size={group_size!r}: expected one of \(32, 64, 128, 256\)"):
        quantize(tiny(), "int4", group_size=group_size)


@pytest.mark.parametrize("method", ["int8", "int8_dynamic_activation_int8_weight"])
def test_group_size_is_refused_for_int8(method):
    """A group size means int4; with int8 it used to be ignored silently (from_pretrained refused it)."""
    model = tiny()
    with pytest.raises(
        TypeError, match=rf"quantize: group_size=64 applies to .*int4.* found quantization='{method}'"
    ):
        quantize(model, method, group_size=64)
    assert getattr(model, "quantization_config", None) is None


@pytest.mark.parametrize("in_features", [8, 24, 40, 72, 200])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_int8_kernel_is_skipped_for_widths_it_cannot_read(in_features, rows):
    """The int8 kernel reads inputs in blocks of 16: other widths gave garbage or crashed the process."""
    torch.manual_seed(in_features)
    q, s = quantize_int8(torch.randn(33, in_features))
    x = torch.randn(rows, in_features)
    torch.testing.assert_close(linear_int8(x, q, s), linear_int8_reference(x, q, s), atol=1e-4, rtol=1e-4)


def test_a_packed_model_is_refused_instead_of_left_unquantized():
    from bamba.linear import PackedLinear

    model = tiny().to(torch.bfloat16)
    model.model.layers[0].feed_forward.down_proj = PackedLinear(model.model.layers[0].feed_forward.down_proj)
    with pytest.raises(ValueError, match=r"hold packed weights \(pack=True\); load the model without pack"):
        quantize(model, "int8")
    assert getattr(model, "quantization_config", None) is None
