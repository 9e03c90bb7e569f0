"""Quantization of the Linear layers (int8 per channel, int4 per group) by swapping `nn.Linear` modules.

    from bamba import quantize
    quantize(model, "int4_weight_only", group_size=128)   # in place; or
    BambaForCausalLM.from_pretrained(folder, quantization="int8_weight_only")
    bamba generate --quantize int4 ...   # short names: int8, int4, int8dq (SHORT_NAMES)

Methods:

- int8_weight_only, int4_weight_only: only the weights are quantized. int8 activations stay in floating
  point: through the decode kernels of `bamba.kernels` (up to `kernels.MAX_ROWS` rows, where they are
  built) fp32, or on AVX-512 split into two int8 parts for VNNI / AMX products (at most 1.5e-5 of each
  row's largest value off: `kernels.split_rows`); fp32 through the compiled GEMV (one row, where the
  kernels are not built); rounded to bf16 by PyTorch's packed kernel. The int4 kernel rounds each block
  of 32 activations to int8 (one fp32 scale per block, as llama.cpp's q8_0), so that the products are
  exact integer sums (VNNI on AVX-512): `linear_int4_q8_reference` is that rounding, then F.linear; its
  error is a small fraction of the int4 weights' own (tests/test_kernels.py measures both). PyTorch's
  int4 kernel, where the kernels are not built, rounds the activations to bf16.
- int8_dynamic_activation_int8_weight ("int8dq", as torchao names it): the int8_weight_only weights,
  and each input row is quantized to int8 on the fly (symmetric, one fp32 scale per row), so the
  product is an exact int8 x int8 -> int32 matmul (`torch._int_mm`, VNNI on x86), rescaled in fp32.
  llama.cpp's q8_0 works the same way (with blocks of 32). It is not weight-only: the activations'
  rounding adds a little error, and it is faster at every row count on the CPU.

Quantized: every `nn.Linear` (Mamba in_proj / out_proj, attention q/k/v/o, MLP, and the lm_head unless
it is tied to the embeddings). Never: embeddings, A_log, D, dt_bias, conv1d, norms.

Formats (the tensors are the module's state_dict, so they save and load like any weight):

- int8_weight_only: `weight` int8 (out, in) and `scales` (out,) bfloat16, symmetric per output channel:
  w = weight * scales.
- int4_weight_only (group size g, default 128): asymmetric per group of g input columns,
  w[n, k] = (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n], q in 0..15, with
  `scales_and_zeros` (in / g, out, 2) bfloat16 ([..., 0] = scale, [..., 1] = zero) and `weight` uint8
  (out, in / 2) holding q in PyTorch's CPU int4 layout: viewed as (out / 64, in, 32), byte [nb, k, j] is
  q[64 nb + j, k] | q[64 nb + 32 + j, k] << 4. Out features are padded with zero rows to a multiple
  of 64 (`weight` and `scales_and_zeros` have the padded size; outputs are cut back). Layers whose in
  features are not a multiple of g stay in floating point.

- int8_dynamic_activation_int8_weight: the tensors of int8_weight_only.

A saved quantized model's folder holds `quantization_config.json`:
{"quant_method": "bamba", "format": ..., "group_size": ..., "modules": [names], "version": 1}; loading
reads it and builds the quantized modules before the weights are assigned (`prepare_quantized`).

Kernels: the C++ kernels of `bamba.kernels` where they are built (x86 with a C++ compiler; BAMBA_KERNELS=0
turns them off): int8 up to `kernels.MAX_ROWS` input rows (decoding), each weight read once; int4 at
every row count, prompts included. Else, and up to `INT8_KERNEL_MAX_ROWS` / `INT4_KERNEL_MAX_ROWS`
input rows, the packed aten kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`); more rows (prompts) dequantize the
weight and take the fp32 GEMM, whose cost is fixed plus fast. int8dq takes `torch._int_mm` at every row
count on the CPU, its rows shifted to uint8 where `_int_mm` takes them (VNNI multiplies u8 x s8
natively; the shift is subtracted exactly); other devices take its reference. PyTorch's own kernels, not torchao's (measured no faster on
the CPU). Each fast path has a plain reference beside it (`linear_int8_reference`,
`linear_int4_reference`, `linear_int8_dynamic_reference`: the same rounding, then F.linear), and the
figures that set the limits, with their commands, are in benchmarks/README.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .linear import (
    X86,
    PackedLinear,
    compiled_gemv,
    dense_linear,
    gemv_int8,
    is_tied_lm_head,
    kernel_linear,
    needs_grad,
    replace_module,
    takes_compiled_gemv,
    takes_kernel,
)
from .runtime import release_free_memory

METHODS = ("int8_weight_only", "int4_weight_only", "int8_dynamic_activation_int8_weight")
SHORT_NAMES = {"int8": METHODS[0], "int4": METHODS[1], "int8dq": METHODS[2]}  # command-line names
INT8_KERNEL_MAX_ROWS = 64  # inputs with at most this many rows use the packed int8 kernel (decode)
INT4_KERNEL_MAX_ROWS = 256  # the same for the int4 kernel
INT4_BLOCK_N = 64  # rows per block of the int4 layout
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes PyTorch's CPU int4 kernel takes
INT8_KERNEL_IN_MULTIPLE = 16  # the int8 kernel's in_features must be a multiple of this


# ----- quantizing a weight in blocks of rows -------------------------------------------------------------
QUANTIZE_BLOCK = 1 << 20  # weights per block of rows quantized at once (4 MB of fp32: cache-sized)


def _one_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn` with one intra-op thread (restored after): its many small ops on cache-sized blocks each
    wait at a barrier for every thread, which on a machine busy with other work took 5-10x longer than
    one thread alone (benchmarks/README.md, issue 19)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def quantize_blocks(w: Tensor, multiple: int) -> Iterator[tuple[int, int, Tensor]]:
    """(r0, r1, rows r0:r1 of w as fp32) for blocks of about QUANTIZE_BLOCK weights, `multiple` rows
    each (the last may be shorter); rows past w's end (up to a multiple) are zeros. The fp32 block is
    one buffer, overwritten by the next block: a 9B model's lm_head quantized at once made 6 GB of
    temporaries, and a fresh multi-MB buffer per op costs more in page faults than the op itself."""
    n, k = w.shape
    rows = max(multiple, QUANTIZE_BLOCK // k // multiple * multiple)
    padded = n + (-n % multiple)
    buf = torch.empty(min(rows, padded), k, dtype=torch.float32, device=w.device)
    for r0 in range(0, padded, rows):
        r1 = min(r0 + rows, padded)
        blk, real = buf[: r1 - r0], min(r1, n) - r0
        blk[:real] = w[r0 : r0 + real]
        blk[real:] = 0
        yield r0, r1, blk


# ----- int8: per output channel -----------------------------------------------------------------------------
@_one_thread
def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (out, in) float -> (q int8 (out, in), scales bf16 (out,)), symmetric: w ~ q * scales. Computed
    `quantize_blocks` rows at a time: the fp32 temporaries are one block's, not the weight's."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    scales = torch.empty(n, dtype=torch.bfloat16, device=w.device)
    for r0, r1, blk in quantize_blocks(w, 1):  # blk (rows, in) fp32, a reused buffer
        amax = torch.maximum(blk.amax(1), blk.amin(1).neg_())  # = blk.abs().amax(1), without a copy
        s = (amax / 127.0).clamp(min=1e-12).to(torch.bfloat16)
        q[r0:r1] = blk.div_(s.float()[:, None]).round_().clamp_(-127, 127)  # integers: exact as int8
        scales[r0:r1] = s
    return q, scales


def quantize_int8_reference(w: Tensor) -> tuple[Tensor, Tensor]:
    """Reference: `quantize_int8` on the whole weight at once (fp32 temporaries of its size)."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
    return torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8), scales


