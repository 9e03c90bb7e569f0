"""Beam search: `generate(..., num_beams=k)`, as transformers 5 runs it, also with sampling (do_sample).

Each prompt keeps k running beams. At every step each beam's next-token log-probabilities (after the same
bans and penalty as greedy decoding) are added to its running score; of the k * vocab continuations of a
prompt the best K = max(2, 1 + number of eos ids) * k are taken, so that k of them can go on even when
some end (with do_sample: K are drawn without replacement in proportion to their probability, after
temperature / top-k / top-p / min-p on each step's log-probabilities). A continuation that ends (an eos id, or the length limit) and ranks among the best k becomes a
finished hypothesis, scored `sum of log-probs / generated length ** length_penalty`; the best k
hypotheses are kept. The k best continuations that do not end are the next running beams, and the
cache's rows follow them (`reorder_cache`).

A prompt is done when (`early_stopping`):
- True: it has k finished hypotheses;
- False (the default): also none of its running beams could still beat the worst of them, judged at the
  current length (transformers' heuristic);
- "never": judged at the longest possible length when length_penalty > 0 (the canonical rule).
Generation stops when every prompt is done, or at the length limit.

Hypotheses that end before the longest returned one are padded with the pad id. (transformers pads
them with `pad_token_id or eos_token_id[0]`, so a pad id of 0 gives the eos id there: a truthiness slip
not copied; greedy decoding pads with the pad id in both.)

The prompt is run once per row and its cache repeated k times (transformers runs it k times: the same
result, k times the work). Reference: transformers' `generate(num_beams=k)`; the tests compare
sequences, sequence scores, per-step scores and beam indices with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .cache import HybridMambaAttentionDynamicCache
from .decoding import decode_step, prefill
from .generation import StepRules, constrain_scores, grown_room, process_logits, widen

NEG = -1.0e9  # the score of what must not be picked, as transformers uses it (finite: sums stay ordered)


@dataclass
class BeamResult:
    sequences: Tensor  # (b * num_return_sequences, prompt + new)
    sequences_scores: Tensor  # (b * num_return_sequences,) length-penalized sums of log-probs
    beam_indices: Tensor  # (b * num_return_sequences, new) int32: the flat beam each token came from
    scores: tuple[Tensor, ...]  # per step: (b * k, vocab) the processed log-probs
    logits: tuple[Tensor, ...]  # per step: (b * k, vocab) the raw logits


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """x (b, n, ...) gathered along dim 1 at idx (b, m) -> (b, m, ...)."""
    return x.gather(1, idx.view(*idx.shape, *[1] * (x.dim() - 2)).expand(*idx.shape, *x.shape[2:]))


def beam_search(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    starts: Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    min_total: int,
    room: int,
    eos: list[int],
    pad: int,
    rules: StepRules,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    prefill_chunk_size: int | None = None,
    keep_scores: bool = False,
    sampling: dict | None = None,
    generator: torch.Generator | None = None,
) -> BeamResult:
    """Beam search from input_ids (b, t) (left padding marked by attention_mask (b, t), rows starting at
    `starts` (b,)); see the module doc. `keep_scores`: also keep each step's scores and raw logits.
    `sampling` (beam sampling): `process_logits`' temperature / top_k / top_p / min_p, applied to each
    step's log-probabilities; the continuations are then drawn (without replacement, from `generator`)
    in proportion to their total probability instead of taken best first, as transformers does.
    `room`: new-token columns allocated at first, grown by `grown_room` whenever full."""
    b, t = input_ids.shape
    k, device = num_beams, input_ids.device
    total = t + max_new_tokens  # the length limit
    n_keep = max(2, 1 + len(eos)) * k  # continuations considered per prompt and step
    may_finish = torch.arange(n_keep, device=device) < k  # (n_keep,) only the best k continuations
    eos_t = torch.tensor(eos, device=device) if eos else None
    offsets = torch.arange(b, device=device)[:, None] * k  # (b, 1) a prompt's first flat row

    cache = HybridMambaAttentionDynamicCache(model.config)
    logits = prefill(model, input_ids, cache, attention_mask, prefill_chunk_size)  # (b, vocab)
    cache.batch_repeat_interleave(k)
    logits = logits.repeat_interleave(k, dim=0)  # (b*k, vocab)
    mask = attention_mask.repeat_interleave(k, dim=0) if attention_mask is not None else None
    starts = starts.repeat_interleave(k)  # (b*k,)

    running = input_ids.new_full((b, k, t + room), pad)  # (b, k, t + room) the running beams
    running[:, :, :t] = input_ids[:, None]
    running_scores = torch.zeros(b, k, device=device)
    running_scores[:, 1:] = NEG  # at first all beams are the same: only the first one's continuations count
    running_src = torch.full((b, k, room), -1, dtype=torch.long, device=device)  # (b, k, room)
    best = running.clone()  # (b, k, t + room) finished hypotheses
    best_scores = torch.full((b, k), NEG, device=device)
    best_src = running_src.clone()
    best_done = torch.zeros(b, k, dtype=torch.bool, device=device)  # a real hypothesis in that slot
    improvable = torch.ones(b, 1, dtype=torch.bool, device=device)  # running beams may still beat them
    all_scores: list[Tensor] = []
    all_logits: list[Tensor] = []

    for step in range(max_new_tokens):
        cur = t + step  # tokens per sequence so far
        if step == running_src.shape[-1]:  # full: grow the new-token room
            room = grown_room(step, max_new_tokens)
            running, best = widen(running, t + room, pad), widen(best, t + room, pad)
            running_src, best_src = widen(running_src, room, -1), widen(best_src, room, -1)
        raw = logits.float()  # (b*k, vocab)
        history = running.view(b * k, -1)[:, :cur] if rules.reads_history else None
        scores = constrain_scores(raw.log_softmax(-1), history, starts, cur, min_total, eos, rules)
        if sampling is not None:
            scores = process_logits(scores, None, **sampling)
        if keep_scores:
            all_scores.append(scores)
            all_logits.append(raw)
        vocab = scores.shape[-1]
        total_scores = (scores.view(b, k, vocab) + running_scores[:, :, None]).view(b, k * vocab)
        if sampling is None:
            cand_scores, cand = total_scores.topk(n_keep)  # (b, n_keep) best first
        else:  # drawn in proportion to the whole sequence's probability, then sorted best first
            cand = torch.multinomial(total_scores.softmax(-1), n_keep, generator=generator)  # (b, n_keep)
            cand_scores, order = total_scores.gather(1, cand).sort(dim=-1, descending=True)
            cand = cand.gather(1, order)
        src = cand // vocab  # (b, n_keep) the beam each continuation extends
        cand_seqs = _take(running, src)  # (b, n_keep, t + room)
        cand_seqs[:, :, cur] = cand % vocab
        cand_src = _take(running_src, src)  # (b, n_keep, new)
        cand_src[:, :, step] = src + offsets
        if cur + 1 >= total:
            ends = torch.ones_like(cand_scores, dtype=torch.bool)
        elif eos_t is not None:
            ends = torch.isin(cand_seqs[:, :, cur], eos_t)  # (b, n_keep)
        else:
            ends = torch.zeros_like(cand_scores, dtype=torch.bool)

        # the next running beams: the best k continuations that do not end
        live = cand_scores + ends.float() * NEG
        pick = live.topk(k).indices  # (b, k)
        running, running_scores, running_src = (
            _take(cand_seqs, pick),
            _take(live, pick),
            _take(cand_src, pick),
        )

        # finished hypotheses: ending continuations among the best k, unless the prompt is done
        just_done = ends & may_finish  # (b, n_keep)
        finished = cand_scores / ((cur + 1 - t) ** length_penalty)
        full = best_done.all(dim=-1, keepdim=True) & (early_stopping is True)  # (b, 1)
        finished = finished + full.float() * NEG
        finished = finished + (~improvable).float() * NEG
        finished = finished + (~just_done).float() * NEG
        keep = torch.cat([best_scores, finished], dim=1).topk(k).indices  # (b, k) of the k + n_keep
        best = _take(torch.cat([best, cand_seqs], dim=1), keep)
        best_scores = _take(torch.cat([best_scores, finished], dim=1), keep)
        best_src = _take(torch.cat([best_src, cand_src], dim=1), keep)
        best_done = _take(torch.cat([best_done, just_done], dim=1), keep)

        # is each prompt done? (transformers' heuristic: the best running beam against the worst hypothesis)
        n_gen = cur + 1 - t
        hoped = max_new_tokens if early_stopping == "never" and length_penalty > 0 else n_gen
        best_hope = running_scores[:, :1] / (hoped**length_penalty)  # (b, 1)
        worst = torch.where(best_done, best_scores.min(dim=1, keepdim=True).values, NEG)  # (b, k)
        improvable = improvable & (best_hope > worst).any(dim=-1, keepdim=True)
        all_full = bool(best_done.all()) and early_stopping is True
        if not bool(improvable.any()) or all_full or bool(ends.all()):
            break
        cache.reorder_cache(running_src[:, :, step].reshape(-1))
        if mask is not None:  # (the rows of a prompt's beams have the same mask: no reordering needed)
            mask = torch.cat([mask, mask.new_ones(b * k, 1)], dim=1)
        nxt = running.view(b * k, -1)[:, cur]  # (b*k,)
        logits = decode_step(model, cache, nxt, mask)

    n = num_return_sequences
    best_src = best_src[:, :n].reshape(b * n, -1)  # (b*n, room)
    length = int((best_src >= 0).sum(dim=1).max()) if max_new_tokens else 0  # the longest returned
    return BeamResult(
        sequences=best[:, :n].reshape(b * n, -1)[:, : t + length],
        sequences_scores=best_scores[:, :n].reshape(b * n),
        beam_indices=best_src[:, :length].int(),  # int32, as transformers
        scores=tuple(all_scores),
        logits=tuple(all_logits),
    )
