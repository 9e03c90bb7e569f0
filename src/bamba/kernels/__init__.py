"""C++ decode kernels for x86 CPUs: a few input rows by a large weight, each weight read once from memory.

- `dense(x, w, scales, bias)`: y = x @ (w * scales[:, None]).T + bias for fp32, bf16 or int8 weights (N, K),
  fp32 input rows (M, K): the weights are converted to fp32 in registers, products and sums in fp32.
  bf16 rows by bf16 weights take AVX512-BF16's pair products where the CPU has them (the same exact
  products, summed in fp32), else the same rows in fp32. On the AVX-512 paths, int8 weights take VNNI's
  integer dot products instead: each input row is split into two int8 parts (`split_rows`), which
  round it by at most 1.5e-5 of its largest value (bf16 rounds each value by up to 2e-3 of itself).
- `int4(x, packed, sz, group_size, bias, out)`: the int4 weights of `bamba.quantize` (PyTorch's CPU int4
  layout) by the input rows quantized to int8 per block of 32 (`quantize_blocks`), as llama.cpp's q4_0 x
  q8_0 dot products: sums of integer products, exact, VNNI on AVX-512.

Both take any number of rows; they pay where the weights are read once for all rows (decoding, up to
`MAX_ROWS`). Built at first use (gemv.cpp and gemv_isa.h, no PyTorch headers: a few seconds, cached by
torch.utils.cpp_extension under TORCH_EXTENSIONS_DIR) and called through ctypes. Each instruction set
has its own path: `isa()` picks the best one this CPU runs (4: 3 with AMX tiles, which take bf16 and int8
weights from 3 rows on, 3: AVX-512 with VNNI, VBMI and BF16, 2: the same without BF16, 1: AVX2 with FMA); `available()` is False where there is no x86 CPU, no compiler, or BAMBA_KERNELS=0 (BAMBA_KERNELS=avx2
keeps to the AVX2 path). References in plain PyTorch: `dense_reference` here, `linear_int4_q8_reference`
in bamba.quantize; tests/test_kernels.py compares them on every path the machine runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform

import torch
import torch.nn.functional as F
from torch import Tensor

HERE = os.path.dirname(os.path.abspath(__file__))
X86 = platform.machine().lower() in ("x86_64", "amd64")
SOURCES = ("gemv.cpp", "gemv_isa.h")
ISA_NAMES = {1: "avx2", 2: "avx512", 3: "avx512bf16", 4: "amx"}
MAX_ROWS = 16  # the modules send up to this many input rows to the kernels (decoding)
BLOCK = 32  # input values per int8 scale in `int4`
WTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
PARALLEL_MIN_BYTES = 2**16  # weights smaller than this are read by one thread
SPLIT_MAX_IN = 65536  # int8 weights with more inputs keep fp32 rows (255 * 127 * K must fit in int32)
STATUS: list[str] = []  # why the kernels are off, or what was built (for reports)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None where they cannot be (see the module doc)."""
    if os.environ.get("BAMBA_KERNELS", "1") == "0":
        STATUS.append("off (BAMBA_KERNELS=0)")
        return None
    if not X86:
        STATUS.append(f"off (not x86: {platform.machine()})")
        return None
    digest = hashlib.sha256()
    for name in SOURCES:
        with open(os.path.join(HERE, name), "rb") as f:
            digest.update(f.read())
    try:
        from torch.utils import cpp_extension

        path = cpp_extension.load(
            name=f"bamba_kernels_{digest.hexdigest()[:12]}",  # a new build whenever a source changes
            sources=[os.path.join(HERE, "gemv.cpp")],
            extra_include_paths=[HERE],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
        lib = ctypes.CDLL(path)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: the PyTorch paths
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        STATUS.append(f"not built ({type(e).__name__}: {first_line})")
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bamba_isa.restype = i32
    lib.bamba_dense.argtypes = [i32, i32, p, i32, i64, i64, p, i64, p, p, p, i32]
    lib.bamba_dense.restype = i32
    lib.bamba_q4.argtypes = [i32, p, i64, i64, p, i64, p, i64, p, p, i64, i32]
    lib.bamba_q4.restype = i32
    lib.bamba_q4_dequantize.argtypes = [p, i64, i64, p, i64, p, i64, i32]
    lib.bamba_q4_dequantize.restype = i32
    lib.bamba_read.argtypes = [i32, p, i64, i32]
    lib.bamba_read.restype = ctypes.c_double
    STATUS.append(f"built: {path}")
    return lib


@functools.cache
def supported_isas() -> tuple[int, ...]:
    """The kernel paths this CPU runs (best last), () without the kernels."""
    lib = _library()
    return tuple(range(1, lib.bamba_isa() + 1)) if lib is not None else ()


@functools.cache
def isa() -> int:
    """The path the modules take: the best this CPU runs (BAMBA_KERNELS=avx2: at most AVX2); 0 if none."""
    isas = supported_isas()
    if os.environ.get("BAMBA_KERNELS") == "avx2":
        isas = [i for i in isas if i <= 1]
    return isas[-1] if isas else 0


def available() -> bool:
    return isa() > 0


def _path(chosen: int | None) -> int:
    """`chosen`, checked against the paths this CPU runs; `isa()` when None."""
    if chosen is None:
        return isa()
    if chosen not in supported_isas():
        raise RuntimeError(f"bamba.kernels: isa={chosen} is not one this CPU runs ({supported_isas()})")
    return chosen


def threads_for(nbytes: int) -> int:
    """Threads for a product reading `nbytes` of weights: PyTorch's, or 1 below `PARALLEL_MIN_BYTES`
    (starting the other threads costs more than they save there)."""
    return torch.get_num_threads() if nbytes >= PARALLEL_MIN_BYTES else 1


def dense(
    x: Tensor, w: Tensor, scales: Tensor | None = None, bias: Tensor | None = None, isa: int | None = None
) -> Tensor:
    """x (M, K) fp32 @ (w * scales[:, None]).T + bias -> (M, N) fp32, for w (N, K) fp32, bf16 or int8
    (contiguous CPU tensors), scales (N,) bf16 (int8 weights only), bias (N,) fp32; x may be bf16 where
    w is. `isa`: the path (default `isa()`). Reference: `dense_reference`."""
    m, k = x.shape
    n = w.shape[0]
    x_bf16 = x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
    x = x.contiguous() if x_bf16 else x.float().contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    rc = _library().bamba_dense(
        _path(isa), WTYPES[w.dtype], x.data_ptr(), x_bf16, m, k, w.data_ptr(), n,
        None if scales is None else scales.data_ptr(), None if bias is None else bias.data_ptr(),
        y.data_ptr(), threads_for(w.numel() * w.element_size()),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"bamba_dense returned {rc} for w {w.dtype} {tuple(w.shape)}")
    return y


def dense_reference(
    x: Tensor, w: Tensor, scales: Tensor | None = None, bias: Tensor | None = None, isa: int | None = None
) -> Tensor:
    """`dense` on the path `isa` (default `isa()`) in plain PyTorch (fp32): the rows of int8 weights rounded
    by `split_rows` on the AVX-512 paths (at most `SPLIT_MAX_IN` inputs)."""
    wf = w.float() if scales is None else w.float() * scales.float()[:, None]
    isa = globals()["isa"]() if isa is None else isa
    if w.dtype == torch.int8 and isa >= 2 and x.shape[-1] <= SPLIT_MAX_IN:
        x = split_rows(x)
    return F.linear(x.float(), wf, bias)


def split_rows(x: Tensor) -> Tensor:
    """How `dense` rounds the input rows (M, K) of int8 weights on the AVX-512 paths, in PyTorch: per row,
    s = max |x| / 127, h = round(x / s), l = round(254 (x / s - h)) (both in -127..127; zero rows stay
    zero), and the rows become s (h + l / 254) (fp32)."""
    x = x.float()
    s = x.abs().amax(-1, keepdim=True) / 127.0  # (M, 1)
    v = x / torch.where(s > 0, s, 1.0)
    h = v.round()
    return (h + ((v - h) * 254.0).round() / 254.0) * s


def int4(
    x: Tensor,
    packed: Tensor,
    sz: Tensor,
    group_size: int,
    bias: Tensor | None = None,
    out: int | None = None,
    isa: int | None = None,
) -> Tensor:
    """x (M, K) fp32, its rows quantized by `quantize_blocks`, @ the int4 weight `packed` (N / 64, K, 32)
    with `sz` (K / g, N, 2) bf16 (bamba.quantize's format), dequantized, [:out].T + bias -> (M, out) fp32.
    Reference: bamba.quantize.linear_int4_q8_reference."""
    m, k = x.shape
    n = packed.shape[0]
    out = n if out is None else out
    x = x.contiguous()
    y = torch.empty(m, out, dtype=torch.float32)
    rc = _library().bamba_q4(
        _path(isa), x.data_ptr(), m, k, packed.data_ptr(), n, sz.data_ptr(), group_size,
        None if bias is None else bias.data_ptr(), y.data_ptr(), out, threads_for(packed.numel()),
    )  # fmt: skip
    if rc:
        raise RuntimeError(
            f"bamba_q4 returned {rc} for weight {tuple(packed.shape)}, in={k}, group_size={group_size}"
        )
    return y


def int4_dequantize(packed: Tensor, sz: Tensor, group_size: int, out: int | None = None) -> Tensor:
    """The first `out` rows (default all) of the int4 weight `packed` with `sz` (bamba.quantize's format),
    dequantized: (out, K) fp32, for prompts (reference: bamba.quantize.dequantize_int4)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    out = n if out is None else out
    w = torch.empty(out, k, dtype=torch.float32)
    rc = _library().bamba_q4_dequantize(
        packed.data_ptr(), n, k, sz.data_ptr(), group_size, w.data_ptr(), out, torch.get_num_threads()
    )
    if rc:
        raise RuntimeError(
            f"bamba_q4_dequantize returned {rc} for weight {tuple(packed.shape)}, group_size={group_size}"
        )
    return w


def quantize_blocks(x: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """How `int4` rounds its input rows, in PyTorch: x (M, K) fp32 -> (q (M, K / block, block) with
    integer values in -127..127 as fp32, scales (M, K / block, 1)), x ~ q * scales; per block
    scale = max |x| / 127 and q = round(x / scale) (half to even), q = 0 where the block is all zeros."""
    xb = x.float().reshape(x.shape[0], -1, block)  # (M, K / block, block)
    scale = xb.abs().amax(-1, keepdim=True) / 127.0  # (M, K / block, 1)
    q = torch.where(scale > 0, xb / scale, 0.0).round()
    return q, scale


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 5, threads: int | None = None) -> float:
    """Memory read bandwidth (bytes/s): the best of `reps` passes of the kernels' widest loads over
    `nbytes` (far more than any cache) on `threads` threads (default PyTorch's); 0.0 without kernels."""
    import time

    if not available():
        return 0.0
    nt = threads or torch.get_num_threads()
    buf = torch.ones(nbytes // 4 + 16)
    start = (-buf.data_ptr()) % 64  # 64-byte aligned, a multiple of 256 bytes per thread
    size = (nbytes - start) // (256 * nt) * 256 * nt
    lib, best = _library(), float("inf")
    for _ in range(reps + 1):  # the first pass warms up
        t = time.perf_counter()
        lib.bamba_read(isa(), buf.data_ptr() + start, size, nt)
        best = min(best, time.perf_counter() - t)
    return size / best
