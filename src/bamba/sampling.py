"""The per-step token rules every decoder shares (greedy, sampling, beam search, the server's engine):
logit processing, bans and penalties, the ids that end or pad a row, stop strings and stopping criteria.

The logits functions take a batch of rows, (b, vocab); one request, with its own parameters, is a batch of
one row, (1, vocab).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


# ----- logits -------------------------------------------------------------------------------------------
def process_logits(
    logits: Tensor,
    history: Tensor | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> Tensor:
    """Apply, in transformers' order, repetition penalty then temperature, top-k, top-p, min-p.

    logits: (b, vocab) fp32; history: (b, t) ids seen so far (prompt and generated). Returns new logits
    with excluded tokens at -inf.
    """
    if repetition_penalty != 1.0:
        seen = logits.gather(1, history)  # (b, t)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)  # (b, vocab) each
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    if min_p is not None and min_p > 0:
        probs = logits.softmax(-1)
        limit = min_p * probs.max(dim=-1, keepdim=True).values  # (b, 1)
        logits = logits.masked_fill(probs < limit, float("-inf"))
    return logits


class NonFiniteScores(ValueError):
    """Sampling met next-token scores that are NaN or infinite (a weight or an activation is not finite)."""


def draw(scores: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """`n` indices per row of scores (b, vocab) drawn from their softmax; (b, n). Scores that are NaN (a
    checkpoint whose weights hold NaN gives them) raise NonFiniteScores, not torch's RuntimeError."""
    try:
        return torch.multinomial(scores.softmax(-1), n, generator=generator)
    except RuntimeError as e:
        if "probability tensor contains" not in str(e):
            raise
        raise NonFiniteScores(
            "the model's next-token scores are NaN or infinite, so there is nothing to sample from "
            "(a weight or an activation is not finite)"
        ) from None


def pick_tokens(scores: Tensor, do_sample: bool, generator: torch.Generator | None = None) -> Tensor:
    """The next token of each row of scores (b, vocab): drawn from their softmax (from `generator`) when
    `do_sample`, else the most likely; (b,)."""
    if do_sample:
        return draw(scores, 1, generator).squeeze(-1)
    return scores.argmax(-1)


@dataclass
class StepRules:
    """What `constrain_scores` applies at every step besides the eos ban: 0 / 1.0 for none."""

    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0

    @property
    def reads_history(self) -> bool:
        return bool(self.no_repeat_ngram_size) or self.repetition_penalty != 1.0


def constrain_scores(
    scores: Tensor,
    history: Tensor | None,
    starts: Tensor,
    length: int,
    min_total: int,
    eos: list[int],
    rules: StepRules,
) -> Tensor:
    """One step's bans and penalty, as transformers' logits processors: eos barred while the sequences
    are shorter than `min_total`, repeated n-grams banned, the repetition penalty.

    scores: (rows, vocab) fp32; history: (rows, length) the sequences so far (prompt included), needed
    when `rules.reads_history`; starts: (rows,) where each row's tokens start after its left padding, which
    the penalty ignores (as transformers' does)."""
    if eos and length < min_total:
        scores = scores.index_fill(1, torch.tensor(eos, device=scores.device), float("-inf"))
    if rules.no_repeat_ngram_size:
        scores = ban_repeated_ngrams(scores, history, rules.no_repeat_ngram_size)
    if rules.repetition_penalty != 1.0:
        # left padding is not part of the history: the row's last id stands there instead
        pad_part = torch.arange(length, device=history.device)[None] < starts[:, None]  # (rows, length)
        history = torch.where(pad_part, history[:, -1:], history)
        scores = process_logits(scores, history, repetition_penalty=rules.repetition_penalty)
    return scores


