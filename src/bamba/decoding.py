"""The two model calls every decoder makes: prefill a prompt into a cache, and advance rows by one token.

`generate`, beam search, the server's engine, evaluation and the benchmarks all decode through these, so
a change to how the cache is fed is made once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .cache import HybridMambaAttentionDynamicCache


def prefill(
    model: Any,
    ids: Tensor,
    cache: HybridMambaAttentionDynamicCache,
    mask: Tensor | None = None,
    chunk: int | None = None,
) -> Tensor:
    """Run ids (b, l) through `cache` (in pieces of `chunk` tokens if given); the last position's logits
    (b, vocab). `mask` (b, past + l) marks real tokens (1) and left padding (0)."""
    if not chunk or ids.shape[1] <= chunk:
        return model(
            ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1
        ).logits[:, -1]
    past = cache.get_seq_length()
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        m = mask[:, : past + end] if mask is not None else None
        logits = model(
            ids[:, start:end], attention_mask=m, past_key_values=cache, use_cache=True, logits_to_keep=1
        ).logits
    return logits[:, -1]


def decode_step(
    model: Any, cache: HybridMambaAttentionDynamicCache, tokens: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Feed one token per row, tokens (b,), through `cache`; the next logits (b, vocab). Rows may hold
    contexts of different lengths: `mask` (b, past + 1) marks each row's real columns (left padding 0)."""
    return model(tokens[:, None], attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]


@torch.inference_mode()
def chunked_logits(model: Any, ids: Tensor, chunk: int) -> Any:
    """Yield (start, logits (b, t, vocab)) for ids (b, l) run through one cache in pieces of `chunk`
    tokens, so a long text's activations stay O(chunk)."""
    cache = HybridMambaAttentionDynamicCache(model.config)
    for start in range(0, ids.shape[1], chunk):
        yield start, model(ids[:, start : start + chunk], past_key_values=cache, use_cache=True).logits
