"""How Linear layers compute: the one place that picks a matmul path for a device, dtype and input size.

- `Linear` is `nn.Linear` (same parameters, same state_dict) that takes, on CPUs, the path measured
  fastest for its weight's dtype and the input's rows: up to `kernels.MAX_ROWS` rows (decoding) by a fp32
  or bf16 weight of `KERNEL_MIN_WEIGHTS` or more through the C++ decode kernels of `bamba.kernels`, which
  read each weight once at the memory's speed (`kernel_linear`, where they are built: x86 with a
  compiler; BAMBA_KERNELS=0 turns them off); bf16 prompts in fp32 from weight tiles upcast on
  the fly, so the weights stay bf16 (`linear_upcast`, where `bf16_gemm_is_fast()` is False); fp32
  inference through oneDNN's matmul (`onednn_linear`, where `use_onednn_fp32` says); one input row by a
  large fp32 weight, where the kernels are not built, through a GEMV that TorchInductor compiles from
  plain PyTorch (`compiled_gemv`, where `compiled_gemv_is_fast`; BAMBA_COMPILED_GEMV=0 turns it off;
  int8 weight-only layers take the same route, `gemv_int8`); fp32 training through oneDNN
  (`OneDNNLinearFunction`, where `onednn_trains()`). Everything else is F.linear.
- `PackedLinear`, made by `pack_for_cpu(model)`, is for inference on CPUs: the weight is stored once, in
  oneDNN's blocked layout, and every input runs through oneDNN (only for dtypes where `packing_pays`:
  never where the decode kernels are built, which read the dense weight faster).

The figures behind each rule, with the commands that measure them: benchmarks/README.md.
References: each fast path equals F.linear in fp32 within rounding (tests/test_linear.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels

ONEDNN_ROWS = (4, 256)  # fp32 inputs with this many rows (inclusive) use oneDNN's matmul (x86 only)
X86 = platform.machine().lower() in ("x86_64", "amd64")  # where that was measured faster
ONEDNN_FAST = 1.3  # oneDNN takes every fp32 row count where its GEMM measures this much faster than MKL's
ONEDNN_GEMV_MIN_WEIGHTS = 2**19  # ... but 1-3 rows only on weights this large (its call costs ~10 us more)
UPCAST_MIN_ROWS = 9  # bf16 inputs with at least this many rows use `linear_upcast` where bf16 GEMM is slow
PACKED_BF16_MAX_ROWS = 128  # above this, a packed bf16 weight is unpacked for `linear_upcast` (prefill)
COMPILED_GEMV_MIN_WEIGHTS = 2**20  # one input row by weights this large may take the compiled GEMV
COMPILED_GEMV_FAST = 1.05  # ... where it measured this much faster than the path it replaces
COMPILED_GEMV_PROBE = (4096, 1024)  # (out, in) of the weights that measurement uses
KERNEL_MIN_WEIGHTS = 2**16  # weights this large take the decode kernels (smaller: F.linear's call is cheaper)


def _probe(*shape: int) -> Tensor:
    """Random fp32 CPU data for a one-time measurement, from a private generator: measuring never moves
    the global RNG (a run that measures at its first step draws the same numbers as one that does not),
    and neither the default dtype nor the default device changes what is measured."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(*shape, generator=gen, dtype=torch.float32, device="cpu")


@contextlib.contextmanager
def _isolated() -> Iterator[None]:
    """Outside autocast and autograd, whatever the caller's context: the one-time checks below are
    cached for the whole process."""
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        yield


def _best_time(fn: Any, *args: Any, reps: int = 3) -> float:
    """Best of `reps` timed calls after a warm-up (`_isolated`)."""
    return _best_times([lambda: fn(*args)], reps)[0]


def _best_times(fns: list[Callable[[], Any]], reps: int) -> list[float]:
    """The best of `reps` timed calls of each of `fns`, called in turn (each warmed up first), so that a
    machine's drift touches them all alike (`_isolated`)."""
    best = [float("inf")] * len(fns)
    with _isolated():
        for fn in fns:
            fn()
        for _ in range(reps):
            for i, fn in enumerate(fns):
                t = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t)
    return best


