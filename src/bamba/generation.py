"""Text generation: `generate` (greedy / sampling over the hybrid cache), streamers, and `bamba generate|chat`.

The prompt is prefilled once (logits of the last position only), then one token per step is fed through
the cache. In greedy decoding, rows that finish (EOS or a stop string) are dropped from the batch and the
cache, so they stop costing compute; their output is filled with the pad token, as transformers does.
When sampling a batch, or when per-step scores or logits are requested, finished rows stay in the batch
and are fed the pad token, as in transformers: the same seed then draws the same tokens, and every step's
scores cover the whole batch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import math
import numbers
import os
import queue
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import HybridMambaAttentionDynamicCache
from .decoding import decode_step, prefill
from .outputs import ModelOutput
from .quantize import SHORT_NAMES
from .tokenizer import DecodeStream


# ----- streamers ---------------------------------------------------------------------------------------
class _FunctionDecodeStream(DecodeStream):
    """A `DecodeStream` whose decoding is any `ids -> text` function (a tokenizer's decode with options)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        super().__init__(tokenizer=None)  # type: ignore[arg-type]  # only _decode reads the tokenizer
        self._decode_fn = decode

    def _decode(self, ids: list[int]) -> str:
        return self._decode_fn(ids)


def _stream_decoder(tokenizer: Any, skip_special_tokens: bool, options: dict[str, Any]) -> DecodeStream:
    """An incremental decoder for `tokenizer` with transformers-style decode options."""
    if not options and hasattr(tokenizer, "stream_decoder"):
        return tokenizer.stream_decoder(skip_special_tokens=skip_special_tokens)
    try:  # does the tokenizer's decode take these options (transformers' tokenizers take them all)?
        inspect.signature(tokenizer.decode).bind([], skip_special_tokens=skip_special_tokens, **options)
    except TypeError:
        raise TypeError(
            f"streamer decode options {sorted(options)} are not arguments of "
            f"{type(tokenizer).__name__}.decode"
        ) from None
    return _FunctionDecodeStream(
        lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **options)
    )


class TextStreamer:
    """Receives token ids as they are generated and emits text as soon as it is complete.

    As transformers' TextStreamer: the prompt is emitted too unless `skip_prompt`, extra keyword arguments
    go to the tokenizer's decode (e.g. `clean_up_tokenization_spaces`), and the default output prints to
    stdout with a newline at the end of each generation. Decoding is incremental: a multi-byte character
    split over several byte-level tokens is held back until its last byte arrives, so no broken character
    is ever emitted. `on_text(piece)`, if given, replaces printing: it gets each non-empty piece and no
    final newline. Subclasses may override `on_finalized_text(text, stream_end)` instead, as in transformers.
    """

    def __init__(
        self,
        tokenizer: Any,
        skip_prompt: bool = False,
        on_text: Callable[[str], None] | None = None,
        skip_special_tokens: bool = False,
        **decode_kwargs: Any,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.on_text = on_text
        self.skip_special_tokens = skip_special_tokens
        self.decode_kwargs = decode_kwargs
        _stream_decoder(tokenizer, skip_special_tokens, decode_kwargs)  # bad options fail here, not later
        self._stream: DecodeStream | None = None
        self._prompt_pending = skip_prompt
        self._fed = False  # put was called since the last end

    def put(self, ids: Tensor | Sequence[int]) -> None:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if ids and isinstance(ids[0], list):
            if len(ids) > 1:
                raise ValueError("TextStreamer supports batch size 1 only")
            ids = ids[0]
        self._fed = True
        if self._prompt_pending:
            self._prompt_pending = False
            return
        if self._stream is None:
            self._stream = _stream_decoder(self.tokenizer, self.skip_special_tokens, self.decode_kwargs)
        for i in ids:
            if piece := self._stream.step(i):
                self.on_finalized_text(piece)

    def end(self) -> None:
        piece = self._stream.flush() if self._stream is not None else ""
        self._stream = None
        self._prompt_pending = self.skip_prompt  # the next generate starts with its prompt again
        self.on_finalized_text(piece, stream_end=True)
        self._fed = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Emit `text`; `stream_end` marks the end of a generation (printing then ends the line, unless
        nothing was streamed: a generate refused before its first token prints nothing)."""
        if self.on_text is not None:
            if text:
                self.on_text(text)
        elif text or self._fed:
            print(text, end="\n" if stream_end else "", flush=True)


class TextIteratorStreamer(TextStreamer):
    """A streamer that is iterated (e.g. while `generate` runs in another thread): yields text pieces."""

    def __init__(
        self,
        tokenizer: Any,
        skip_prompt: bool = False,
        timeout: float | None = None,
        **decode_kwargs: Any,
    ) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.timeout = timeout
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._queue.put(text)
        if stream_end:
            self._queue.put(None)

    def __iter__(self) -> TextIteratorStreamer:
        return self

    def __next__(self) -> str:
        """The next piece of text (waiting up to `timeout` seconds: queue.Empty after that); StopIteration
        at the end of a generation."""
        piece = self._queue.get(timeout=self.timeout)
        if piece is None:
            raise StopIteration
        return piece


# ----- sampling -----------------------------------------------------------------------------------------
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


def _generation_default(model: Any, key: str) -> Any:
    """`key` (eos_token_id, pad_token_id) of the checkpoint's generation_config.json, else of its config."""
    value = (getattr(model, "generation_config", None) or {}).get(key)
    return value if value is not None else getattr(model.config, key)


def default_eos_ids(model: Any) -> list[int]:
    """The stop tokens `generate` uses by default: generation_config.json's eos_token_id, else the config's."""
    return _as_list(_generation_default(model, "eos_token_id"))


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


@contextlib.contextmanager
def _ended(streamer: TextStreamer | None) -> Iterator[None]:
    """Run the block, then end `streamer` (if any) however the block exits."""
    try:
        yield
    finally:
        if streamer is not None:
            streamer.end()


def _as_list(value: Any, name: str = "eos_token_id") -> list[int]:
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


def _as_int(name: str, value: Any, minimum: int | None = None, hint: str = "") -> int:
    """An integer argument: ints, numpy ints, 1-element int tensors and integral floats (2.0) pass."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not (isinstance(value, numbers.Integral) or float(value).is_integer())
    ):
        raise TypeError(f"{name} must be an integer, found {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be an integer >= {minimum}{hint}")
    return value


def _as_float(name: str, value: Any) -> float:
    """A real-number argument: floats, ints, numpy scalars and 1-element tensors pass; strings do not."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, found {type(value).__name__} {value!r}")
    return float(value)


