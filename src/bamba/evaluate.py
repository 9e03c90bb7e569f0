"""Evaluation: the held-out loss of packed rows (sharded over ranks) and the perplexity of a token sequence."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Row, count_targets, flatten_rows
from .decoding import chunked_logits
from .distributed import all_sum
from .model import causal_lm_loss


def packed_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Logits (1, T, vocab) of a flattened batch (`bamba.data.flatten_rows`): its position_ids and seq_idx
    keep the examples apart."""
    return model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        seq_idx=batch["seq_idx"],
        use_cache=False,
    ).logits


@torch.no_grad()
def evaluate(
    model: nn.Module, rows: list[Row], rank: int, world: int, device: torch.device, autocast: Any
) -> tuple[float, int]:
    """(mean cross-entropy per predicted token, number of predicted tokens) over `rows`, sharded over ranks.

    Every rank runs the same number of forwards (FSDP gathers weights in each); a rank with no row left
    re-reads row 0 with zero weight.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), world):
        i = start + rank
        batch = flatten_rows([rows[i if i < len(rows) else 0]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = packed_logits(model, batch)  # (1, T, vocab)
        if i < len(rows):
            total += float(causal_lm_loss(logits, batch["labels"], num_items_in_batch=1))  # summed CE
            count += count_targets(batch["labels"])
    model.train(was_training)
    total, count = all_sum([total, float(count)], world, device)
    return (total / count if count else float("nan")), int(count)


@torch.inference_mode()
def perplexity(model: nn.Module, token_ids: Tensor, chunk_size: int = 2048) -> float:
    """exp(mean next-token negative log-likelihood) of `token_ids` ((l,) or (b, l)) under `model`.

    The sequence runs through the model's cache in pieces of `chunk_size` tokens, so long texts fit in
    memory; every token after the first is scored.
    """
    ids = token_ids if token_ids.dim() == 2 else token_ids[None]
    b, l = ids.shape
    if l < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, found {l}")
    nll, count = 0.0, 0
    for start, logits in chunked_logits(model, ids[:, :-1], chunk_size):  # targets are shifted by one
        targets = ids[:, start + 1 : start + 1 + logits.shape[1]]
        nll += F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    return math.exp(nll / count)