@functools.cache
def bf16_gemm_is_fast() -> bool:
    """Measured once: is a bf16 GEMM on this CPU faster than fp32? (It can be with AVX512-BF16 / AMX; on
    AVX2-only CPUs PyTorch's bf16 GEMM is hundreds of times slower, bf16 GEMV is fine.)"""
    a, b = _probe(128, 512), _probe(512, 512)
    return _best_time(torch.mm, a.bfloat16(), b.bfloat16()) < _best_time(torch.mm, a, b)


@functools.cache
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear through oneDNN's matmul (CPU, no autograd). `w` is (out, in), dense or packed by
    `torch.ops.mkldnn._reorder_linear_weight`; x (..., in) in w's dtype -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


@functools.cache
def onednn_fp32_is_fast() -> bool:
    """Measured once (about 15 ms): is oneDNN's fp32 GEMM at least `ONEDNN_FAST` times faster than
    torch.mm's (MKL) on this CPU? (True on AMD CPUs, where MKL keeps to AVX2 kernels.)"""
    if not (onednn_available() and X86):
        return False
    a, b = _probe(256, 1024), _probe(1024, 1024)
    return _best_time(onednn_linear, a, b) * ONEDNN_FAST < _best_time(torch.mm, a, b.t())


def use_onednn_fp32(rows: int, weights: int) -> bool:
    """Does an fp32 matmul of `rows` input rows by a weight of `weights` elements, without autograd, go
    through oneDNN on this CPU?"""
    if not (onednn_available() and X86):
        return False
    if ONEDNN_ROWS[0] <= rows <= ONEDNN_ROWS[1]:
        return True
    return onednn_fp32_is_fast() and (rows > ONEDNN_ROWS[1] or weights >= ONEDNN_GEMV_MIN_WEIGHTS)


