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
from .sampling import StepRules, constrain_scores, draw, grown_room, process_logits, widen

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
    (b, t), k = input_ids.shape, num_beams
    beams = _Beams.start(input_ids, k, room, pad, max_new_tokens, length_penalty, early_stopping)
    n_keep = max(2, 1 + len(eos)) * k  # continuations considered per prompt and step
    eos_t = torch.tensor(eos, device=input_ids.device) if eos else None
    cache = HybridMambaAttentionDynamicCache(model.config)
    logits = prefill(model, input_ids, cache, attention_mask, prefill_chunk_size)  # (b, vocab)
    cache.batch_repeat_interleave(k)
    logits = logits.repeat_interleave(k, dim=0)  # (b*k, vocab)
    mask = attention_mask.repeat_interleave(k, dim=0) if attention_mask is not None else None
    starts = starts.repeat_interleave(k)  # (b*k,)
    all_scores: list[Tensor] = []
    all_logits: list[Tensor] = []
    for step in range(max_new_tokens):
        cur = t + step  # tokens per sequence so far
        if step == beams.room:  # full: grow the new-token room
            beams.grow(grown_room(step, max_new_tokens))
        raw = logits.float()  # (b*k, vocab)
        history = beams.running.view(b * k, -1)[:, :cur] if rules.reads_history else None
        scores = constrain_scores(raw.log_softmax(-1), history, starts, cur, min_total, eos, rules)
        if sampling is not None:
            scores = process_logits(scores, None, **sampling)
        if keep_scores:
            all_scores.append(scores)
            all_logits.append(raw)
        cand_scores, cand = _candidates(scores, beams.running_scores, n_keep, sampling, generator)
        cand_seqs, cand_src = beams.extend(cand, scores.shape[-1], step)
        ends = _ends(cand_seqs[:, :, cur], cur + 1 >= t + max_new_tokens, eos_t)  # (b, n_keep)
        beams.advance(cand_scores, cand_seqs, cand_src, ends)
        beams.keep_finished(cand_scores, cand_seqs, cand_src, ends, step)
        if beams.all_done(ends):
            break
        cache.reorder_cache(beams.running_src[:, :, step].reshape(-1))
        if mask is not None:  # (the rows of a prompt's beams have the same mask: no reordering needed)
            mask = torch.cat([mask, mask.new_ones(b * k, 1)], dim=1)
        nxt = beams.running.view(b * k, -1)[:, cur]  # (b*k,)
        logits = decode_step(model, cache, nxt, mask)
    return beams.result(num_return_sequences, tuple(all_scores), tuple(all_logits))


