"""Process-level settings for running on CPUs, applied by the command line and the benchmark workers.

`tune_cpu_allocator()`: PyTorch takes every large temporary from malloc. glibc serves blocks above its
mmap threshold (128 KB to start) with a fresh mapping, and gives the top of its heap back to the system
above its trim threshold, so the tens-of-MB temporaries of a prompt (a dequantized layer, a chunk's
decay matrix, an MLP activation) are page-faulted in again by every op that makes one. Raising both
thresholds keeps freed blocks for reuse (prompts run faster: benchmarks/README.md). The cost: up to
`trim_threshold` bytes of freed memory stay with the process.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def tune_cpu_allocator(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Raise glibc's mmap and trim thresholds (bytes) for this process; see the module doc.

    Returns whether they were set: False off Linux, or where the C library is not glibc (e.g. musl).
    """
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def release_free_memory() -> bool:
    """Give the C heap's free memory back to the system (glibc's malloc_trim), e.g. after a load made and
    freed large temporaries that the process will not need again. Returns whether it was done: False off
    Linux, where the C library is not glibc, or when nothing could be released."""
    malloc_trim = _glibc("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


def _glibc(name: str) -> Any:
    """glibc's function `name`, or None off Linux or where the C library is not glibc (e.g. musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None