def dense_linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, w, bias) for fp32 on the CPU: up to `kernels.MAX_ROWS` rows through the decode kernels
    where `kernel_fits` says, one input row through the compiled GEMV where `takes_compiled_gemv` says,
    else through oneDNN where `use_onednn_fp32` says (inference) or `onednn_trains` says (autograd), on
    what `plain_cpu_fp32` allows; F.linear itself (the reference) otherwise."""
    if plain_cpu_fp32(x, w, bias):
        if not needs_grad(x, w, bias):
            rows = x.numel() // x.shape[-1]
            if rows <= kernels.MAX_ROWS and kernel_fits(w):
                return kernel_linear(x, w, bias)
            if rows == 1 and takes_compiled_gemv(w):
                return compiled_gemv(gemv_fp32, x, bias, w)
            if use_onednn_fp32(rows, w.numel()):
                return onednn_linear(x, w, bias)
        elif onednn_trains():
            return OneDNNLinearFunction.apply(x, w, bias)
    return F.linear(x, w, bias)


def onednn_can_take(x: Tensor, *others: Tensor | None) -> bool:
    """Can oneDNN's fp32 op serve these tensors here? On x86 builds with oneDNN, what
    `plain_cpu_fp32` allows."""
    return (
        not torch.compiler.is_compiling()  # first: dynamo would trace into the cached gate below
        and onednn_available()  # cached; x86 builds with oneDNN only (most calls elsewhere stop here)
        and X86
        and plain_cpu_fp32(x, *others)
    )


def plain_cpu_fp32(x: Tensor, *others: Tensor | None) -> bool:
    """Can a CPU fast path (oneDNN's op, a compiled GEMV, the decode kernels) serve these tensors?
    What `plain_cpu` allows, all fp32."""
    return all(t.dtype == torch.float32 for t in (x, *others) if t is not None) and plain_cpu(x, *others)


def plain_cpu(x: Tensor, *others: Tensor | None) -> bool:
    """Plain (not DTensor, not a buffer or Parameter subclass...) non-empty CPU tensors, outside autocast
    (which must see F.linear or torch.matmul to cast it), torch.func transforms and forward-mode AD (the
    fast ops have no forward derivative), and torch.compile (whose inductor fails to lower oneDNN's op,
    cannot trace the kernels' ctypes calls, and picks its own kernels anyway)."""
    return (
        not torch.compiler.is_compiling()
        and all(
            type(t) in (Tensor, nn.Parameter) and t.device.type == "cpu" and t.numel() > 0
            for t in (x, *others)
            if t is not None
        )
        and not torch.is_autocast_enabled("cpu")
        and not torch._C._are_functorch_transforms_active()
        and fwAD._current_level < 0  # no forward-mode AD level open
    )


# ----- the C++ decode kernels (bamba.kernels): a few rows, each weight read once -------------------------
def kernel_fits(w: Tensor) -> bool:
    """Is `w` a weight the decode kernels take: contiguous, of `KERNEL_MIN_WEIGHTS` elements or more,
    where they are built? (The caller checks the input: `plain_cpu`, no autograd, few rows.)"""
    return w.numel() >= KERNEL_MIN_WEIGHTS and w.is_contiguous() and kernels.available()


def takes_kernel(x: Tensor, w: Tensor, *others: Tensor | None, any_rows: bool = False) -> bool:
    """Do the rows of x by the CPU weight w go through the decode kernels? Up to `kernels.MAX_ROWS` rows
    (any number with `any_rows`), no autograd, what `plain_cpu` allows, a weight that `kernel_fits`."""
    return (
        (any_rows or x.numel() <= kernels.MAX_ROWS * x.shape[-1])
        and kernel_fits(w)
        and plain_cpu(x, w, *others)
        and not needs_grad(x, w, *others)
    )


def kernel_linear(x: Tensor, w: Tensor, bias: Tensor | None = None, scales: Tensor | None = None) -> Tensor:
    """x (..., in) @ (w * scales[:, None]).T + bias through `kernels.dense` (the activations as they come
    in fp32, products and sums in fp32; w fp32, bf16 or int8 with bf16 scales), returned in x's dtype.
    Reference: F.linear in fp32."""
    k = x.shape[-1]
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    y = kernels.dense(x.reshape(-1, k), w, scales, bias)  # (rows, out) fp32
    return y.view(*x.shape[:-1], w.shape[0]).to(x.dtype)


def onednn_trains() -> bool:
    """Does fp32 training (autograd) go through oneDNN (`OneDNNLinearFunction`) on this CPU? Where its
    GEMM measured faster than MKL's (`onednn_fp32_is_fast`) and this PyTorch's oneDNN linear takes the
    transposed operands the backward passes (`onednn_takes_transposed`)."""
    return onednn_fp32_is_fast() and onednn_takes_transposed()


@functools.cache
def onednn_takes_transposed() -> bool:
    """Does this PyTorch's oneDNN linear take transposed (strided) operands, as `OneDNNLinearFunction`'s
    backward passes them, and give F.linear's result? (Checked once on a small product; torch 2.13 does.)"""
    x, w = _probe(8, 6).t(), _probe(8, 5).t()  # (6, 8) and (5, 8), both transposed views
    with _isolated():
        try:
            out = onednn_linear(x, w)  # (6, 5)
        except RuntimeError:
            return False
        return torch.allclose(out, F.linear(x, w), atol=1e-5, rtol=1e-5)


class OneDNNLinearFunction(torch.autograd.Function):
    """x @ w.T + bias with autograd, all three GEMMs through oneDNN (it takes transposed operands as
    strided views, no copies): y = x w^T, grad_x = g w, grad_w = g^T x, grad_bias = sum of g's rows.
    x (..., in), w (out, in) -> (..., out). Reference: F.linear (tests compare outputs and gradients)."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return onednn_linear(x, w, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, w, bias = inputs
        # as F.linear does: keep x only for w's gradient, w only for x's
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, w = ctx.saved_tensors
        # With create_graph=True (grad mode on here) the gradients must be differentiable: plain ops.
        mm = torch.matmul if torch.is_grad_enabled() else (lambda a, b: onednn_linear(a, b.t()))
        g2 = g.reshape(-1, g.shape[-1])  # (rows, out)
        gx = mm(g, w) if ctx.needs_input_grad[0] else None  # (..., out) @ (out, in)
        gw = mm(g2.t(), x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None  # (out, in)
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def needs_grad(*tensors: Tensor | None) -> bool:
    """Will autograd record an op on these tensors?"""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----- compiled GEMV: one input row ------------------------------------------------------------------------
def gemv_fp32(x: Tensor, w: Tensor) -> Tensor:
    """x (in,) fp32, w (out, in) fp32 -> (out,): one dot product per weight row. The graph that
    `compiled_gemv` compiles; run eagerly it is the reference (it materializes w * x)."""
    return (w * x).sum(-1)


def gemv_int8(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    """x (in,) fp32, w (out, in) int8, scales (out,) -> (out,) fp32: x @ (w * scales[:, None]).T, the
    int8 weight converted in the loop (see `gemv_fp32`)."""
    return (w.float() * x).sum(-1) * scales.float()


_COMPILE_LOCK = threading.Lock()


@functools.cache
def _gemv_kernel(
    graph: Callable[..., Tensor], inputs: tuple[tuple[tuple[int, ...], torch.dtype], ...]
) -> Any:
    """`graph` compiled by TorchInductor (C++, vectorized, OpenMP) for inputs of these (shape, dtype):
    a kernel that takes contiguous CPU tensors of exactly those and returns the output. Compiled once per
    process and shape, without dynamo, whose guards would cost more than the kernel's call."""
    from torch.fx.experimental.proxy_tensor import make_fx

    # never touched: traced with fake tensors, and inductor only reads their metadata (a 9B model's
    # lm_head would otherwise cost 4 GB to compile)
    examples = [torch.empty(shape, dtype=dtype) for shape, dtype in inputs]
    # one compile at a time (inductor's config is global; generation may run in several threads), and
    # no worker pool for one kernel
    with _COMPILE_LOCK, torch._inductor.config.patch(compile_threads=1), _isolated():
        return torch._inductor.compile(make_fx(graph, tracing_mode="fake")(*examples), examples)


def compiled_gemv(graph: Callable[..., Tensor], x: Tensor, bias: Tensor | None, *weights: Tensor) -> Tensor:
    """graph(x, *weights) (+ bias) through its compiled kernel, for x (..., in) holding one row (any
    float dtype; computed in fp32) and contiguous CPU weights; returns (..., out) in x's dtype. No
    autograd. Reference: the graph run eagerly."""
    x1 = x.reshape(-1).float().contiguous()  # (in,)
    kernel = _gemv_kernel(graph, tuple((tuple(t.shape), t.dtype) for t in (x1, *weights)))
    y = kernel(x1, *weights)  # (out,) fp32
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[0]).to(x.dtype)


def takes_compiled_gemv(w: Tensor) -> bool:
    """Does one input row by the CPU weight `w` go through `compiled_gemv` (no autograd)? For contiguous
    weights of `COMPILED_GEMV_MIN_WEIGHTS` elements or more, where the compiled kernel measured faster
    than the path it replaces (`compiled_gemv_is_fast`)."""
    return (
        not torch.compiler.is_compiling()  # first: dynamo would trace into the cached gate below
        and w.numel() >= COMPILED_GEMV_MIN_WEIGHTS
        and w.is_contiguous()
        and w.device.type == "cpu"
        and compiled_gemv_is_fast(w.dtype)
    )


def _gemv_probe_paths(dtype: torch.dtype, x: Tensor) -> tuple[Callable, Callable] | None:
    """For one input row x (1, in) by a large weight w of `dtype`: (the compiled GEMV, the path it
    replaces), each w -> (1, out); None for dtypes without a compiled graph. int8 weights get unit bf16
    scales, as the int8 modules keep them."""
    if dtype == torch.float32:
        old = onednn_linear if use_onednn_fp32(1, COMPILED_GEMV_MIN_WEIGHTS) else F.linear
        return (lambda w: compiled_gemv(gemv_fp32, x, None, w)), (lambda w: old(x, w))
    if dtype == torch.int8:
        ones = torch.ones(COMPILED_GEMV_PROBE[0], dtype=torch.bfloat16)
        return (
            lambda w: compiled_gemv(gemv_int8, x, None, w, ones),
            lambda w: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w, ones),
        )
    return None