# ----- generate -----------------------------------------------------------------------------------------
@dataclass
class GenerateOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)`: as transformers' GenerateDecoderOnlyOutput.

    sequences: (b * num_return_sequences, prompt + new) ids. scores (with output_scores=True) and logits
    (output_logits=True): one (b * num_return_sequences, vocab) fp32 tensor per generated token: the scores
    after the logits processors (penalties, bans, and when sampling temperature / top-k / top-p / min-p),
    and the model's raw logits. Beam search returns a `GenerateBeamOutput`.
    """

    sequences: Tensor
    scores: tuple[Tensor, ...] | None = None
    logits: tuple[Tensor, ...] | None = None


@dataclass
class GenerateBeamOutput(ModelOutput):
    """`generate(..., num_beams=k, return_dict_in_generate=True)`: as transformers'
    GenerateBeamDecoderOnlyOutput (same fields in the same order).

    sequences: (b * num_return_sequences, prompt + new) ids; sequences_scores (with output_scores=True):
    (b * num_return_sequences,) the hypotheses' length-penalized sums of log-probabilities; scores
    (output_scores=True) and logits (output_logits=True): one (b * k, vocab) fp32 tensor per step, the
    processed log-probabilities and the raw logits of every beam; beam_indices: (b * num_return_sequences,
    new) int32, the flat beam (prompt * k + beam) each token was chosen from.
    """

    sequences: Tensor
    sequences_scores: Tensor | None = None
    scores: tuple[Tensor, ...] | None = None
    logits: tuple[Tensor, ...] | None = None
    beam_indices: Tensor | None = None


# generation_config fields that generate() takes, and those that do not change a decoder-only generation
_CONFIG_FIELDS = (
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "min_length",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "eos_token_id",
    "pad_token_id",
    "stop_strings",
    "num_return_sequences",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "use_cache",
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
)
_CONFIG_IGNORED = ("transformers_version", "_from_model_config", "_commit_hash", "bos_token_id")
# fields that change nothing at these values (transformers writes some of them into every
# generation_config.json): dropped rather than refused
_CONFIG_NEUTRAL = {
    "output_attentions": False,
    "output_hidden_states": False,
    "num_beam_groups": 1,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "diversity_penalty": 0.0,
    "encoder_repetition_penalty": 1.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}

P = ParamSpec("P")
R = TypeVar("R")


def generation_config_fields(config: Any) -> dict[str, Any]:
    """The fields a GenerationConfig (its non-default ones) or a dict sets, checked against what we support."""
    if isinstance(config, dict):
        fields = dict(config)
    elif hasattr(config, "to_diff_dict"):  # transformers.GenerationConfig: the fields set, not its defaults
        fields = config.to_diff_dict()
    else:
        raise TypeError(
            f"generation_config must be a transformers GenerationConfig or a dict, found {type(config).__name__}"
        )
    fields = {k: v for k, v in fields.items() if k not in _CONFIG_NEUTRAL or v != _CONFIG_NEUTRAL[k]}
    unknown = sorted(k for k in fields if k not in _CONFIG_FIELDS and k not in _CONFIG_IGNORED)
    if unknown:
        raise ValueError(
            f"generation_config sets {unknown}, which bamba's generate does not support; it supports "
            f"{list(_CONFIG_FIELDS)}"
        )
    return {k: v for k, v in fields.items() if k in _CONFIG_FIELDS}


# an eos_token_id / pad_token_id given as None (leaving it out means the checkpoint's)
NOT_SET = object()
_ROOM = 256  # new-token columns `generate` allocates at first; it doubles them when full


def widen(x: Tensor, width: int, fill: int) -> Tensor:
    """x (..., w) with its last dimension filled out with `fill` to `width` (>= w) columns."""
    return F.pad(x, (0, width - x.shape[-1]), value=fill)


def grown_room(filled: int, max_new_tokens: int) -> int:
    """New-token columns to hold once `filled` columns are full: twice as many, at most max_new_tokens
    (the rule of `generate` and of beam search alike)."""
    return min(2 * filled, max_new_tokens)


def _with_generation_config(fn: Callable[P, R]) -> Callable[P, R]:
    """`generation_config`'s fields become defaults of `fn`: explicitly passed arguments win. An eos or
    pad id passed as None (explicitly or by the config) becomes NOT_SET: none, where leaving it out means
    the checkpoint's."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            bound = signature.bind(*args, **kwargs)
            config = bound.arguments.pop("generation_config", None)
            if config is not None:
                for key, value in generation_config_fields(config).items():
                    bound.arguments.setdefault(key, value)
            for key in ("eos_token_id", "pad_token_id"):  # None given: none, as in transformers
                if key in bound.arguments and bound.arguments[key] is None:
                    bound.arguments[key] = NOT_SET
        except Exception:
            streamer = kwargs.get("streamer")
            if streamer is not None:  # an iterating consumer must not wait forever
                streamer.end()  # type: ignore[attr-defined]
            raise
        return fn(*bound.args, **bound.kwargs)

    return wrapper


@_with_generation_config
@torch.inference_mode()
def generate(
    model: Any,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    max_new_tokens: int | None = None,
    min_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | Tensor | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer: Any = None,
    num_return_sequences: int = 1,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    streamer: TextStreamer | None = None,
    max_length: int | None = None,
    prefill_chunk_size: int | None = None,
    *,
    inputs: Tensor | None = None,
    generation_config: Any = None,
    min_length: int = 0,
    no_repeat_ngram_size: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    use_cache: bool = True,
    return_dict_in_generate: bool = False,
    output_scores: bool = False,
    output_logits: bool = False,
    stopping_criteria: Sequence[Callable[..., Any]] | None = None,
) -> Tensor | GenerateOutput:
    """Continue each prompt; returns (b * num_return_sequences, prompt + new) ids, like transformers.

    input_ids (or `inputs`, transformers' name): (b, t). Left-padded rows are marked by zeros in
    `attention_mask` (b, t); without a mask one is inferred as transformers does: `input_ids != pad`
    when the pad id occurs in input_ids and is not an eos id, else all ones. Greedy unless `do_sample`
    (then top_k=50 unless given, as transformers). New tokens: `max_new_tokens`, else `max_length` minus
    the prompt, else 20; before an eos may come, at least `min_new_tokens` new tokens when it is given,
    else `min_length` in all (prompt included), as transformers. `no_repeat_ngram_size` bans repeated
    n-grams (prompt included). Generation of a row stops at any of `eos_token_id` (left out: the
    checkpoint's generation_config.json, else the config's; given as None: none, as transformers; the
    same for `pad_token_id`) or when the sequence (prompt included) ends with one of `stop_strings` right
    after a new token (needs `tokenizer`). `streamer.put` receives the prompt, then each new token (batch
    size 1 only).

    `generation_config` (a transformers GenerationConfig or a dict): the fields it sets are defaults under
    the arguments passed explicitly. `num_beams` > 1: beam search (`bamba.beam_search`, as transformers':
    `length_penalty`, `early_stopping` True / False / "never", up to num_beams `num_return_sequences`,
    with `do_sample` beam sampling; not with stop strings or a streamer, which it refuses).
    `stopping_criteria`: callables (a transformers StoppingCriteriaList, say) called as transformers
    calls them after each new token, `criterion(ids, scores)` with ids (b, prompt + new so far) of every
    row (rows already done hold the pad id) and scores the tuple of per-step scores when
    `return_dict_in_generate` and `output_scores`, else None; each returns a bool per row (or one bool
    for all), and a row is done when any returns True (not with beams).
    `use_cache=False` is accepted and ignored: the cache changes only the speed, not the result. With
    `return_dict_in_generate=True` the result is a `GenerateOutput` (`.sequences`, and `.scores` /
    `.logits` when `output_scores` / `output_logits`), with beams a `GenerateBeamOutput`.
    """
    with _ended(streamer):  # also on an error or with nothing to generate: an iterating consumer returns
        cfg = model.config
        if inputs is not None:
            if input_ids is not None:
                raise ValueError("pass the prompt once: as input_ids or as inputs (its transformers name)")
            input_ids = inputs
        if not isinstance(input_ids, Tensor):
            raise TypeError(
                f"input_ids must be a (batch, length) tensor of token ids, found {type(input_ids).__name__}"
            )
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, found dtype {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be (batch, length) with length >= 1, found shape {tuple(input_ids.shape)}"
            )
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor):
                raise TypeError(f"attention_mask must be a tensor, found {type(attention_mask).__name__}")
            if attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected the shape of "
                    f"input_ids {tuple(input_ids.shape)}"
                )
        # numbers: types first (a string temperature is an error even when greedy), then ranges
        max_new_tokens = None if max_new_tokens is None else _as_int("max_new_tokens", max_new_tokens)
        max_length = None if max_length is None else _as_int("max_length", max_length)
        min_new_tokens = None if min_new_tokens is None else _as_int("min_new_tokens", min_new_tokens)
        min_length = _as_int("min_length", min_length or 0, 0)
        no_repeat_ngram_size = _as_int("no_repeat_ngram_size", no_repeat_ngram_size or 0, 0)
        num_return_sequences = _as_int(
            "num_return_sequences", 1 if num_return_sequences is None else num_return_sequences, 1
        )
        num_beams = _as_int("num_beams", 1 if num_beams is None else num_beams, 1)
        length_penalty = _as_float("length_penalty", 1.0 if length_penalty is None else length_penalty)
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping={early_stopping!r}: expected True, False or 'never'")
        criteria = [stopping_criteria] if callable(stopping_criteria) else list(stopping_criteria or [])
        if any(not callable(c) for c in criteria):
            raise TypeError(
                f"stopping_criteria must be callables criterion(ids, scores) -> bool per row, found "
                f"{stopping_criteria!r}"
            )
        if num_beams > 1:
            for name, value in (
                ("stop_strings", stop_strings),
                ("streamer", streamer),
                ("stopping_criteria", criteria),
            ):
                if value:
                    raise ValueError(
                        f"num_beams={num_beams} with {name}: beam search here stops at eos ids only and "
                        f"returns whole sequences; leave {name} out, or use num_beams=1"
                    )
            if num_return_sequences > num_beams:
                raise ValueError(
                    f"num_return_sequences={num_return_sequences} must be <= num_beams={num_beams}"
                )
        elif num_return_sequences > 1 and not do_sample:  # as transformers: the copies would be identical
            raise ValueError(
                f"num_return_sequences={num_return_sequences} with greedy decoding would return identical "
                "copies; use do_sample=True or num_beams >= num_return_sequences"
            )
        top_k = None if top_k is None else _as_int("top_k", top_k, 0, " (0 or None: no top-k)")
        temperature = _as_float("temperature", 1.0 if temperature is None else temperature)
        top_p = None if top_p is None else _as_float("top_p", top_p)
        min_p = None if min_p is None else _as_float("min_p", min_p)
        repetition_penalty = _as_float(
            "repetition_penalty", 1.0 if repetition_penalty is None else repetition_penalty
        )
        if max_new_tokens is None:
            if max_length is not None and max_length < input_ids.shape[1]:
                raise ValueError(
                    f"max_length={max_length} is shorter than the prompt ({input_ids.shape[1]} tokens)"
                )
            max_new_tokens = max_length - input_ids.shape[1] if max_length is not None else 20
        if max_new_tokens < 0 or (min_new_tokens or 0) < 0:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} and min_new_tokens={min_new_tokens} must be >= 0"
            )
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"the prompt has {input_ids.shape[1]} tokens, longer than the model's context "
                f"(max_position_embeddings={cfg.max_position_embeddings})"
            )
        if do_sample and not temperature > 0:  # nan too
            raise ValueError(f"temperature={temperature} must be > 0 when sampling")
        if seed is not None and not -(2**63) <= _as_int("seed", seed) < 2**64:  # what torch's seeding takes
            raise ValueError(f"seed={seed} must be in [-2**63, 2**64)")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
        if min_p is not None and not 0 <= min_p <= 1:
            raise ValueError(f"min_p={min_p!r} must be in [0, 1]")
        if not repetition_penalty > 0:
            raise ValueError(
                f"repetition_penalty={repetition_penalty} must be a strictly positive float (1.0: no penalty)"
            )
        stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise TypeError(f"stop_strings must be non-empty strings, found {stop_strings!r}")
        if stops and tokenizer is None:
            raise ValueError("stop_strings needs a tokenizer")
        if eos_token_id is NOT_SET:  # given as None: no eos (as transformers)
            eos = []
        else:
            eos = _as_list(eos_token_id) if eos_token_id is not None else default_eos_ids(model)
        if pad_token_id is NOT_SET:  # given as None: none (then the first eos id fills, as transformers)
            pad_token_id = None
        elif pad_token_id is None:
            pad_token_id = _generation_default(model, "pad_token_id")
        if pad_token_id is not None:
            pad_token_id = _as_int("pad_token_id", pad_token_id)
        pad = pad_token_id if pad_token_id is not None else (eos or [0])[0]
        device = model.device
        input_ids = input_ids.to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device).long()
        elif pad_token_id is not None and pad_token_id not in eos and bool((input_ids == pad_token_id).any()):
            # as transformers: a pad id that is not an eos id marks padding (a pad equal to eos could be real)
            attention_mask = (input_ids != pad_token_id).long()  # (b, t)
        # eos is barred until this total length; min_new_tokens, when given (even 0), overrides min_length
        # (as in transformers)
        min_total = input_ids.shape[1] + min_new_tokens if min_new_tokens is not None else min_length
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        warpers = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)  # when sampling
        rules = StepRules(no_repeat_ngram_size, repetition_penalty)
        # where each row's tokens start (its left padding is ignored by the repetition penalty and the stop
        # strings, as transformers' penalty ignores it): (b,)
        if attention_mask is None:
            starts = torch.zeros(input_ids.shape[0], dtype=torch.long, device=device)
        else:
            starts = (attention_mask != 0).long().argmax(dim=1)
            if bool(attention_mask.all()):
                attention_mask = None
        if num_beams > 1:
            from .beam_search import beam_search  # (it builds on this module)

            if max_new_tokens == 0:
                raise ValueError(
                    f"num_beams={num_beams} needs at least one new token; found max_new_tokens=0 (or a "
                    "max_length equal to the prompt's length)"
                )

            beams = beam_search(
                model,
                input_ids,
                attention_mask,
                starts,
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                room=min(max_new_tokens, _ROOM),
                min_total=min_total,
                eos=eos,
                pad=pad,
                rules=rules,
                length_penalty=length_penalty,
                early_stopping=early_stopping,
                num_return_sequences=num_return_sequences,
                prefill_chunk_size=prefill_chunk_size,
                keep_scores=bool(return_dict_in_generate and (output_scores or output_logits)),
                sampling=warpers if do_sample else None,
                generator=generator,
            )
            if not return_dict_in_generate:
                return beams.sequences
            return GenerateBeamOutput(
                beams.sequences,
                beams.sequences_scores if output_scores else None,
                beams.scores if output_scores else None,
                beams.logits if output_logits else None,
                beams.beam_indices,
            )
        if num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
            starts = starts.repeat_interleave(num_return_sequences)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
        b, t = input_ids.shape
        # Finished rows stay in the batch (fed the pad token) when per-step scores are asked for, and when
        # sampling a batch: transformers draws for them too, so the random stream, and with it every
        # row's tokens, matches its for the same seed. Greedy batches drop them (the results are the same).
        # Custom stopping criteria see the whole batch, as in transformers.
        keep_all = (
            bool(return_dict_in_generate and (output_scores or output_logits))
            or (do_sample and b > 1)
            or bool(criteria)
        )
        all_scores: list[Tensor] = []
        all_logits: list[Tensor] = []

        def result(ids: Tensor) -> Tensor | GenerateOutput:
            if not return_dict_in_generate:
                return ids
            return GenerateOutput(
                ids,
                tuple(all_scores) if output_scores else None,
                tuple(all_logits) if output_logits else None,
            )

        if streamer is not None:
            streamer.put(input_ids.cpu())
        # the sequences so far (b, t + room): grown as tokens come, so that a large max_new_tokens (run
        # until eos) costs only what is generated
        out = torch.full((b, t + min(max_new_tokens, _ROOM)), pad, dtype=torch.long, device=device)
        out[:, :t] = input_ids
        if max_new_tokens == 0:
            return result(out)
        active = torch.arange(b, device=device)  # rows of `out` still generating, in cache order
        finished = torch.zeros(b, dtype=torch.bool, device=device)  # keep_all: rows done, fed the pad
        cache = HybridMambaAttentionDynamicCache(cfg)
        mask = attention_mask
        eos_t = torch.tensor(eos, device=device) if eos else None
        stop_window = max((len(s.encode("utf-8")) for s in stops), default=0) + 8  # tokens: >= 1 byte each

        logits = prefill(model, input_ids, cache, mask, prefill_chunk_size)  # (b, vocab)
        n_new = 0
        for step in range(max_new_tokens):
            raw = logits.float()  # (active, vocab)
            # the sequences so far, only for the rules that read them (a copy per step otherwise wasted)
            history = out[active, : t + step] if rules.reads_history else None  # (active, t + step)
            scores = constrain_scores(raw, history, starts[active], t + step, min_total, eos, rules)
            if do_sample:
                scores = process_logits(scores, None, **warpers)
                nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)  # (active,)
            else:
                nxt = scores.argmax(-1)  # (active,)
            if keep_all:
                if output_scores:
                    all_scores.append(scores)
                if output_logits:
                    all_logits.append(raw)
                nxt = nxt.masked_fill(finished, pad)
            if t + step == out.shape[1]:  # full: double the new-token room
                out = widen(out, t + grown_room(step, max_new_tokens), pad)
            out[active, t + step] = nxt
            n_new = step + 1
            if streamer is not None:
                streamer.put(nxt.cpu())
            done = torch.isin(nxt, eos_t) if eos_t is not None else torch.zeros_like(nxt, dtype=torch.bool)
            if stops:
                check = active[~finished] if keep_all else active
                hit = _hit_stop(tokenizer, out, check, starts, t + step + 1, stops, stop_window)
                if keep_all:
                    done[~finished] |= hit
                else:
                    done |= hit
            if criteria:  # (keep_all: every row is here, in order)
                scores_so_far = tuple(all_scores) if return_dict_in_generate and output_scores else None
                done |= _criteria_hits(criteria, out[:, : t + step + 1], scores_so_far)
            if keep_all:
                finished |= done
            if step + 1 == max_new_tokens:
                break
            if keep_all:
                if bool(finished.all()):
                    break
            elif bool(done.any()):
                keep = ~done
                if not bool(keep.any()):
                    break
                active, nxt = active[keep], nxt[keep]
                cache.select_batch(keep)
                if mask is not None:
                    mask = mask[keep]
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = decode_step(model, cache, nxt, mask)
        return result(out[:, : t + n_new])


def _criteria_hits(criteria: list[Callable[..., Any]], ids: Tensor, scores: tuple | None) -> Tensor:
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


def _hit_stop(
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


# ----- command line -------------------------------------------------------------------------------------
def load_for_cli(
    model: str | None, dtype: str | None, device: str | None, quantize: str | None
) -> tuple[Any, Any]:
    """Model and tokenizer for the CLI: the embedded demo model when `model` is None."""
    from .checkpoint import one_device
    from .demo import demo_path
    from .hub import resolve_folder
    from .model import BambaForCausalLM
    from .tokenizer import Tokenizer

    folder = resolve_folder(model) if model is not None else demo_path()
    if device is not None and one_device(device, "--device").type == "meta":
        raise ValueError(f"--device {device}: a meta device holds no data; generate on cpu, cuda or mps")
    lm = BambaForCausalLM.from_pretrained(
        folder, dtype=dtype, device=device, quantization=quantize, pack=True
    )
    return lm, Tokenizer.from_pretrained(folder)


def cli_sampling(
    temperature: float, top_p: float | None, top_k: int | None, seed: int | None
) -> dict[str, Any]:
    """generate() options for the CLI's sampling flags: temperature 0 means greedy."""
    if top_k is not None and top_k < 0:
        raise ValueError(f"--top-k {top_k} must be >= 0 (0: no top-k)")
    if not 0 <= temperature < math.inf:  # nan too
        raise ValueError(f"--temperature {temperature} must be a finite number >= 0 (0: greedy)")
    if seed is not None and not 0 <= seed < 2**63:
        raise ValueError(f"--seed {seed} must be in [0, 2**63)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p {top_p} must be in (0, 1]")
    sample = temperature > 0
    return dict(
        do_sample=sample, temperature=temperature if sample else 1.0, top_p=top_p, top_k=top_k, seed=seed
    )


def generate_text(
    prompt: str,
    model: str | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_p: float | None = 0.95,
    top_k: int | None = None,
    seed: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    quantize: str | None = None,
    stream: Callable[[str], None] | None = None,
    stats: dict[str, float] | None = None,
    num_beams: int = 1,
) -> str:
    """What `bamba generate` does: returns the continuation (and streams it to `stream` if given; with
    num_beams > 1, beam search, the whole continuation comes at the end).

    `stats`, if given, is filled with: load_s, prompt_tokens, first_token_s (prefill and the first
    step), new_tokens, decode_s (the steps after the first), decode_bytes (weight bytes one step reads).
    """
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    _check_text("the prompt", prompt)
    _check_budget(max_new_tokens)
    if type(num_beams) is not int or num_beams < 1:
        raise ValueError(f"--num-beams {num_beams} must be an integer >= 1")
    sampling = cli_sampling(temperature, top_p, top_k, seed)  # checked before the model loads
    t_load = time.perf_counter()
    lm, tok = load_for_cli(model, dtype, device, quantize)
    ids = torch.tensor([tok.encode(prompt)])
    pieces: list[str] = []
    times: list[float] = []  # when each new token arrived

    def on_text(s: str) -> None:
        pieces.append(s)
        if stream is not None:
            stream(s)

    class TimedStreamer(TextStreamer):
        def put(self, new_ids: Tensor | Sequence[int]) -> None:
            if not self._prompt_pending:
                times.append(time.perf_counter())
            super().put(new_ids)

    t_start = time.perf_counter()
    common = dict(
        max_new_tokens=max_new_tokens, **sampling, eos_token_id=eos_ids_with(lm, tok), **pad_id_of(tok)
    )
    if num_beams > 1:  # whole sequences: nothing to stream before the end
        out = generate(lm, ids, num_beams=num_beams, **common)
        new = out[0, ids.shape[1] :].tolist()
        times.extend([time.perf_counter()] * len(new))
        on_text(tok.decode(new, skip_special_tokens=True))
    else:
        generate(
            lm,
            ids,
            **common,
            streamer=TimedStreamer(tok, skip_prompt=True, on_text=on_text, skip_special_tokens=True),
        )
    if stats is not None:
        from .linear import weight_bytes

        stats.update(
            load_s=t_start - t_load,
            prompt_tokens=ids.shape[1],
            first_token_s=(times[0] - t_start) if times else 0.0,
            new_tokens=len(times),
            decode_s=(times[-1] - times[0]) if times else 0.0,
            decode_bytes=weight_bytes(lm, decode_step=True),
        )
    return "".join(pieces)


def _check_text(what: str, text: str) -> None:
    """Text from the command line or stdin must be UTF-8: undecodable bytes arrive as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise ValueError(f"{what} is not valid UTF-8 text (byte {bad!r} at character {e.start})") from None


def _check_budget(max_new_tokens: int) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {max_new_tokens} must be >= 0")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="checkpoint folder or hub repo id (default: the embedded demo model)"
    )
    p.add_argument("--max-new-tokens", type=int, default=200, help="default: 200")
    p.add_argument("--temperature", type=float, default=0.8, help="default: 0.8; 0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.95, help="default: 0.95")
    p.add_argument("--top-k", type=int, default=None, help="default: none")
    p.add_argument("--seed", type=int, default=None, help="a fixed seed makes sampling repeatable")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    p.add_argument(
        "--quantize",
        choices=list(SHORT_NAMES),
        default=None,
        help="int8 / int4: weight-only; int8dq: int8 weights and int8 activations (see bamba.quantize)",
    )


def _cli_generate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    first = True

    def stream(piece: str) -> None:  # the prompt goes out with the first piece, once the model has loaded
        nonlocal first
        print((args.prompt if first else "") + piece, end="", flush=True)
        first = False

    stats: dict[str, float] = {}
    generate_text(
        args.prompt,
        model=args.model,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        stream=stream,
        stats=stats,
        num_beams=args.num_beams,
    )
    print(args.prompt if first else "")  # the prompt alone when nothing was generated
    if args.verbose:
        print(format_stats(stats, time.perf_counter() - start), file=sys.stderr)
    return 0


def format_stats(stats: dict[str, float], total_s: float) -> str:
    """One line: load, prompt (prefill + first token), decode tokens/s and the weight bandwidth it implies."""
    line = (
        f"[load {stats['load_s']:.2f} s | prompt {stats['prompt_tokens']} tokens, first token after "
        f"{stats['first_token_s']:.2f} s"
    )
    steps = stats["new_tokens"] - 1  # the steps timed after the first token
    if steps > 0 and stats["decode_s"] > 0:
        rate = steps / stats["decode_s"]
        line += f" | decode {rate:.1f} tok/s, weights read at {rate * stats['decode_bytes'] / 1e9:.2f} GB/s"
    return line + f" | total {total_s:.1f} s]"


def chat(
    model: str | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_p: float | None = 0.95,
    seed: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    quantize: str | None = None,
    input_fn: Callable[[str], str] = input,
    output_fn: Callable[[str], None] = lambda s: print(s, end="", flush=True),
    top_k: int | None = None,
    system: str | None = None,
) -> None:
    """An interactive loop. With a chat template, turns are kept as messages (after a `system` message if
    given); without one, each line continues the running transcript (after `system`'s text). An empty line
    or EOF (Ctrl-D) ends it. A seed seeds the whole conversation once (each turn continues the same
    random stream). When the conversation outgrows the model's context less `max_new_tokens`, its oldest
    turns are left out of the prompt (whole turns: the system message and the newest line always stay);
    a line whose prompt alone exceeds the context, or that is not UTF-8, is refused and the chat goes on;
    a reply never runs past the context (it gets fewer tokens, with a note, when the prompt leaves less)."""
    _check_budget(max_new_tokens)
    if system is not None:
        _check_text("the system message", system)
    sampling = cli_sampling(temperature, top_p, top_k, None)  # checked before the model loads
    lm, tok = load_for_cli(model, dtype, device, quantize)
    if seed is not None:
        sampling["generator"] = torch.Generator(device=lm.device).manual_seed(seed)
    has_template = getattr(tok, "chat_template", None) is not None
    context = lm.config.max_position_embeddings
    budget = max(1, context - max_new_tokens)  # prompt tokens that leave room for a whole reply
    head: list[Any] = []  # what every prompt starts with: the system message (or text)
    if system is not None:
        head = [{"role": "system", "content": system}] if has_template else [system + "\n\n"]
    turns: list[list[Any]] = []  # earlier turns: [user, assistant] messages, or [line + reply] text
    dropped = 0  # oldest turns left out of the prompt (they never come back)
    while True:
        try:
            line = input_fn("> ")
        except EOFError:
            output_fn("\n")  # leave the terminal on a new line after "> "
            break
        if not line.strip():
            break
        try:
            _check_text("the input line", line)
        except ValueError as e:
            _chat_note(f"{e}; type it again")
            continue
        new = [{"role": "user", "content": line}] if has_template else [line + "\n"]
        ids = _chat_prompt(tok, has_template, head + new)  # the least prompt this line makes
        if len(ids) > context:  # refused before any turn is left out: the history stays as it was
            _chat_note(
                f"this line makes a prompt of {len(ids)} tokens"
                + (" with the system message" if head else "")
                + f", beyond the model's context ({context} tokens); type a shorter one"
            )
            continue
        while dropped < len(turns):  # leave out the oldest turns until the rest fit the budget
            with_turns = _chat_prompt(tok, has_template, head + [m for t in turns[dropped:] for m in t] + new)
            if len(with_turns) <= budget:
                ids = with_turns
                break
            dropped += 1
            _chat_note(
                f"the oldest turn is left out of the prompt ({dropped} so far), so that the conversation "
                f"fits the model's context ({context} tokens, {max_new_tokens} of them for the reply)"
            )
        pieces: list[str] = []
        prompt_ids = torch.tensor([ids])
        room = min(max_new_tokens, context - len(ids))  # the reply stays within the context too
        if room < max_new_tokens:
            _chat_note(
                f"this reply can take {room} tokens, not {max_new_tokens}: the prompt has {len(ids)} of "
                f"the model's {context}"
            )
        generate(
            lm,
            prompt_ids,
            max_new_tokens=room,
            **sampling,
            eos_token_id=eos_ids_with(lm, tok),
            **pad_id_of(tok),
            stopping_criteria=None if has_template else [_blank_line_in_reply(tok, prompt_ids.shape[1])],
            tokenizer=tok,
            streamer=TextStreamer(
                tok,
                skip_prompt=True,
                on_text=lambda s, pieces=pieces: (pieces.append(s), output_fn(s)),
                skip_special_tokens=True,
            ),
        )
        output_fn("\n")
        reply = "".join(pieces)
        if has_template:
            turns.append([*new, {"role": "assistant", "content": reply}])
        else:
            turns.append([new[0] + _reply_text(reply).split("\n\n")[0] + "\n\n"])


def _chat_note(text: str) -> None:
    """A note of `bamba chat` on stderr (the reply streams to stdout)."""
    print(f"bamba chat: {text}", file=sys.stderr, flush=True)


def _chat_prompt(tok: Any, has_template: bool, parts: list[Any]) -> list[int]:
    """The prompt's ids: `parts` are messages rendered by the chat template (which may refuse them), or
    pieces of the plain transcript."""
    if not has_template:
        return tok.encode("".join(parts))
    import jinja2

    try:
        prompt = tok.apply_chat_template(parts, add_generation_prompt=True, tokenize=False)
    except jinja2.TemplateError as e:  # e.g. raise_exception("...") in the template
        hint = "" if parts[0]["role"] == "system" else " (--system gives a system message)"
        raise ValueError(f"the chat template refused the conversation: {e}{hint}") from None
    return tok.encode(prompt, add_special_tokens=False)


def _blank_line_in_reply(tokenizer: Any, prompt_len: int) -> Callable[[Tensor, Any], bool]:
    """A stopping criterion for one row: has the reply (the text after the first `prompt_len` tokens)
    got a blank line after some text? (The stop string "\\n\\n" would also match across the prompt's
    final newline, ending the reply before it starts when the model's first token is a newline.)"""

    def blank_line(ids: Tensor, scores: Any) -> bool:  # (whitespace before any text does not count)
        return "\n\n" in _reply_text(tokenizer.decode(ids[0, prompt_len:].tolist()))

    return blank_line


def _reply_text(text: str) -> str:
    """A template-less chat reply as its turn is cut: Windows line ends as newlines, leading whitespace
    dropped (the turn ends at its first blank line after some text)."""
    return text.replace("\r\n", "\n").lstrip()


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming the text to stdout")
    _add_sampling_args(p)
    p.add_argument(
        "--verbose", action="store_true", help="print load time, first-token time, tok/s and GB/s to stderr"
    )
    p.add_argument(
        "--num-beams",
        type=int,
        default=1,
        help="beam search with this many beams, the text at the end (beam sampling unless --temperature 0)",
    )
    p.add_argument("prompt")
    p.set_defaults(func=_cli_generate)
    c = sub.add_parser("chat", help="an interactive loop (empty line or Ctrl-D to quit)")
    _add_sampling_args(c)
    c.add_argument("--system", default=None, help="a system message that starts the conversation")
    c.set_defaults(
        func=lambda a: chat(
            system=a.system,
            model=a.model,
            max_new_tokens=a.max_new_tokens,
            temperature=a.temperature,
            top_p=a.top_p,
            top_k=a.top_k,
            seed=a.seed,
            dtype=a.dtype,
            device=a.device,
            quantize=a.quantize,
        )
    )
