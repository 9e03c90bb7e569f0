"""The Linear paths of bamba.linear against F.linear, and packed models against unpacked ones."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CXX, TINY, relative_rms

from bamba import BambaConfig, BambaForCausalLM, linear
from bamba.linear import (
    Linear,
    PackedLinear,
    linear_upcast,
    onednn_available,
    onednn_linear,
    pack_for_cpu,
    packing_pays,
)

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
BF16_OK = onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
DTYPES = [
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not BF16_OK, reason="no bf16")),
]


def test_linear_upcast_matches_fp32_linear():
    torch.manual_seed(3)
    x, w, bias = (
        torch.randn(2, 7, 48, dtype=torch.bfloat16),
        torch.randn(100, 48, dtype=torch.bfloat16),
        torch.randn(100, dtype=torch.bfloat16),
    )
    ref = F.linear(x.float(), w.float(), bias.float()).bfloat16()
    # within one bf16 step (2**-7 relative) of the fp32 product rounded to bf16 (measured: half a step)
    out = linear_upcast(x, w, bias, tile=32)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=2**-7)


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 64), (4, 64), (2, 9, 64), (300, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_matches_f_linear(shape, bias):
    torch.manual_seed(0)
    x, w = torch.randn(*shape), torch.randn(70, 64)
    b = torch.randn(70) if bias else None
    torch.testing.assert_close(onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    x_strided = torch.randn(*shape[:-1], 128)[..., ::2]  # a non-contiguous input
    torch.testing.assert_close(
        onednn_linear(x_strided, w, b), F.linear(x_strided, w, b), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("rows", [1, 8, 300])
def test_linear_paths_match_and_train(rows):
    """Whatever path a row count takes, the output is F.linear's; with gradients it is F.linear itself."""
    torch.manual_seed(1)
    lin = Linear(64, 70)
    x = torch.randn(rows, 64)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    xg = x.clone().requires_grad_()
    lin(xg).square().sum().backward()
    ref_x = x.clone().requires_grad_()
    F.linear(ref_x, lin.weight, lin.bias).square().sum().backward()
    torch.testing.assert_close(xg.grad, ref_x.grad, atol=1e-4, rtol=1e-4)