GEMV_PROBES: dict[torch.dtype, str] = {}  # what `compiled_gemv_is_fast` found, per dtype (for reports)


@functools.cache
def compiled_gemv_is_fast(dtype: torch.dtype) -> bool:
    """Measured once per weight dtype (fp32, int8) and process: does the compiled GEMV compile here (it
    needs a C++ compiler) and take at most 1 / `COMPILED_GEMV_FAST` of the time of the path it replaces,
    on weights that do not fit in the caches? False when BAMBA_COMPILED_GEMV=0. Costs one compile and
    about 40 ms; what it found is kept in `GEMV_PROBES[dtype]`."""
    n, k = COMPILED_GEMV_PROBE
    paths = _gemv_probe_paths(dtype, _probe(1, k))
    if paths is None:
        return False
    if os.environ.get("BAMBA_COMPILED_GEMV", "1") == "0":
        GEMV_PROBES[dtype] = "off (BAMBA_COMPILED_GEMV=0)"
        return False
    count = max(1, 64 * 2**20 // (n * k * dtype.itemsize))  # 64 MB of weights: out of most caches
    ws = [torch.full((n, k), 1, dtype=dtype) for _ in range(count)]

    def run(fn: Callable[[Tensor], Any]) -> None:
        for w in ws:
            fn(w)

    try:
        with _isolated():
            run(paths[0])  # compiles
    except Exception as e:  # noqa: BLE001 - no compiler, an inductor that cannot build it: keep the old path
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        GEMV_PROBES[dtype] = f"not compiled ({type(e).__name__}: {first_line})"
        return False
    # interleaved, best of 9 each: a single measure of each drifted by more than the gap between them
    compiled, old = _best_times([lambda: run(paths[0]), lambda: run(paths[1])], reps=9)
    fast = compiled * COMPILED_GEMV_FAST < old
    GEMV_PROBES[dtype] = (
        f"{'taken' if fast else 'not taken'}: {compiled * 1e3:.2f} ms against {old * 1e3:.2f}"
    )
    return fast


class Linear(nn.Linear):
    """nn.Linear (same parameters) that takes the fastest measured path on CPUs; see the module doc."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if w.device.type == "cpu" and w.dtype == torch.bfloat16:
            if takes_kernel(x, w, self.bias):
                return kernel_linear(x, w, self.bias)
            if x.numel() // x.shape[-1] >= UPCAST_MIN_ROWS and not bf16_gemm_is_fast():
                return linear_upcast(x, w, self.bias)
        return dense_linear(x, w, self.bias)


def linear_upcast(x: Tensor, w: Tensor, bias: Tensor | None = None, tile: int = 1024) -> Tensor:
    """F.linear(x.float(), w.float(), bias) in x's dtype, upcasting `tile` output rows of w at a time
    (a few MB of fp32 at once, never the whole weight). Reference: F.linear in fp32."""
    xf = x.float()
    out = x.new_empty(*x.shape[:-1], w.shape[0], dtype=torch.float32)  # (..., out)
    for i in range(0, w.shape[0], tile):
        out[..., i : i + tile] = dense_linear(xf, w[i : i + tile].float())
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


# ----- prepacked weights for CPU inference ------------------------------------------------------------------
class PackedLinear(nn.Module):
    """An inference-only Linear whose weight lives in oneDNN's blocked layout (one copy, on the CPU).

    `state_dict()` still holds a dense `weight` (unpacked on the fly) and loading a state_dict repacks,
    so a packed model saves and loads like any other (saving unpacks each weight: a dense copy). It has
    no autograd: a forward that would need gradients raises, as does an input on another device. Casts
    and moves (`.to()`, `.half()`) leave the packed weight as it is (outputs follow the input's dtype,
    computed with the packed weight): pack a model once it is in place.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        if w.device.type != "cpu":
            raise ValueError(f"PackedLinear: the weight is on {w.device}; oneDNN packing is for CPU weights")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_dtype = w.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)  # opaque (out, in)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    # torch.compile runs this eagerly (a graph break): inductor cannot lower oneDNN's linear op
    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(
                f"PackedLinear: input on {x.device}; the packed weight is a CPU (oneDNN) tensor"
            )
        if needs_grad(x, self.packed):
            raise RuntimeError("PackedLinear is inference-only (no autograd); train the unpacked model")
        rows = x.numel() // x.shape[-1]
        if self.weight_dtype == torch.bfloat16 and rows > PACKED_BF16_MAX_ROWS and not bf16_gemm_is_fast():
            return linear_upcast(x, self.weight, self.bias)  # long prompts: unpack, fp32 GEMM
        bias = self.bias
        if bias is not None and bias.dtype != self.weight_dtype:  # the model was cast after packing
            bias = bias.to(self.weight_dtype)
        return onednn_linear(x.to(self.weight_dtype), self.packed, bias).to(x.dtype)

    @property
    def weight(self) -> Tensor:
        """The dense (out, in) weight (a fresh copy)."""
        return self.packed.to_dense()

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        # oneDNN's opaque tensors cannot be deep-copied: repack a dense copy instead.
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        dense.weight = nn.Parameter(self.weight, requires_grad=False)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return PackedLinear(dense)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        w = state_dict.get(prefix + "weight")
        if w is not None:
            if tuple(w.shape) != (self.out_features, self.in_features):
                raise ValueError(
                    f"{prefix}weight: expected shape {(self.out_features, self.in_features)}, found "
                    f"{tuple(w.shape)}"
                )
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.to(self.weight_dtype).contiguous(), 1)
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.weight_dtype}, packed"
        )


