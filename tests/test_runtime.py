"""bamba.runtime: the allocator setting keeps large temporaries from being page-faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import resource
import torch
from bamba.runtime import tune_cpu_allocator
applied = tune_cpu_allocator()
def step():  # three 16 MB temporaries alive at once, as in a chain of ops on a big tensor
    a = torch.empty(4 << 20).fill_(1.0)
    b = a * 2
    return (b + a).sum()
step()  # the first step faults its pages in; count the faults of 20 more
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _tuned_faults() -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_tuned_allocator_reuses_large_blocks():
    applied, tuned = _tuned_faults()
    if applied != "True":
        pytest.skip("the C library is not glibc")
    pages = (16 << 20) // 4096  # faults to touch one 16 MB block
    # Tuned: the heap grows at most once more, then its blocks are reused (measured: 0 to 3 blocks' pages).
    # glibc's default gives the blocks back after steps and faults them in again: measured 60 blocks'
    # pages in most runs, 7 in a few (its thresholds adapt), never fewer than 6.
    assert tuned <= 4 * pages, tuned