@needs_onednn
@pytest.mark.parametrize("onednn_fast", [False, True])
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_dense_linear_takes_onednn_by_the_rule(monkeypatch, onednn_fast, rows):
    """fp32 inference goes through oneDNN at 4..256 rows on x86, and at every row count where its GEMM
    measured faster than MKL's; training goes through it only there. Either way the outputs and the
    gradients are F.linear's."""
    monkeypatch.setattr(linear, "onednn_fp32_is_fast", lambda: onednn_fast)
    trains = linear.X86 and linear.onednn_trains()  # (probed before counting)
    calls = []
    real = linear.onednn_linear
    monkeypatch.setattr(linear, "onednn_linear", lambda *a: calls.append(1) or real(*a))
    expected = linear.X86 and (onednn_fast and rows > 256 or 4 <= rows <= 256)
    assert linear.use_onednn_fp32(rows, 64 * 70) == expected
    assert linear.use_onednn_fp32(rows, 2**19) == (linear.X86 and (onednn_fast or 4 <= rows <= 256))
    torch.manual_seed(4)
    lin = Linear(64, 70)
    x = torch.randn(2, rows, 64)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    assert len(calls) == expected
    calls.clear()
    xg = x.clone().requires_grad_()
    out = lin(xg)
    g = torch.randn_like(out)
    out.backward(g)
    assert len(calls) == (3 if trains else 0)  # forward, grad_x, grad_w
    ref_x, ref_w, ref_b = (t.detach().clone().requires_grad_() for t in (x, lin.weight, lin.bias))
    ref = F.linear(ref_x, ref_w, ref_b)
    ref.backward(g)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in ((xg.grad, ref_x.grad), (lin.weight.grad, ref_w.grad), (lin.bias.grad, ref_b.grad)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_onednn
def test_dense_linear_takes_empty_inputs(monkeypatch):
    """No rows: F.linear's result and gradients (oneDNN refuses a zero-size product in the backward)."""
    monkeypatch.setattr(linear, "onednn_fp32_is_fast", lambda: True)
    w = torch.randn(70, 64, requires_grad=True)
    x = torch.randn(2, 0, 64, requires_grad=True)
    out = linear.dense_linear(x, w)
    assert out.shape == (2, 0, 70)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and x.grad.shape == x.shape


@needs_onednn
@pytest.mark.parametrize("grad", [False, True])
def test_autocast_sees_f_linear(monkeypatch, grad):
    """Autocast must see F.linear to cast it: a bf16-autocast forward is bf16, with or without grad."""
    monkeypatch.setattr(linear, "onednn_fp32_is_fast", lambda: True)
    lin = Linear(64, 70)
    x = torch.randn(300, 64, requires_grad=grad)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        assert lin(x).dtype == torch.bfloat16


@needs_onednn
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func's jvp setup
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_onednn_training_keeps_autograd_features(monkeypatch):
    """Where training takes oneDNN: double backward (create_graph), forward-mode AD and torch.func give
    what F.linear gives, a frozen weight keeps no input for its gradient, and zero outputs work."""
    monkeypatch.setattr(linear, "onednn_fp32_is_fast", lambda: True)
    torch.manual_seed(6)
    lin = Linear(16, 12)
    x = torch.randn(300, 16, requires_grad=True)

    def penalty(fn) -> torch.Tensor:  # a gradient penalty: d/dw of |dL/dx|^2
        (gx,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), lin.weight)[0]

    torch.testing.assert_close(penalty(lin), penalty(lambda t: F.linear(t, lin.weight, lin.bias)))
    tangent = torch.randn_like(x)
    params = dict(lin.named_parameters())
    _, jvp = torch.func.jvp(
        lambda t: torch.func.functional_call(lin, params, (t,)), (x.detach(),), (tangent,)
    )
    torch.testing.assert_close(jvp, F.linear(tangent, lin.weight))
    per_sample = torch.func.vmap(
        torch.func.grad(lambda p, t: torch.func.functional_call(lin, p, (t[None],)).sum()), in_dims=(None, 0)
    )(params, x.detach()[:3])
    torch.testing.assert_close(per_sample["weight"][1], torch.ones(12, 1) * x.detach()[1][None])
    frozen = Linear(16, 12).requires_grad_(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        frozen(x)
    assert len(saved) == 1 and saved[0] is frozen.weight  # as F.linear: x is not kept
    empty = Linear(16, 0)
    empty(x).sum().backward()
    assert empty.weight.grad.shape == (0, 16)


@needs_onednn
def test_the_measurements_ignore_the_callers_context(monkeypatch):
    """They are cached for the process: autocast, the default dtype or device where they first run must
    not decide them (fp64 data crashed oneDNN; under autocast torch.mm ran in bf16). bf16_gemm_is_fast
    is a timing, so what is checked is what it times there: a bf16 product beside an fp32 one."""
    measurements = (linear.bf16_gemm_is_fast, linear.onednn_fp32_is_fast, linear.onednn_takes_transposed)
    first = [fn() for fn in measurements]
    products = []  # (input dtype, result dtype) of each torch.mm a measurement runs
    real_mm = torch.mm

    def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = real_mm(a, b)
        products.append((a.dtype, out.dtype))
        return out

    monkeypatch.setattr(torch, "mm", mm)
    try:
        for fn in measurements:
            fn.cache_clear()
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                again = [linear.bf16_gemm_is_fast()]
                timed = set(products)
                again += [fn() for fn in measurements[1:]]
        finally:
            torch.set_default_dtype(default)
        assert timed == {(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)}, timed
        assert again[2] == first[2]  # a check, not a timing
        if first[1] and linear.onednn_fp32_is_fast.__wrapped__():  # a 2x gap here: it must hold
            assert again[1]
        with torch.no_grad():
            Linear(64, 70)(torch.randn(300, 64))  # fp32 works after fp64 was the default
    finally:
        for fn in measurements:
            fn.cache_clear()


@needs_onednn
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 8, 200])  # 200 rows: bf16 unpacks for the fp32 GEMM
def test_packed_linear_matches_linear(dtype, rows):
    torch.manual_seed(2)
    lin = Linear(64, 70).to(dtype)
    packed = PackedLinear(lin)
    x = torch.randn(2, rows, 64).to(dtype)
    ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
    # bf16: the fp32 product rounded to bf16, within one bf16 step (measured: half a step, 2**-8)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-4, rtol=2**-7)
    with torch.inference_mode():
        out = packed(x)
    assert out.dtype == dtype and out.shape == (2, rows, 70)
    torch.testing.assert_close(out.float(), ref, **tol)