@functools.cache
def packing_pays(dtype: torch.dtype) -> bool:
    """Measured once per dtype: is a packed oneDNN GEMV at least 15% faster than F.linear on this CPU?
    (fp32: never measured faster on the machines we tried, so False without measuring; nor where the
    decode kernels are built, which read the dense weights faster than oneDNN reads packed ones.)"""
    if (
        dtype != torch.bfloat16
        or not onednn_available()
        or not torch.ops.mkldnn._is_mkldnn_bf16_supported()
        or kernels.available()
    ):
        return False
    ws = [torch.full((2048, 1024), 0.01, dtype=dtype) for _ in range(8)]  # 32 MB: mostly out of cache
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]
    x = _probe(1, 1024).to(dtype)

    def run(fn: Any, weights: list[Tensor]) -> None:
        for w in weights:
            fn(x, w)

    return _best_time(run, onednn_linear, packed) < _best_time(run, F.linear, ws) / 1.15


def is_tied_lm_head(model: nn.Module, name: str) -> bool:
    """Is `name` the lm_head of a model whose config ties it to the input embeddings?"""
    return name == "lm_head" and getattr(getattr(model, "config", None), "tie_word_embeddings", False)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` of `model` (e.g. "model.layers.0.mamba.in_proj")."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def pack_for_cpu(
    model: nn.Module,
    dtypes: tuple[torch.dtype, ...] | None = None,
    on_packed: Callable[[str], None] | None = None,
) -> list[str]:
    """Swap `model`'s CPU `Linear` layers whose dtype is in `dtypes` (default: those where
    `packing_pays`) for `PackedLinear`, in place, for inference. A lm_head tied to the embeddings is
    left as it is (packing would copy it). `on_packed(name)` runs after each layer (the loader releases
    the layer's memory-mapped pages there, so only one layer is held twice). Returns the packed names."""
    if not onednn_available():
        return []
    packed = []
    for name, mod in list(model.named_modules()):
        if type(mod) is not Linear or mod.weight.device.type != "cpu" or is_tied_lm_head(model, name):
            continue
        dtype = mod.weight.dtype
        if (dtype in dtypes) if dtypes is not None else packing_pays(dtype):
            replace_module(model, name, PackedLinear(mod))
            packed.append(name)
            if on_packed is not None:
                on_packed(name)
    return packed


def weight_bytes(model: nn.Module, decode_step: bool = False) -> int:
    """Bytes of `model`'s stored tensors (quantized ones as stored, packed ones at their dense size),
    shared tensors counted once; nothing is unpacked to count. Works for any nn.Module.

    decode_step: only what one decoding step reads: everything but an input embedding table that no
    output head shares (its single looked-up row is negligible)."""
    seen, total = set(), 0
    skip = set()
    emb = getattr(getattr(model, "model", model), "embed_tokens", None)
    if decode_step and isinstance(emb, nn.Embedding):
        head = getattr(model, "lm_head", None)
        if not (isinstance(head, nn.Linear) and head.weight is emb.weight):
            skip.add(emb.weight.data_ptr())
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or t.data_ptr() in skip:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for mod in model.modules():
        if isinstance(mod, PackedLinear):
            total += mod.in_features * mod.out_features * mod.weight_dtype.itemsize
    return total