def ban_repeated_ngrams(logits: Tensor, history: Tensor, n: int) -> Tensor:
    """As transformers' NoRepeatNGramLogitsProcessor: no n-gram may occur twice in a row's sequence.

    logits: (b, vocab); history: (b, t) the whole sequence so far (prompt included). A token is banned
    when it would complete an n-gram that already occurs: its first n-1 ids are the row's last n-1 ids.
    """
    rows: list[int] = []
    cols: list[int] = []
    for r, seq in enumerate(history.tolist()):
        if len(seq) + 1 < n:
            continue
        tail = seq[len(seq) - n + 1 :]  # the n-1 ids a new token would extend ([] for n == 1)
        for i in range(len(seq) - n + 1):
            if seq[i : i + n - 1] == tail:
                rows.append(r)
                cols.append(seq[i + n - 1])
    if not rows:
        return logits
    banned = torch.zeros_like(logits, dtype=torch.bool)
    banned[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = True
    return logits.masked_fill(banned, float("-inf"))


# ----- token ids: what ends a row, what pads it ---------------------------------------------------------
def generation_default(model: Any, key: str) -> Any:
    """`key` (eos_token_id, pad_token_id) of the checkpoint's generation_config.json, else of its config."""
    value = (getattr(model, "generation_config", None) or {}).get(key)
    return value if value is not None else getattr(model.config, key)


def default_eos_ids(model: Any) -> list[int]:
    """The stop tokens `generate` uses by default: generation_config.json's eos_token_id, else the config's."""
    return as_token_ids(generation_default(model, "eos_token_id"))


def eos_ids_with(model: Any, tokenizer: Any) -> list[int]:
    """The model's stop tokens plus the tokenizer's eos (what the pipeline and the command line stop on)."""
    ids = default_eos_ids(model)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def pad_id_of(tokenizer: Any) -> dict[str, int]:
    """generate()'s pad_token_id argument for the tokenizer's pad id: none when it has none, so that
    generate takes the checkpoint's (pad_token_id=None given would mean no pad id at all)."""
    return {} if tokenizer.pad_token_id is None else {"pad_token_id": tokenizer.pad_token_id}


def as_token_ids(value: Any, name: str = "eos_token_id") -> list[int]:
    """Token ids as a list: None, an int (numpy ints too), a sequence of ints, or a 0-d / 1-d int tensor."""
    if value is None:
        return []
    if isinstance(value, Tensor):
        if value.dim() > 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"{name} must be a token id or a list of them, found a {value.dtype} tensor of shape "
                f"{tuple(value.shape)}"
            )
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (str, bytes)) or isinstance(value, bool):
        raise TypeError(
            f"{name} must be a token id or a list of them, found {type(value).__name__} {value!r}"
        )
    if isinstance(value, numbers.Integral):
        return [int(value)]
    try:
        items = list(value)
    except TypeError:
        raise TypeError(
            f"{name} must be a token id or a list of them, found {type(value).__name__} {value!r}"
        ) from None
    bad = [v for v in items if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
    if bad:
        raise TypeError(f"{name} must be a token id or a list of them, found {value!r}")
    return [int(v) for v in items]


# ----- stopping -----------------------------------------------------------------------------------------
def criteria_hits(criteria: list[Callable[..., Any]], ids: Tensor, scores: tuple | None) -> Tensor:
    """(b,) bool: the rows of ids (b, length) that any of `criteria` says are done."""
    b = ids.shape[0]
    hits = torch.zeros(b, dtype=torch.bool, device=ids.device)
    for criterion in criteria:
        value = criterion(ids, scores)
        try:
            hit = torch.as_tensor(value, device=ids.device)
        except (TypeError, RuntimeError, ValueError):  # None, a string, ...
            hit = None
        if hit is None or hit.is_floating_point() or hit.is_complex() or hit.numel() not in (1, b):
            found = f"{hit.dtype} of shape {tuple(hit.shape)}" if hit is not None else type(value).__name__
            raise ValueError(
                f"stopping criterion {criterion!r} returned {found}; expected a bool per row ({b}) or one bool"
            )
        hits |= hit.reshape(-1).expand(b) != 0  # (0 / 1 integers count as transformers' `|` takes them)
    return hits


def stop_string_hits(
    tokenizer: Any, out: Tensor, rows: Tensor, starts: Tensor, end: int, stops: list[str], window: int
) -> Tensor:
    """Per row of `rows`: does out[row, :end] (prompt and generated) end with a stop string that its last
    token completes? As transformers' StopStringCriteria: the string must overlap the last token's text
    (it may run past it), so a string lying wholly in earlier tokens (the prompt, say) does not fire.

    Only the last `window` tokens are decoded (after the row's left padding): enough for any stop string,
    since a byte-level token holds at least one byte of text.
    """
    hits = []
    for r in rows.tolist():
        ids = out[r, max(int(starts[r]), end - window) : end].tolist()
        text = tokenizer.decode(ids)
        before = tokenizer.decode(ids[:-1])
        # the text before the last token: the common prefix (an unfinished character decodes to U+FFFD)
        settled = len(os.path.commonprefix([before, text]))
        hits.append(any((i := text.rfind(s)) >= 0 and i + len(s) > settled for s in stops))
    return torch.tensor(hits, dtype=torch.bool, device=out.device)


# ----- the output's new-token room ----------------------------------------------------------------------
def widen(x: Tensor, width: int, fill: int) -> Tensor:
    """x (..., w) with its last dimension filled out with `fill` to `width` (>= w) columns."""
    return F.pad(x, (0, width - x.shape[-1]), value=fill)


def grown_room(filled: int, max_new_tokens: int) -> int:
    """New-token columns to hold once `filled` columns are full: twice as many, at most max_new_tokens
    (the rule of `generate` and of beam search alike)."""
    return min(2 * filled, max_new_tokens)
