"""The C++ decode kernels (bamba.kernels) against their PyTorch references, on every path this CPU runs,
and the modules' dispatch to them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from bamba import BambaConfig, BambaForCausalLM, kernels, linear, quantize
from bamba.linear import Linear
from bamba.quantize import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    dequantize_int4,
    linear_int4_q8_reference,
    linear_int4_reference,
    linear_int8_reference,
    quantize_int4,
)

ISAS = kernels.supported_isas()  # () without the kernels: every test below is skipped then
needs_kernels = pytest.mark.skipif(not ISAS, reason=f"the kernels are not built here: {kernels.STATUS}")
each_isa = pytest.mark.parametrize("isa", ISAS or [0], ids=lambda i: kernels.ISA_NAMES.get(i, "none"))
# (rows, out, in): odd sizes everywhere (tails of the weight tiles, of the vectors, of the row chunks)
# (AMX, from 3 rows: tiles of 16 weight rows and 32 or 64 inputs, a vector kernel for the rows left over)
DENSE_SHAPES = [
    (1, 1, 1), (1, 7, 33), (3, 65, 100), (3, 33, 64), (5, 130, 1024), (8, 4, 17), (9, 13, 48), (16, 9, 250),
    (16, 70, 192),
]  # fmt: skip


def _weight(dtype: torch.dtype, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if dtype == torch.int8:
        return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n).add(0.01).bfloat16()
    return torch.randn(n, k).to(dtype), None


@needs_kernels
@each_isa
@pytest.mark.parametrize(
    "dtype, x_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
     (torch.int8, torch.float32)],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_dense_matches_its_reference(isa, dtype, x_dtype, shape, bias):
    """fp32 products and sums (bf16 rows by bf16 weights: AVX512-BF16's exact pair products where there),
    in another order than F.linear's: the difference is fp32 rounding. Measured at most 3e-7 of the sum
    of |products| over these shapes; the bound is 1e-6 of it (about 3x)."""
    torch.manual_seed(0)
    m, n, k = shape
    x = torch.randn(m, k).to(x_dtype)
    w, scales = _weight(dtype, n, k)
    b = torch.randn(n) if bias else None
    out = kernels.dense(x, w, scales, b, isa=isa)
    ref = kernels.dense_reference(x, w, scales, b, isa=isa)
    magnitude = kernels.dense_reference(x.abs(), w.abs(), scales, isa=1)  # sum of |products| per output
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert ((out - ref).abs() <= 1e-6 * magnitude + 1e-6).all(), (out - ref).abs().max()


@needs_kernels
@each_isa
@pytest.mark.parametrize(
    "rows, out, inp, group",
    [(1, 64, 128, 128), (1, 100, 256, 32), (3, 130, 512, 64), (8, 64, 1024, 256), (2, 256, 96, 32),
     (5, 1000, 1024, 128), (16, 70, 160, 32)],
)  # fmt: skip
@pytest.mark.parametrize("bias", [False, True])
def test_int4_matches_its_reference(isa, rows, out, inp, group, bias):
    """Integer sums are exact; what differs from the reference is the fp32 rounding of the scaled sums
    (measured at most 3e-7 of the largest output; bound 2e-6)."""
    torch.manual_seed(1)
    x, w = torch.randn(rows, inp), torch.randn(out, inp)
    x[0, :32] = 0  # an all-zero block (scale 0)
    x[-1, 40] = 50.0  # an outlier: its block's other values round coarsely
    packed, sz = quantize_int4(w, group)
    b = torch.randn(out) if bias else None
    got = kernels.int4(x, packed, sz, group, b, out, isa=isa)
    ref = linear_int4_q8_reference(x, packed, sz, group, b, out)
    assert got.shape == (rows, out)
    torch.testing.assert_close(got, ref, atol=2e-6 * ref.abs().max().item(), rtol=0)


@needs_kernels
def test_int4_refuses_shapes_it_cannot_take():
    packed, sz = quantize_int4(torch.randn(64, 128), 128)
    with pytest.raises(RuntimeError, match="bamba_q4 returned -2 for weight"):
        kernels.int4(torch.randn(1, 128), packed, sz, 48)  # group not a multiple of 32
    with pytest.raises(RuntimeError, match="isa=7 is not one this CPU runs"):
        kernels.int4(torch.randn(1, 128), packed, sz, 128, isa=7)


@needs_kernels
def test_split_rows_round_by_little():
    """The two int8 parts of a row (the AVX-512 paths of int8 weights): at most 1/508 of the row's scale
    (max |x| / 127) from the row, zero rows exact; and the kernel computes with exactly those rows."""
    torch.manual_seed(7)
    x = torch.randn(5, 300)
    x[1] = 0
    x[2, 3] = 1e3  # a row with an outlier
    rounded = kernels.split_rows(x)
    bound = x.abs().amax(-1, keepdim=True) / 127 / 508
    assert ((rounded - x).abs() <= bound * 1.001 + 1e-30).all() and not rounded[1].any()
    if max(ISAS) >= 2:  # the dot products with a unit weight read the rounded rows back
        eye = torch.eye(300, dtype=torch.int8)
        out = kernels.dense(x, eye, torch.ones(300).bfloat16(), isa=2)
        torch.testing.assert_close(out, rounded, atol=1e-6 * x.abs().max().item(), rtol=0)


def test_quantize_blocks_rounds_half_to_even_and_keeps_zero_blocks():
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1], x[0, 2], x[0, 3] = 127.0, 0.5, 1.5, -2.5  # scale 1: halves go to the even neighbour
    q, s = kernels.quantize_blocks(x)
    assert s.flatten().tolist() == [1.0, 0.0]
    assert q[0, 0, :4].tolist() == [127.0, 0.0, 2.0, -2.0] and not q[0, 1].any()


def test_int8_activations_cost_little_next_to_the_int4_weights():
    """What the int4 kernel's int8 activations add to the error against the unquantized product, next to
    what the int4 weights cost (with bf16 activations, as PyTorch's int4 kernel rounds them): measured
    0.2% more on Gaussian data with an outlier channel (rms error 0.1045 vs 0.1043 of the output's rms).
    Bound: 2%."""
    torch.manual_seed(2)
    w, x = torch.randn(512, 1024), torch.randn(16, 1024)
    x[:, 7] *= 20  # an outlier channel, as LLM activations have
    packed, sz = quantize_int4(w, 128)
    exact = x @ w.t()

    def rms(err: torch.Tensor) -> float:
        return (err.square().mean() / exact.square().mean()).sqrt().item()

    weights_only = rms(linear_int4_reference(x.bfloat16().float(), packed, sz, 128) - exact)
    with_int8_rows = rms(linear_int4_q8_reference(x, packed, sz, 128) - exact)
    assert 0.05 < weights_only < 0.2  # the int4 weights' own error: ~10% (the test's premise)
    assert with_int8_rows < 1.02 * weights_only, (with_int8_rows, weights_only)


@needs_kernels
def test_read_bandwidth_reads():
    assert kernels.read_bandwidth(nbytes=1 << 22, reps=1) > 0


# ----- dispatch: which layers take the kernels -------------------------------------------------------------
@pytest.fixture
def counted(monkeypatch):
    """Count the kernels' calls; every weight size takes them (the tiny model's included)."""
    calls = []
    dense, int4 = kernels.dense, kernels.int4
    monkeypatch.setattr(kernels, "dense", lambda *a, **k: calls.append("dense") or dense(*a, **k))
    monkeypatch.setattr(kernels, "int4", lambda *a, **k: calls.append("int4") or int4(*a, **k))
    monkeypatch.setattr(linear, "KERNEL_MIN_WEIGHTS", 1)
    return calls


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_takes_the_kernels_for_few_rows_without_grad(counted, dtype):
    torch.manual_seed(3)
    lin = Linear(48, 70).to(dtype)
    for x, grad, taken in [
        (torch.randn(1, 48), False, True),
        (torch.randn(2, 3, 48), False, True),
        (torch.randn(kernels.MAX_ROWS, 48), False, True),
        (torch.randn(kernels.MAX_ROWS + 1, 48), False, False),  # a prompt
        (torch.randn(1, 48), True, False),  # autograd
    ]:
        counted.clear()
        x = x.to(dtype)
        with torch.set_grad_enabled(grad):
            out = lin(x)
        ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        assert out.dtype == dtype and len(counted) == taken, (x.shape, grad)
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output's rounding
        torch.testing.assert_close(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)
    counted.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # autocast must see F.linear
        assert lin(torch.randn(1, 48).to(dtype)).dtype == torch.bfloat16 and not counted


@needs_kernels
def test_small_weights_keep_f_linear(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "dense", lambda *a, **k: calls.append(1) or torch.zeros(1, 70))
    lin = Linear(48, 70)
    assert lin.weight.numel() < linear.KERNEL_MIN_WEIGHTS
    with torch.no_grad():
        lin(torch.randn(1, 48))
    assert not calls


@needs_kernels
def test_quantized_modules_take_the_kernels(counted):
    torch.manual_seed(4)
    dense = torch.nn.Linear(256, 100)
    q8, q4 = Int8WeightOnlyLinear.from_linear(dense), Int4WeightOnlyLinear.from_linear(dense, 64)
    x = torch.randn(2, 256)
    out8 = q8(x)
    assert counted == ["dense"]
    ref8 = kernels.dense_reference(x, q8.weight, q8.scales, q8.bias)  # the rows as the path rounds them
    torch.testing.assert_close(out8, ref8, atol=1e-5 * ref8.abs().max().item(), rtol=0)
    exact = linear_int8_reference(x, q8.weight, q8.scales, q8.bias)  # fp32 rows: within 1e-4 (split rows)
    torch.testing.assert_close(out8, exact, atol=1e-4 * exact.abs().max().item(), rtol=0)
    out4 = q4(x)
    assert counted == ["dense", "int4"] and out4.shape == (2, 100)
    ref4 = linear_int4_q8_reference(x, q4.weight, q4.scales_and_zeros, 64, q4.bias, 100)
    torch.testing.assert_close(out4, ref4, atol=2e-6 * ref4.abs().max().item(), rtol=0)
    counted.clear()
    q8(torch.randn(kernels.MAX_ROWS + 1, 256))  # an int8 prompt: PyTorch's paths
    assert not counted
    x = torch.randn(300, 256)  # an int4 prompt: the kernel too
    out4 = q4(x)
    assert counted == ["int4"]
    ref4 = linear_int4_q8_reference(x, q4.weight, q4.scales_and_zeros, 64, q4.bias, 100)
    torch.testing.assert_close(out4, ref4, atol=2e-6 * ref4.abs().max().item(), rtol=0)


@needs_kernels
@pytest.mark.parametrize("shape", [(64, 128, 128), (100, 256, 32), (1000, 1024, 64)])
def test_int4_dequantize_is_dequantize_int4(shape):
    """The same values, bit for bit (the same fp32 operations), the padding rows left out."""
    torch.manual_seed(8)
    out, inp, group = shape
    packed, sz = quantize_int4(torch.randn(out, inp), group)
    assert torch.equal(
        kernels.int4_dequantize(packed, sz, group, out), dequantize_int4(packed, sz, group)[:out]
    )


@needs_kernels
@pytest.mark.parametrize("variant", ["fp32", "bf16", "int8", "int4"])
def test_a_model_decodes_the_same_through_the_kernels(monkeypatch, counted, variant):
    """A tiny model whose every Linear takes the kernels when decoding: the same greedy tokens as without
    them, and logits within each path's rounding (fp32 and int8: fp32 sums; bf16: the activations'
    bf16 rounding between layers; int4: the int8 rounding of the activations)."""
    torch.manual_seed(5)
    model = BambaForCausalLM(BambaConfig(**TINY)).eval()
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    elif variant != "fp32":
        quantize(model, f"{variant}_weight_only", group_size=32 if variant == "int4" else None)
    ids = torch.tensor([[5, 9, 2, 7]])
    with monkeypatch.context() as m:
        m.setattr(kernels, "available", lambda: False)
        ref = model.generate(ids, max_new_tokens=8, do_sample=False)
        with torch.no_grad():
            ref_logits = model(ids[:, :1]).logits.float()
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert counted
    with torch.no_grad():
        logits = model(ids[:, :1]).logits.float()
    tol = {"fp32": 1e-5, "int8": 1e-2, "bf16": 2e-2, "int4": 2e-2}[variant]
    torch.testing.assert_close(logits, ref_logits, atol=tol * ref_logits.abs().max().item(), rtol=0)
    assert torch.equal(out, ref)


# ----- building -------------------------------------------------------------------------------------------
def test_no_compiler_means_no_kernels_and_the_old_paths(monkeypatch):
    """A failed build (no compiler, no ninja) or BAMBA_KERNELS=0: no kernels, nothing raised, and the
    layers compute with PyTorch's paths."""
    from torch.utils import cpp_extension

    build = kernels._library.__wrapped__  # unmemoized
    monkeypatch.setattr(kernels, "STATUS", [])

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    assert build() is None
    if kernels.X86:
        assert kernels.STATUS == ["not built (RuntimeError: Error building extension: c++: not found)"]
    monkeypatch.setenv("BAMBA_KERNELS", "0")
    assert build() is None and kernels.STATUS[-1] == "off (BAMBA_KERNELS=0)"
    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(linear, "KERNEL_MIN_WEIGHTS", 1)
    lin, x = Linear(48, 70), torch.randn(1, 48)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)


def test_int4_reference_is_the_weight_only_reference_on_rows_that_round_exactly():
    """The two references agree where the int8 rounding of the rows is exact (integers up to 127 with
    127 in every block): the kernel's reference differs from the weight-only one by that rounding only."""
    torch.manual_seed(6)
    x = torch.randint(-127, 128, (3, 128)).float()
    x[:, ::32] = 127.0
    packed, sz = quantize_int4(torch.randn(64, 128), 32)
    torch.testing.assert_close(
        linear_int4_q8_reference(x, packed, sz, 32), F.linear(x, dequantize_int4(packed, sz, 32)), rtol=1e-6,
        atol=1e-3,
    )  # fmt: skip