def _candidates(
    scores: Tensor, running_scores: Tensor, n: int, sampling: dict | None, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Each prompt's `n` continuations, best first: their total scores and flat indices (b, n) each into
    (beam, token) = divmod(index, vocab). scores: (b*k, vocab) this step's; running_scores: (b, k)."""
    b, k = running_scores.shape
    vocab = scores.shape[-1]
    total = (scores.view(b, k, vocab) + running_scores[:, :, None]).view(b, k * vocab)
    if sampling is None:
        return total.topk(n)  # (b, n) best first
    # drawn in proportion to the whole sequence's probability, then sorted best first
    cand = draw(total, n, generator)  # (b, n)
    cand_scores, order = total.gather(1, cand).sort(dim=-1, descending=True)
    return cand_scores, cand.gather(1, order)


def _ends(last: Tensor, at_limit: bool, eos: Tensor | None) -> Tensor:
    """Which continuations end, by their last tokens last (b, n): all at the length limit, else those
    that are eos ids."""
    if at_limit:
        return torch.ones_like(last, dtype=torch.bool)
    if eos is not None:
        return torch.isin(last, eos)
    return torch.zeros_like(last, dtype=torch.bool)


@dataclass
class _Beams:
    """Each prompt's k running beams and k best finished hypotheses, as the search goes."""

    running: Tensor  # (b, k, t + room) the running beams
    running_scores: Tensor  # (b, k) their sums of log-probs
    running_src: Tensor  # (b, k, room) the flat beam each new token came from (-1: none yet)
    best: Tensor  # (b, k, t + room) finished hypotheses
    best_scores: Tensor  # (b, k) their length-penalized scores (NEG: an empty slot)
    best_src: Tensor  # (b, k, room)
    best_done: Tensor  # (b, k) bool: a real hypothesis in that slot
    improvable: Tensor  # (b, 1) bool: running beams may still beat them
    t: int  # the prompt's length
    pad: int
    max_new_tokens: int
    length_penalty: float
    early_stopping: bool | str

    @classmethod
    def start(
        cls,
        input_ids: Tensor,
        k: int,
        room: int,
        pad: int,
        max_new_tokens: int,
        length_penalty: float,
        early_stopping: bool | str,
    ) -> _Beams:
        (b, t), device = input_ids.shape, input_ids.device
        running = input_ids.new_full((b, k, t + room), pad)  # (b, k, t + room)
        running[:, :, :t] = input_ids[:, None]
        running_scores = torch.zeros(b, k, device=device)
        running_scores[:, 1:] = (
            NEG  # at first all beams are the same: only the first one's continuations count
        )
        src = torch.full((b, k, room), -1, dtype=torch.long, device=device)  # (b, k, room)
        return cls(
            running,
            running_scores,
            src,
            best=running.clone(),
            best_scores=torch.full((b, k), NEG, device=device),
            best_src=src.clone(),
            best_done=torch.zeros(b, k, dtype=torch.bool, device=device),
            improvable=torch.ones(b, 1, dtype=torch.bool, device=device),
            t=t,
            pad=pad,
            max_new_tokens=max_new_tokens,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
        )

    @property
    def room(self) -> int:
        """New-token columns allocated."""
        return self.running_src.shape[-1]

    def grow(self, room: int) -> None:
        """Allocate `room` new-token columns."""
        self.running, self.best = (
            widen(self.running, self.t + room, self.pad),
            widen(self.best, self.t + room, self.pad),
        )
        self.running_src, self.best_src = widen(self.running_src, room, -1), widen(self.best_src, room, -1)

    def extend(self, cand: Tensor, vocab: int, step: int) -> tuple[Tensor, Tensor]:
        """The continuations cand (b, n) (flat beam * vocab + token) as sequences (b, n, t + room) and the
        beams their tokens came from (b, n, room)."""
        b, k = self.running_scores.shape
        src = cand // vocab  # (b, n) the beam each continuation extends
        seqs = _take(self.running, src)  # (b, n, t + room)
        seqs[:, :, self.t + step] = cand % vocab
        seq_src = _take(self.running_src, src)  # (b, n, room)
        seq_src[:, :, step] = (
            src + torch.arange(b, device=cand.device)[:, None] * k
        )  # (flat: prompt * k + beam)
        return seqs, seq_src

    def advance(self, cand_scores: Tensor, seqs: Tensor, seq_src: Tensor, ends: Tensor) -> None:
        """The next running beams: the best k continuations that do not end."""
        live = cand_scores + ends.float() * NEG
        pick = live.topk(self.running.shape[1]).indices  # (b, k)
        self.running, self.running_scores = _take(seqs, pick), _take(live, pick)
        self.running_src = _take(seq_src, pick)

    def keep_finished(
        self, cand_scores: Tensor, seqs: Tensor, seq_src: Tensor, ends: Tensor, step: int
    ) -> None:
        """The ending continuations among the best k become hypotheses, scored by their length-penalized
        sums, unless their prompt is done; the best k hypotheses stay. Then: may each prompt's running
        beams still beat them? (transformers' heuristic: the best running beam against the worst of them)"""
        k, n_gen = self.running.shape[1], step + 1
        just_done = ends & (torch.arange(ends.shape[1], device=ends.device) < k)  # (b, n): the best k
        finished = cand_scores / (n_gen**self.length_penalty)
        full = self.best_done.all(dim=-1, keepdim=True) & (self.early_stopping is True)  # (b, 1)
        finished = finished + full.float() * NEG
        finished = finished + (~self.improvable).float() * NEG
        finished = finished + (~just_done).float() * NEG
        scores = torch.cat([self.best_scores, finished], dim=1)  # (b, k + n)
        keep = scores.topk(k).indices  # (b, k)
        self.best = _take(torch.cat([self.best, seqs], dim=1), keep)
        self.best_scores = _take(scores, keep)
        self.best_src = _take(torch.cat([self.best_src, seq_src], dim=1), keep)
        self.best_done = _take(torch.cat([self.best_done, just_done], dim=1), keep)

        hoped = self.max_new_tokens if self.early_stopping == "never" and self.length_penalty > 0 else n_gen
        best_hope = self.running_scores[:, :1] / (hoped**self.length_penalty)  # (b, 1)
        worst = torch.where(self.best_done, self.best_scores.min(dim=1, keepdim=True).values, NEG)  # (b, k)
        self.improvable = self.improvable & (best_hope > worst).any(dim=-1, keepdim=True)

    def all_done(self, ends: Tensor) -> bool:
        """Is the search over: no prompt's running beams can beat its hypotheses, or (early_stopping=True)
        every prompt has k hypotheses, or every continuation ends?"""
        all_full = bool(self.best_done.all()) and self.early_stopping is True
        return not bool(self.improvable.any()) or all_full or bool(ends.all())

    def result(self, n: int, scores: tuple[Tensor, ...], logits: tuple[Tensor, ...]) -> BeamResult:
        """The best n hypotheses of each prompt, cut to the longest of them."""
        b = self.best.shape[0]
        best_src = self.best_src[:, :n].reshape(b * n, -1)  # (b*n, room)
        length = int((best_src >= 0).sum(dim=1).max()) if self.max_new_tokens else 0  # the longest returned
        return BeamResult(
            sequences=self.best[:, :n].reshape(b * n, -1)[:, : self.t + length],
            sequences_scores=self.best_scores[:, :n].reshape(b * n),
            beam_indices=best_src[:, :length].int(),  # int32, as transformers
            scores=scores,
            logits=logits,
        )
