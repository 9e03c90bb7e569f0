"""Exact prefix-state caching for a hybrid model: snapshots of whole row states, keyed by token prefix.

A Mamba layer's state cannot be cut back to a shorter prefix (unlike attention keys/values), so the
cache keeps whole snapshots (conv window + SSM state + keys/values) taken at the points where a later
prompt may diverge: chunk boundaries of a prefill, the end of each prompt, the end of each reply. A
lookup returns the longest stored prefix of a prompt; least-recently-used snapshots leave first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor

from .cache import RowState


@dataclass
class Snapshot:
    """The state after `tokens`, and the logits (vocab,) fp32 that predict the next token."""

    tokens: tuple[int, ...]
    state: RowState
    logits: Tensor

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.logits.numel() * self.logits.element_size() + 8 * len(self.tokens)


def prefix_hashes(tokens: list[int] | tuple[int, ...]) -> list[int]:
    """h[i]: a hash of tokens[:i], computed in one pass (h[0] is the empty prefix's)."""
    h = [0]
    for t in tokens:
        h.append(hash((h[-1], t)))
    return h


class PrefixCache:
    """Snapshots by token prefix, at most `capacity_bytes` in all (0: caching off). Thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[tuple[int, int], Snapshot] = OrderedDict()  # (length, hash) -> snapshot
        self._lengths: dict[int, int] = {}  # length -> number of entries of that length
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: list[int], max_length: int | None = None) -> Snapshot | None:
        """The longest stored prefix of `tokens` (at most `max_length` tokens long), or None."""
        if not self.capacity_bytes:
            return None
        limit = len(tokens) if max_length is None else min(max_length, len(tokens))
        h = prefix_hashes(tokens[:limit])
        with self._lock:
            for length in sorted((n for n in self._lengths if n <= limit), reverse=True):
                key = (length, h[length])
                snap = self._entries.get(key)
                if snap is not None and list(snap.tokens) == tokens[:length]:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return snap
            self.misses += 1
            return None

    def insert(self, tokens: list[int] | tuple[int, ...], state: RowState, logits: Tensor) -> bool:
        """Keep a snapshot (the caller hands over `state` and `logits`); False when it cannot fit."""
        snap = Snapshot(tuple(tokens), state, logits)
        if not self.capacity_bytes or snap.nbytes > self.capacity_bytes or not tokens:
            return False
        key = (len(tokens), prefix_hashes(tokens)[-1])
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
            while self.bytes + snap.nbytes > self.capacity_bytes:
                self._evict_oldest()
            self._entries[key] = snap
            self._lengths[key[0]] = self._lengths.get(key[0], 0) + 1
            self.bytes += snap.nbytes
        return True

    def longest_shared_prefix(self, tokens: list[int]) -> int:
        """The longest prefix that `tokens` shares with the tokens of any snapshot (0 if none)."""
        with self._lock:
            stored = [snap.tokens for snap in self._entries.values()]
        best = 0
        for other in stored:
            lo, hi = best, min(len(other), len(tokens))  # the answer for this one is in [lo, hi]
            if hi <= best or list(other[:lo]) != tokens[:lo]:
                continue
            while lo < hi:  # binary search on "the first m tokens agree" (slices compare in C)
                m = (lo + hi + 1) // 2
                if list(other[:m]) == tokens[:m]:
                    lo = m
                else:
                    hi = m - 1
            best = lo
        return best

    def contains(self, tokens: list[int] | tuple[int, ...]) -> bool:
        key = (len(tokens), prefix_hashes(tokens)[-1])
        with self._lock:
            return key in self._entries

    def _evict_oldest(self) -> None:
        key, snap = self._entries.popitem(last=False)
        self.bytes -= snap.nbytes
        self._lengths[key[0]] -= 1
        if not self._lengths[key[0]]:
            del self._lengths[key[0]]
