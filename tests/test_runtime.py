"""bamba.runtime: the allocator setting keeps large temporaries in the heap for reuse."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A block above glibc's largest adaptive mmap threshold (32 MiB on 64-bit), allocated and freed at once,
# then where it was: default glibc serves it with a mapping of its own and unmaps it at free; tuned, it
# comes from the heap, and the heap keeps it after the free (it is under the trim threshold).
CHILD = """
import ctypes, importlib.util, sys

spec = importlib.util.spec_from_file_location("runtime", sys.argv[1])  # the module alone: no torch import
runtime = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runtime)

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 48 << 20

def heap_after_a_freed_block():
    address = libc.malloc(SIZE)
    libc.free(address)
    with open("/proc/self/maps") as f:
        heap = [line.split()[0] for line in f if line.rstrip().endswith("[heap]")]
    lo, hi = (int(v, 16) for v in heap[0].split("-")) if heap else (0, 0)
    return lo <= address and address + SIZE <= hi

untuned = heap_after_a_freed_block()
applied = runtime.tune_cpu_allocator()
print(applied, untuned, heap_after_a_freed_block())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_tuned_allocator_keeps_large_blocks_in_the_heap():
    import bamba.runtime

    child = [sys.executable, "-c", CHILD, bamba.runtime.__file__]
    out = subprocess.run(child, capture_output=True, text=True, check=True)
    applied, untuned, tuned = out.stdout.split()
    if applied != "True":
        pytest.skip("the C library is not glibc")
    assert untuned == "False"  # glibc's defaults: mapped apart, unmapped at free
    assert tuned == "True"  # tuned: served from the heap, and still there after the free