@needs_onednn
def test_packed_linear_state_dict_round_trip_and_errors():
    torch.manual_seed(3)
    lin = Linear(64, 70)
    packed = PackedLinear(lin)
    sd = packed.state_dict()
    assert list(sd) == ["weight", "bias"]
    torch.testing.assert_close(sd["weight"], lin.weight.detach(), atol=0, rtol=0)
    new_w = torch.randn(70, 64)
    packed.load_state_dict({"weight": new_w, "bias": lin.bias.detach()})
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), F.linear(x, new_w, lin.bias), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"weight: expected shape \(70, 64\), found \(64, 70\)"):
        packed.load_state_dict({"weight": new_w.t(), "bias": lin.bias.detach()})
    twin = copy.deepcopy(packed)  # opaque oneDNN tensors need a repack to be copied
    with torch.no_grad():
        torch.testing.assert_close(twin(x), packed(x), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="inference-only"):
        packed(x.requires_grad_())


@needs_onednn
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_model_matches_and_saves(dtype, tmp_path, one_thread):
    torch.manual_seed(4)
    model = BambaForCausalLM(BambaConfig(**TINY)).to(dtype).eval()
    ref_sd = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(1, 97, (2, 12))
    with torch.inference_mode():
        ref_logits = model(ids).logits.float()
        ref_tokens = model.generate(ids, max_new_tokens=6)
    names = pack_for_cpu(model, dtypes=(dtype,))
    assert "lm_head" in names and len(names) == 2 * 2 + 3 * 3 + 4 + 1  # 2 mixers, 3 MLPs, q/k/v/o, lm_head
    assert isinstance(model.model.layers[0].mamba.in_proj, PackedLinear)
    with torch.inference_mode():
        logits = model(ids).logits.float()
        if dtype == torch.float32:
            torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
            assert torch.equal(model.generate(ids, max_new_tokens=6), ref_tokens)
        else:  # measured 0 here (the same oneDNN bf16 kernels); where unpacked bf16 prompts are upcast
            # to fp32 the two differ as bf16 does from fp32 (relative RMS ~0.006): bound 0.015
            assert relative_rms(logits, ref_logits) < 0.015
    model.save_pretrained(tmp_path / "packed")
    again = BambaForCausalLM.from_pretrained(str(tmp_path / "packed"))
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, ref_sd[k], atol=0, rtol=0, msg=k)


@needs_onednn
def test_a_packed_model_cast_afterwards_keeps_one_dtype(one_thread):
    """Casting after packing keeps the packed bf16 weights; outputs then follow the activations' dtype
    (before, attention layers failed on mixed dtypes and Mamba-only models returned bf16 logits). The
    biases are random (initialised to 0 they hide how a bias is cast after packing)."""
    torch.manual_seed(4)
    model = BambaForCausalLM(BambaConfig(**{**TINY, "mamba_proj_bias": True})).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.3)
    pack_for_cpu(model, dtypes=(torch.bfloat16,))
    ids = torch.randint(1, 97, (2, 6))
    with torch.inference_mode():
        bf16 = model(ids).logits
        cast = model.float()(ids).logits
    assert cast.dtype == torch.float32
    assert relative_rms(cast, bf16) < 0.015  # bf16 activations' rounding (measured: 0.0044)


@needs_onednn
def test_from_pretrained_pack_follows_the_measurement(tmp_path, one_thread):
    torch.manual_seed(5)
    BambaForCausalLM(BambaConfig(**TINY)).save_pretrained(tmp_path / "m")
    for dtype in (torch.float32, torch.bfloat16):
        model = BambaForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=dtype, pack=True)
        kinds = {type(m) for m in model.modules()}
        assert (PackedLinear in kinds) == packing_pays(dtype), dtype
        assert (Linear in kinds) != packing_pays(dtype), dtype