def dequantize_int8(q: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.to(torch.float32) * scales.float()[:, None]).to(dtype)


@_one_thread
def dequantize_int8_blocked(q: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """`dequantize_int8` bit for bit, QUANTIZE_BLOCK weights at a time through one fp32 buffer (as the
    quantizers: no weight-sized fp32 temporaries, no page faults per op)."""
    n, k = q.shape
    out = torch.empty(n, k, dtype=dtype, device=q.device)
    s = scales.float()[:, None]  # (out, 1)
    for r0, r1, blk in quantize_blocks(q, 1):  # blk (rows, in) fp32: q's rows as floats
        out[r0:r1] = blk.mul_(s[r0:r1])
    return out


def linear_int8_reference(x: Tensor, q: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference: dequantize, then a plain F.linear in x's dtype."""
    return F.linear(x, dequantize_int8(q, scales, x.dtype), bias)


def linear_int8(x: Tensor, q: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., in) @ dequant(q).T: on the CPU, up to `kernels.MAX_ROWS` rows through the decode kernels
    where `takes_kernel` says (fp32 activations), one row through the compiled GEMV where
    `takes_compiled_gemv` says (fp32 activations), up to `INT8_KERNEL_MAX_ROWS` rows through the packed
    kernel (bf16 activations), else the dequantized weight through `dense_linear`; on other devices the
    reference."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu":
        return linear_int8_reference(x, q, scales, bias)
    if takes_kernel(x, q, bias):
        if scales.dtype != torch.bfloat16:  # a model cast after quantizing
            scales = scales.to(torch.bfloat16)
        return kernel_linear(x, q, bias, scales.contiguous())
    # Prompts, and widths the kernel cannot read (it reads the input in blocks of 16: other widths gave
    # garbage or crashed): dequantize, then the fastest dense GEMM.
    if rows > INT8_KERNEL_MAX_ROWS or q.shape[1] % INT8_KERNEL_IN_MULTIPLE:
        return dense_linear(x, dequantize_int8_blocked(q, scales, x.dtype), bias)
    if rows == 1 and not needs_grad(x) and takes_compiled_gemv(q):  # decoding one row: fp32 activations
        return compiled_gemv(gemv_int8, x, bias, q, scales.contiguous())
    x2 = x.reshape(rows, x.shape[-1]).to(torch.bfloat16).contiguous()
    if scales.dtype != torch.bfloat16:  # a model cast after quantizing
        scales = scales.to(torch.bfloat16)
    y = torch.ops.aten._weight_int8pack_mm(x2, q, scales)  # (rows, out) bf16
    y = y.view(*x.shape[:-1], q.shape[0]).to(x.dtype)
    return y + bias if bias is not None else y


# ----- int8 weights with int8 activations quantized on the fly ----------------------------------------------
def quantize_rows_int8(x: Tensor, shift: bool = False) -> tuple[Tensor, Tensor]:
    """x (m, k) float -> (q int8 (m, k), scale fp32 (m, 1)), symmetric per row: x ~ q * scale, q in
    -127..127. With `shift`, q + 128 is returned as uint8 (1..255) instead."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12).div_(127.0)  # (m, 1)
    q = x.div(scale).round_()
    return (q.add_(128).to(torch.uint8) if shift else q.to(torch.int8)), scale


@functools.cache
def int_mm_takes_uint8() -> bool:
    """Does this PyTorch's CPU `torch._int_mm` take uint8 activations (u8 x s8 products, the form x86's
    VNNI instructions compute natively)? Recent versions do (2.13 does); older ones raise. Used on x86
    only, where it was measured: one decode step of bench-small, 2 threads, 10.3 ms against 13.6 for
    int8 x int8."""
    if not X86:
        return False
    try:
        a, b = torch.full((1, 32), 200, dtype=torch.uint8), torch.full((32, 16), -3, dtype=torch.int8)
        return torch.equal(torch._int_mm(a, b), torch.full((1, 16), -19200, dtype=torch.int32))
    except RuntimeError:
        return False


SHIFTED_MAX_IN = 2**31 // (255 * 127)  # u8 x s8 sums over more inputs than this could overflow int32


def linear_int8_dynamic_reference(x: Tensor, q: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference: the rows of x rounded to int8 levels, then a plain fp32 F.linear on the dequantized
    weight; the result in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_rows_int8(x2)
    y = F.linear(xq.float() * xs, dequantize_int8(q, scales)).view(*x.shape[:-1], q.shape[0])
    y = y.to(x.dtype)
    return y + bias if bias is not None else y


def linear_int8_dynamic(
    x: Tensor, q: Tensor, scales: Tensor, bias: Tensor | None = None, shifted_sums: Tensor | None = None
) -> Tensor:
    """x (..., in) with its rows quantized to int8, @ (q * scales).T: `torch._int_mm` (int32, exact) on
    the CPU, then scaled in fp32; the reference elsewhere.

    With `shifted_sums` = 128 * q.sum(1) (int32 (out,), see `shifted_row_sums`), the rows go in as
    uint8 (xq + 128) and the shift is taken back exactly: sum (xq + 128) q - 128 sum q = sum xq q.
    """
    if x.device.type != "cpu":
        return linear_int8_dynamic_reference(x, q, scales, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if shifted_sums is None:
        xq, xs = quantize_rows_int8(x2)  # (m, in) int8, (m, 1)
        acc = torch._int_mm(xq, q.t())  # (m, out) int32
    else:
        xq, xs = quantize_rows_int8(x2, shift=True)  # (m, in) uint8
        acc = torch._int_mm(xq, q.t()).sub_(shifted_sums)  # (m, out) int32, the same sums
    y = torch.mul(acc, xs).mul_(scales)  # (m, out) fp32
    y = y.view(*x.shape[:-1], q.shape[0]).to(x.dtype)
    return y + bias if bias is not None else y


def shifted_row_sums(q: Tensor) -> Tensor | None:
    """128 * q.sum(1) as int32 (out,), where `linear_int8_dynamic` can use uint8 rows with this q (CPU,
    `int_mm_takes_uint8()`, at most SHIFTED_MAX_IN inputs); else None."""
    if q.device.type != "cpu" or q.shape[1] > SHIFTED_MAX_IN or not int_mm_takes_uint8():
        return None
    sums = torch.empty(q.shape[0], dtype=torch.int32)
    step = max(1, (1 << 22) // q.shape[1])  # rows per block: the int32 temporary stays <= 16 MB
    for i in range(0, q.shape[0], step):
        torch.sum(q[i : i + step], dim=1, dtype=torch.int32, out=sums[i : i + step])
    return sums.mul_(128)


# ----- int4: per group of input columns ---------------------------------------------------------------------
@_one_thread
def quantize_int4(w: Tensor, group_size: int = 128) -> tuple[Tensor, Tensor]:
    """w (out, in) float -> (packed uint8 (out', in/2) in the CPU int4 layout, scales_and_zeros bf16
    (in/g, out', 2)), with w ~ (q - 8) * scale + zero per group; out' is out rounded up to a multiple
    of 64 (zero rows). Computed `quantize_blocks` rows at a time (blocks of 64 rows pack alone)."""
    n, k = w.shape
    n += -n % INT4_BLOCK_N  # zero rows up to a multiple of 64 (their outputs are dropped)
    _check_int4_shape(n, k, group_size)
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=w.device)
    sz = torch.empty(k // group_size, n, 2, dtype=torch.bfloat16, device=w.device)  # (groups, out, 2)
    for r0, r1, blk in quantize_blocks(w, INT4_BLOCK_N):
        wg = blk.view(r1 - r0, k // group_size, group_size)  # (rows, groups, g)
        lo, hi = wg.amin(-1), wg.amax(-1)  # (rows, groups)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.bfloat16)
        zero = (lo + 8.0 * scale.float()).to(torch.bfloat16)  # the value of q = 8
        q = wg.sub_(zero.float()[..., None]).div_(scale.float()[..., None]).add_(8.0).round_().clamp_(0, 15)
        packed[r0:r1] = pack_int4(q.view(r1 - r0, k).to(torch.uint8))
        sz[:, r0:r1, 0], sz[:, r0:r1, 1] = scale.t(), zero.t()
    return packed, sz


def quantize_int4_reference(w: Tensor, group_size: int = 128) -> tuple[Tensor, Tensor]:
    """Reference: `quantize_int4` on the whole weight at once (fp32 temporaries of its size)."""
    n, k = w.shape
    pad = -n % INT4_BLOCK_N
    _check_int4_shape(n + pad, k, group_size)
    wg = F.pad(w.float(), (0, 0, 0, pad)).view(n + pad, k // group_size, group_size)  # (out, groups, g)
    lo, hi = wg.amin(-1), wg.amax(-1)  # (out, groups)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.bfloat16)
    zero = (lo + 8.0 * scale.float()).to(torch.bfloat16)
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None] + 8.0).clamp(0, 15)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (groups, out, 2)
    return pack_int4(q.to(torch.uint8).view(n + pad, k)), sz


def pack_int4(q: Tensor) -> Tensor:
    """q (out, in) values 0..15 -> uint8 (out, in/2) in the blocked layout described in the module doc."""
    n, k = q.shape
    qb = q.to(torch.uint8).view(n // INT4_BLOCK_N, 2, 32, k)  # (nb, half, j, k): row 64 nb + 32 half + j
    packed = qb[:, 0] | (qb[:, 1] << 4)  # (nb, j, k)
    return packed.transpose(1, 2).contiguous().view(n, k // 2)  # (nb, k, j) -> (out, in/2)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: uint8 (out, in/2) -> q uint8 (out, in)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    p = packed.view(n // INT4_BLOCK_N, k, 32)  # (nb, k, j)
    q = torch.stack([p & 15, p >> 4], dim=1)  # (nb, half, k, j)
    return q.transpose(2, 3).reshape(n, k)  # (nb, half, j, k) -> (out, in)


def dequantize_int4(
    packed: Tensor, sz: Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    q = unpack_int4(packed)  # (out, in)
    n, k = q.shape
    scale = sz[..., 0].float().t()[..., None]  # (out, groups, 1)
    zero = sz[..., 1].float().t()[..., None]
    w = (q.view(n, k // group_size, group_size).float() - 8.0) * scale + zero
    return w.view(n, k).to(dtype)


@_one_thread
def dequantize_int4_blocked(
    packed: Tensor, sz: Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """`dequantize_int4` bit for bit, blocks of rows (multiples of 64, which unpack alone) through one
    fp32 buffer: what a prompt's int4 layers spend most of their time on (benchmarks/README.md, issue 19)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    groups = k // group_size
    scale = sz[..., 0].t().float().contiguous()[..., None]  # (out, groups, 1)
    zero = sz[..., 1].t().float().contiguous()[..., None]
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    rows = max(INT4_BLOCK_N, QUANTIZE_BLOCK // k // INT4_BLOCK_N * INT4_BLOCK_N)
    buf = torch.empty(min(rows, n), k, dtype=torch.float32, device=packed.device)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        blk = buf[: r1 - r0].view(r1 - r0, groups, group_size)  # (rows, groups, g)
        blk.copy_(unpack_int4(packed[r0:r1]).view(r1 - r0, groups, group_size))
        out[r0:r1] = blk.sub_(8.0).mul_(scale[r0:r1]).add_(zero[r0:r1]).view(r1 - r0, k)
    return out


def linear_int4_reference(
    x: Tensor, packed: Tensor, sz: Tensor, group_size: int, bias: Tensor | None = None, out: int | None = None
) -> Tensor:
    """Reference: dequantize, then a plain F.linear in x's dtype; the first `out` outputs (default all)."""
    w = dequantize_int4(packed, sz, group_size, x.dtype)
    return F.linear(x, w[:out], bias)


def linear_int4_q8_reference(
    x: Tensor, packed: Tensor, sz: Tensor, group_size: int, bias: Tensor | None = None, out: int | None = None
) -> Tensor:
    """Reference of the int4 decode kernel (`kernels.int4`): the rows of x rounded to int8 per block of
    32 (`kernels.quantize_blocks`), then a plain fp32 F.linear on the dequantized weight; the first `out`
    outputs (default all), in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
    q, s = kernels.quantize_blocks(x2)  # (rows, in / 32, 32), (rows, in / 32, 1)
    y = F.linear((q * s).view(x2.shape), dequantize_int4(packed, sz, group_size)[:out])  # (rows, out)
    y = y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)
    return y + bias if bias is not None else y


def linear_int4(
    x: Tensor, packed: Tensor, sz: Tensor, group_size: int, bias: Tensor | None = None, out: int | None = None
) -> Tensor:
    """x (..., in) @ dequant(packed)[:out].T: on the CPU, any number of rows through the int4 kernel
    where `takes_kernel` says (activations rounded to int8 per block of 32: see `linear_int4_q8_reference`;
    its integer products outrun dequantizing + an fp32 GEMM at every row count measured, prompts
    included), else PyTorch's CPU int4 kernel (bf16 activations) for few rows where this CPU's kernel uses
    our layout, else the dequantized weight through `dense_linear` (on other devices: the reference)."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu":
        return linear_int4_reference(x, packed, sz, group_size, bias, out)
    if takes_kernel(x, packed, bias, any_rows=True):
        if sz.dtype != torch.bfloat16:  # a model cast after quantizing
            sz = sz.to(torch.bfloat16)
        b = bias.float() if bias is not None and bias.dtype != torch.float32 else bias
        y = kernels.int4(x.reshape(rows, x.shape[-1]).float(), packed, sz.contiguous(), group_size, b, out)
        return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)
    if rows > INT4_KERNEL_MAX_ROWS or not int4_kernel_layout_matches():  # dequantize, fastest dense GEMM
        return dense_linear(x, _dequantized_int4(packed, sz, group_size, x.dtype, out), bias)
    # the kernel needs dense bf16 rows
    x2 = x.reshape(rows, x.shape[-1]).to(torch.bfloat16).contiguous()
    if sz.dtype != torch.bfloat16:  # a model cast after quantizing
        sz = sz.to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, sz)
    if out is not None and out < y.shape[1]:
        y = y[:, :out]  # drop the padding rows
    y = y.reshape(*x.shape[:-1], y.shape[1]).to(x.dtype)
    return y + bias if bias is not None else y


def _dequantized_int4(
    packed: Tensor, sz: Tensor, group_size: int, dtype: torch.dtype, out: int | None
) -> Tensor:
    """dequantize_int4(...)[:out] in `dtype`: through `kernels.int4_dequantize` (the same values, about 6x
    faster) where the kernels are built and the tensors are plain contiguous CPU ones."""
    if (
        kernels.available()
        and sz.dtype == torch.bfloat16
        and packed.is_contiguous()
        and sz.is_contiguous()
        and packed.device.type == "cpu"
    ):
        return kernels.int4_dequantize(packed, sz, group_size, out).to(dtype)
    return dequantize_int4_blocked(packed, sz, group_size, dtype)[:out]


@functools.cache
def int4_kernel_layout_matches() -> bool:
    """Does this CPU's `_convert_weight_to_int4pack_for_cpu` produce `pack_int4`'s layout? (The packing
    depends on the CPU's vector width; where it differs, int4 layers take the reference path.)"""
    try:
        q = torch.randint(0, 16, (2 * INT4_BLOCK_N, 256), generator=torch.Generator().manual_seed(0))
        ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        return torch.equal(ref, pack_int4(q))
    except (RuntimeError, AttributeError):
        return False


def _check_int4_group_size(group_size: Any) -> None:
    if type(group_size) is not int or group_size not in INT4_GROUP_SIZES:
        raise ValueError(
            f"group_size={group_size!r}: expected one of {INT4_GROUP_SIZES} (the CPU int4 kernel's sizes)"
        )


def _check_int4_shape(n: int, k: int, group_size: int) -> None:
    _check_int4_group_size(group_size)
    if n % INT4_BLOCK_N or k % group_size:
        raise ValueError(
            f"int4 weight (out={n}, in={k}): out must be a multiple of {INT4_BLOCK_N}, in a multiple of "
            f"group_size={group_size}"
        )


# ----- modules --------------------------------------------------------------------------------------------
def _aligned(t: Tensor) -> Tensor:
    """`t` itself if its data is 64-byte aligned, else an aligned copy. The packed kernels crash on weights
    that are not 16-byte aligned, and a memory-mapped safetensors file only aligns tensors to 8 bytes.
    (Files we save start their tensor data 64-byte aligned, so most of their tensors need no copy.)"""
    if t.device.type != "cpu" or t.data_ptr() % 64 == 0:
        return t
    copy = torch.empty(t.numel() * t.element_size() + 64, dtype=torch.uint8)
    start = (-copy.data_ptr()) % 64
    out = copy[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    return out.copy_(t)


def _align_buffers(module: nn.Module, *names: str) -> None:
    """Replace the named tensors of `module` by 64-byte aligned copies where they are not (once)."""
    buffers = module._buffers  # a dict lookup: this runs on every decode step
    for name in names:
        if buffers[name].data_ptr() % 64:
            buffers[name] = _aligned(buffers[name])


def _frozen_bias(linear: nn.Linear) -> nn.Parameter | None:
    return None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)


class Int8WeightOnlyLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: Any = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype)
        mod.weight, mod.scales = quantize_int8(w)
        mod.bias = _frozen_bias(linear)
        return mod

    def forward(self, x: Tensor) -> Tensor:
        _align_buffers(self, "weight")
        return linear_int8(x, self.weight, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int8DynamicActivationInt8WeightLinear(Int8WeightOnlyLinear):
    """The tensors of `Int8WeightOnlyLinear`; inputs are quantized to int8 per row on the fly.

    It keeps `shifted_row_sums(weight)` and the scales in fp32 (not saved), computed on first use for the
    tensors it sees and dropped when a state_dict is loaded; change the tensors only through
    `load_state_dict`."""

    _derived: tuple | None = None  # (weight and scales data_ptr, shifted row sums, fp32 scales)

    def forward(self, x: Tensor) -> Tensor:
        w, s = self.weight, self.scales
        key = (w.data_ptr(), s.data_ptr())
        if self._derived is None or self._derived[0] != key:
            self._derived = (key, shifted_row_sums(w), s.float())
        _, sums, scales = self._derived
        return linear_int8_dynamic(x, w, scales, self.bias, sums)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._derived = None

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8 dynamic activations"


class Int4WeightOnlyLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = 128,
        device: Any = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        rows = out_features + (-out_features % INT4_BLOCK_N)  # padded with zero rows to a multiple of 64
        _check_int4_shape(rows, in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty(rows, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "scales_and_zeros",
            torch.empty(in_features // group_size, rows, 2, dtype=torch.bfloat16, device=device),
        )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4WeightOnlyLinear:
        w = linear.weight.detach()
        mod = cls(
            linear.in_features, linear.out_features, linear.bias is not None, group_size, w.device, w.dtype
        )
        mod.weight, mod.scales_and_zeros = quantize_int4(w, group_size)
        mod.bias = _frozen_bias(linear)
        return mod

    def forward(self, x: Tensor) -> Tensor:
        _align_buffers(self, "weight", "scales_and_zeros")
        return linear_int4(
            x, self.weight, self.scales_and_zeros, self.group_size, self.bias, self.out_features
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}"
        )


INT8_MODULES = {METHODS[0]: Int8WeightOnlyLinear, METHODS[2]: Int8DynamicActivationInt8WeightLinear}


# ----- whole models ---------------------------------------------------------------------------------------
def quantized_names(model: nn.Module, method: str, group_size: int) -> list[str]:
    """Names of the Linear layers `method` quantizes (a tied lm_head stays: it is the embedding)."""
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or is_tied_lm_head(model, name):
            continue
        if method == "int4_weight_only" and mod.in_features % group_size:
            continue
        names.append(name)
    return names


def check_method(method: str | None, group_size: Any, where: str) -> str | None:
    """`method` as one of METHODS (short names allowed; None stays None), refused otherwise, and
    `group_size` checked: int4 only, one of INT4_GROUP_SIZES. `where` names the caller in the errors."""
    name = SHORT_NAMES.get(method, method) if method is not None else None
    if name is not None and name not in METHODS:
        raise ValueError(f"quantization={name!r}: expected one of {METHODS} or {tuple(SHORT_NAMES)}")
    if group_size is not None:
        if name != "int4_weight_only":
            raise TypeError(
                f"{where}: group_size={group_size!r} applies to quantization='int4_weight_only' only; "
                f"found quantization={method!r}"
            )
        _check_int4_group_size(group_size)
    return name


def quantize(
    model: nn.Module,
    method: str = "int8_weight_only",
    group_size: int | None = None,
    on_quantized: Callable[[str], None] | None = None,
) -> nn.Module:
    """Quantize `model`'s Linear layers in place and record `model.quantization_config`. `method` is one
    of METHODS or its short name (SHORT_NAMES: "int8", "int4", "int8dq"); `group_size` (int4): 128 when
    None. A model already quantized the same way (group size None: any) is returned as it is.
    `on_quantized(name)` runs after each layer (the loader releases the layer's memory-mapped weight
    there, so that the float weights do not all stay in memory beside the quantized ones). The heap the
    quantizer freed is then given back to the system (`bamba.runtime.release_free_memory`)."""
    method = check_method(method, group_size, "quantize")
    packed = [name for name, mod in model.named_modules() if isinstance(mod, PackedLinear)]
    if packed:
        raise ValueError(
            f"quantize: {len(packed)} layers (e.g. {packed[0]}) hold packed weights (pack=True); load the "
            "model without pack to quantize it"
        )
    done = getattr(model, "quantization_config", None)
    if done is not None:
        same_groups = method != "int4_weight_only" or group_size in (None, done.get("group_size"))
        if done.get("format") != method or not same_groups:

            def named(fmt: Any, groups: Any) -> str:
                return f"{fmt} (group_size={groups})" if groups is not None else str(fmt)

            raise ValueError(
                f"model is already quantized as {named(done.get('format'), done.get('group_size'))}; cannot "
                f"quantize again as {named(method, group_size if method == 'int4_weight_only' else None)}"
            )
        return model  # already done: nothing to do
    group_size = 128 if group_size is None else group_size
    names = quantized_names(model, method, group_size)
    with torch.no_grad():
        for name in names:
            linear = model.get_submodule(name)
            if method == "int4_weight_only":
                replace_module(model, name, Int4WeightOnlyLinear.from_linear(linear, group_size))
            else:
                replace_module(model, name, INT8_MODULES[method].from_linear(linear))
            if on_quantized is not None:
                on_quantized(name)
    if names:
        release_free_memory()  # the quantizer's freed temporaries (about 1 GB for bench-small's int8)
    model.quantization_config = {
        "quant_method": "bamba",
        "format": method,
        "group_size": group_size if method == "int4_weight_only" else None,
        "modules": names,
        "version": 1,
    }
    return model


def prepare_quantized(model: nn.Module, meta: dict) -> nn.Module:
    """Before loading a saved quantized model: swap the named Linear layers for empty quantized ones
    (on the Linear's device, e.g. `meta`), so the checkpoint's tensors are assigned to them."""
    method = meta.get("format")
    if meta.get("quant_method") != "bamba" or method not in METHODS:
        raise ValueError(
            f"quantization_config.json: unsupported {meta!r}; expected quant_method 'bamba' and "
            f"format one of {METHODS}"
        )
    group_size = meta.get("group_size") or 128
    for name in meta["modules"]:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"quantization_config.json names module {name!r}, which the model lacks"
            ) from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantization_config.json: {name!r} is a {type(linear).__name__}, not a Linear")
        dev, dtype, bias = linear.weight.device, linear.weight.dtype, linear.bias is not None
        if method == "int4_weight_only":
            mod = Int4WeightOnlyLinear(linear.in_features, linear.out_features, bias, group_size, dev, dtype)
        else:
            mod = INT8_MODULES[method](linear.in_features, linear.out_features, bias, dev, dtype)
        replace_module(model, name, mod)
    model.quantization_config = dict(meta)
    return model