@needs_onednn
def test_pack_leaves_a_tied_lm_head():
    model = BambaForCausalLM(BambaConfig(**{**TINY, "tie_word_embeddings": True})).eval()
    names = pack_for_cpu(model, dtypes=(torch.float32,))
    assert "lm_head" not in names and model.lm_head.weight is model.model.embed_tokens.weight


def test_the_one_time_measurements_leave_the_global_rng_alone():
    """They run at a model's first forward (a training run's first step, or a resumed run's): drawing
    from the global RNG there would make a resumed run diverge from an uninterrupted one."""
    measurements = (
        linear.bf16_gemm_is_fast,
        linear.onednn_fp32_is_fast,
        linear.packing_pays,
        linear.onednn_takes_transposed,
    )
    state = torch.get_rng_state()
    try:
        for fn in measurements:
            fn.cache_clear()
        linear.bf16_gemm_is_fast()
        linear.onednn_fp32_is_fast()
        linear.packing_pays(torch.bfloat16)
        linear.onednn_takes_transposed()
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        for fn in measurements:  # later tests see fresh measurements, as a new process would
            fn.cache_clear()


@needs_onednn
@pytest.mark.filterwarnings("ignore:`torch.jit.script")  # raised inside torch.compile's own imports
def test_compiled_linear_takes_f_linear(monkeypatch):
    """torch.compile's inductor cannot lower oneDNN's linear op: under compilation every row count takes
    F.linear (inductor picks its own kernels), so a compiled Linear works and matches; a PackedLinear
    runs eagerly there."""
    monkeypatch.setattr(linear, "onednn_fp32_is_fast", lambda: True)
    torch._dynamo.reset()
    lin = Linear(64, 70)
    compiled = torch.compile(lin)
    with torch.no_grad():
        for rows in (8, 300):
            x = torch.randn(rows, 64)
            torch.testing.assert_close(compiled(x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    packed = PackedLinear(lin)  # runs eagerly inside a compiled model
    with torch.no_grad():
        x = torch.randn(8, 64)
        torch.testing.assert_close(torch.compile(packed)(x), F.linear(x, lin.weight, lin.bias))


# ----- the compiled GEMV ---------------------------------------------------------------------------------
needs_compiler = pytest.mark.skipif(
    not HAS_CXX,
    reason="no C++ compiler: the compiled GEMV cannot be built here (its fallback is tested apart)",
)


@needs_compiler
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_gemv_matches_f_linear(bias):
    """One row of any layout ((in,), (1, in), (1, 1, in), strided) by an fp32 weight: F.linear's result,
    in the input's shape; bf16 rows are computed in fp32 and returned in bf16."""
    torch.manual_seed(7)
    w, b = torch.randn(70, 64), (torch.randn(70) if bias else None)
    for x in (torch.randn(64), torch.randn(1, 64), torch.randn(1, 1, 64), torch.randn(1, 1, 128)[..., ::2]):
        out = linear.compiled_gemv(linear.gemv_fp32, x, b, w)
        assert out.shape == F.linear(x, w, b).shape
        torch.testing.assert_close(out, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    xb = torch.randn(1, 64, dtype=torch.bfloat16)
    out = linear.compiled_gemv(linear.gemv_fp32, xb, b, w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(xb.float(), w, b).bfloat16(), atol=0, rtol=0)


@needs_compiler
def test_compiled_int8_gemv_is_the_dequantized_product_in_fp32():
    """The int8 graph, compiled and eager: x @ (q * scales).T in fp32, within fp32 rounding."""
    from bamba.quantize import dequantize_int8, quantize_int8

    torch.manual_seed(8)
    q, scales = quantize_int8(torch.randn(70, 64))
    x = torch.randn(1, 1, 64)
    ref = F.linear(x, dequantize_int8(q, scales))
    out = linear.compiled_gemv(linear.gemv_int8, x, None, q, scales)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear.gemv_int8(x[0, 0], q, scales), ref[0, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fast", [False, True])
def test_dense_linear_takes_the_compiled_gemv_by_the_rule(monkeypatch, fast):
    """One row, no gradient, a contiguous weight of COMPILED_GEMV_MIN_WEIGHTS or more, where it measured
    faster: the compiled GEMV; anything else keeps its path. The output is F.linear's either way."""
    monkeypatch.setattr(linear, "compiled_gemv_is_fast", lambda dtype: fast)
    monkeypatch.setattr(linear, "COMPILED_GEMV_MIN_WEIGHTS", 64 * 70)
    calls = []
    monkeypatch.setattr(linear, "compiled_gemv", lambda g, x, b, w: calls.append(1) or F.linear(x, w, b))
    torch.manual_seed(9)
    w, small = torch.randn(70, 64), torch.randn(69, 64)
    cases = [  # (x, w, taken where fast)
        (torch.randn(1, 1, 64), w, True),
        (torch.randn(64), w, True),
        (torch.randn(2, 64), w, False),  # two rows
        (torch.randn(1, 64), small, False),  # below the size
        (torch.randn(1, 64), torch.randn(64, 70).t(), False),  # a transposed (non-contiguous) weight
        (torch.randn(1, 64, requires_grad=True), w, False),  # autograd
    ]
    for x, weight, taken in cases:
        calls.clear()
        out = linear.dense_linear(x, weight)
        torch.testing.assert_close(out, F.linear(x, weight), atol=1e-5, rtol=1e-5)
        assert len(calls) == (fast and taken), (x.shape, weight.shape, x.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must see F.linear
        calls.clear()
        assert linear.dense_linear(torch.randn(1, 64), w).dtype == torch.bfloat16 and not calls


def test_compiled_gemv_gate_keeps_the_old_path_when_it_cannot_compile(monkeypatch):
    """No compiler (the compile raises), BAMBA_COMPILED_GEMV=0, or a dtype without a compiled graph: the
    gate says no, without raising, and Linear still gives F.linear's result."""
    gate = linear.compiled_gemv_is_fast.__wrapped__  # unmemoized
    monkeypatch.setattr(linear, "_gemv_kernel", functools.cache(linear._gemv_kernel.__wrapped__))  # empty

    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch._inductor, "compile", no_compiler)
    monkeypatch.setattr(linear, "GEMV_PROBES", {})
    assert gate(torch.float32) is False and gate(torch.int8) is False
    assert gate(torch.bfloat16) is False
    assert linear.GEMV_PROBES[torch.float32] == (
        "not compiled (RuntimeError: InvalidCxxCompiler: No working C++ compiler found)"
    )
    monkeypatch.setattr(torch._inductor, "compile", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    assert gate(torch.float32) is False  # an error without a message
    assert linear.GEMV_PROBES[torch.float32] == "not compiled (OSError: )"
    monkeypatch.setattr(linear, "compiled_gemv_is_fast", gate)
    monkeypatch.setattr(linear, "COMPILED_GEMV_MIN_WEIGHTS", 1)
    x, w = torch.randn(1, 64), torch.randn(70, 64)
    with torch.no_grad():
        torch.testing.assert_close(linear.dense_linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    monkeypatch.setenv("BAMBA_COMPILED_GEMV", "0")
    monkeypatch.setattr(linear, "GEMV_PROBES", {})
    calls = []
    monkeypatch.setattr(linear, "_gemv_kernel", lambda *a: calls.append(1))
    assert linear.compiled_gemv_is_fast.__wrapped__(torch.float32) is False and not calls
    assert linear.GEMV_PROBES[torch.float32] == "off (BAMBA_COMPILED_GEMV=0)"


@needs_compiler
def test_a_model_decodes_the_same_through_the_compiled_gemv(monkeypatch):
    """A tiny model whose every one-row fp32 Linear takes the compiled GEMV: the same logits (within
    rounding) and greedy tokens as F.linear's, cached decoding included."""
    model = BambaForCausalLM(BambaConfig(**TINY)).eval()
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        ref_logits = model(ids[:, :1]).logits
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    monkeypatch.setattr(linear, "compiled_gemv_is_fast", lambda dtype: True)
    monkeypatch.setattr(linear, "COMPILED_GEMV_MIN_WEIGHTS", 1)
    calls = []
    real = linear.compiled_gemv
    monkeypatch.setattr(linear, "compiled_gemv", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:, :1]).logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert calls
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), ref)
