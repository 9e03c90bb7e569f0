"""`generate`: greedy decoding and sampling over the hybrid cache, as transformers' (beams: beam_search.py).

Its arguments are checked in one place, `GenerationArgs`; the prompt is prefilled once, then one token per
step goes through the cache for the rows still generating (`_Batch`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any, ParamSpec, TypeVar

import torch
from torch import Tensor

from .beam_search import beam_search
from .cache import HybridMambaAttentionDynamicCache
from .decoding import decode_step, prefill
from .outputs import GenerateBeamOutput, GenerateOutput
from .sampling import (
    StepRules,
    as_token_ids,
    constrain_scores,
    criteria_hits,
    default_eos_ids,
    generation_default,
    grown_room,
    pick_tokens,
    process_logits,
    stop_string_hits,
    widen,
)
from .streamers import TextStreamer

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

# an eos_token_id / pad_token_id given as None (leaving it out means the checkpoint's)
NOT_SET = object()
_ROOM = 256  # new-token columns `generate` allocates at first; it doubles them when full

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
    given = dict(locals())  # the arguments by name (the wrapper has put generation_config's fields in them)
    del given["generation_config"]
    with _ended(streamer):  # also on an error or with nothing to generate: an iterating consumer returns
        args = GenerationArgs(**given)
        return _beam_search(model, args) if args.num_beams > 1 else _decode(model, args)


@contextlib.contextmanager
def _ended(streamer: TextStreamer | None) -> Iterator[None]:
    """Run the block, then end `streamer` (if any) however the block exits."""
    try:
        yield
    finally:
        if streamer is not None:
            streamer.end()


@dataclass
class GenerationArgs:
    """generate()'s arguments (generation_config's fields among them), each checked here, then resolved
    against the model: types first, then ranges (a string temperature is refused even when greedy).

    Afterwards the fields hold checked values (input_ids (b, t) on the model's device, max_new_tokens an
    int, ...) and the derived fields below them what the decoding loops read.
    """

    model: InitVar[Any]
    input_ids: Tensor | None
    attention_mask: Tensor | None
    max_new_tokens: int | None
    min_new_tokens: int | None
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    min_p: float | None
    repetition_penalty: float
    eos_token_id: Any  # an id, a list or tensor of them, None (the checkpoint's), or NOT_SET (none)
    pad_token_id: Any  # the same
    stop_strings: str | Sequence[str] | None
    tokenizer: Any
    num_return_sequences: int
    seed: int | None
    generator: torch.Generator | None
    streamer: TextStreamer | None
    max_length: int | None
    prefill_chunk_size: int | None
    inputs: Tensor | None
    min_length: int
    no_repeat_ngram_size: int
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    use_cache: bool  # accepted and ignored: the cache changes only the speed, not the result
    return_dict_in_generate: bool
    output_scores: bool
    output_logits: bool
    stopping_criteria: Sequence[Callable[..., Any]] | Callable[..., Any] | None
    # derived
    eos: list[int] = field(init=False)  # the ids that end a row
    pad: int = field(init=False)  # what fills a row after its end
    min_total: int = field(init=False)  # eos is barred while a sequence (prompt included) is shorter
    starts: Tensor = field(init=False)  # (b,) where each row's tokens start, after its left padding
    stops: list[str] = field(init=False)  # stop strings
    criteria: list[Callable[..., Any]] = field(init=False)  # stopping criteria
    rules: StepRules = field(init=False)  # the bans and penalty of every step
    warpers: dict[str, Any] = field(init=False)  # process_logits' sampling arguments (when do_sample)

    def __post_init__(self, model: Any) -> None:
        self._check_prompt()
        self._check_counts()
        self._check_search()
        self._check_sampling_types()
        self._resolve_length(model.config.max_position_embeddings)
        self._check_sampling_ranges()
        self._resolve_ids(model)
        self._derive(model.device)
        if self.num_beams > 1 and self.max_new_tokens == 0:
            raise ValueError(
                f"num_beams={self.num_beams} needs at least one new token; found max_new_tokens=0 (or a "
                "max_length equal to the prompt's length)"
            )

    @property
    def keep_scores(self) -> bool:
        """Whether each step's scores or logits are returned."""
        return bool(self.return_dict_in_generate and (self.output_scores or self.output_logits))

    def _check_prompt(self) -> None:
        """input_ids (or `inputs`, transformers' name): (b, t) integer ids, t >= 1 (a 1-D prompt is one row);
        attention_mask: None or the same shape."""
        if self.inputs is not None:
            if self.input_ids is not None:
                raise ValueError("pass the prompt once: as input_ids or as inputs (its transformers name)")
            self.input_ids = self.inputs
        ids, mask = self.input_ids, self.attention_mask
        if not isinstance(ids, Tensor):
            raise TypeError(
                f"input_ids must be a (batch, length) tensor of token ids, found {type(ids).__name__}"
            )
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, found dtype {ids.dtype}")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be (batch, length) with length >= 1, found shape {tuple(ids.shape)}"
            )
        if mask is not None:
            if not isinstance(mask, Tensor):
                raise TypeError(f"attention_mask must be a tensor, found {type(mask).__name__}")
            if mask.dim() == 1:
                mask = mask[None]
            if mask.shape != ids.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(mask.shape)}; expected the shape of "
                    f"input_ids {tuple(ids.shape)}"
                )
        self.input_ids, self.attention_mask = ids, mask

    def _check_counts(self) -> None:
        """The lengths and counts are integers (None: their defaults), length_penalty a number."""
        for name in ("max_new_tokens", "max_length", "min_new_tokens"):
            if getattr(self, name) is not None:
                setattr(self, name, _as_int(name, getattr(self, name)))
        self.min_length = _as_int("min_length", self.min_length or 0, 0)
        self.no_repeat_ngram_size = _as_int("no_repeat_ngram_size", self.no_repeat_ngram_size or 0, 0)
        n = self.num_return_sequences
        self.num_return_sequences = _as_int("num_return_sequences", 1 if n is None else n, 1)
        self.num_beams = _as_int("num_beams", 1 if self.num_beams is None else self.num_beams, 1)
        penalty = self.length_penalty
        self.length_penalty = _as_float("length_penalty", 1.0 if penalty is None else penalty)
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping={self.early_stopping!r}: expected True, False or 'never'")

    def _check_search(self) -> None:
        """Stopping criteria are callables; beam search takes neither them, stop strings nor a streamer;
        greedy decoding returns one sequence per prompt (the copies would be identical, as transformers)."""
        given = self.stopping_criteria
        self.criteria = [given] if callable(given) else list(given or [])
        if any(not callable(c) for c in self.criteria):
            raise TypeError(
                f"stopping_criteria must be callables criterion(ids, scores) -> bool per row, found {given!r}"
            )
        n, k = self.num_return_sequences, self.num_beams
        if k > 1:
            refused = (("stop_strings", self.stop_strings), ("streamer", self.streamer))
            for name, value in (*refused, ("stopping_criteria", self.criteria)):
                if value:
                    raise ValueError(
                        f"num_beams={k} with {name}: beam search here stops at eos ids only and "
                        f"returns whole sequences; leave {name} out, or use num_beams=1"
                    )
            if n > k:
                raise ValueError(f"num_return_sequences={n} must be <= num_beams={k}")
        elif n > 1 and not self.do_sample:
            raise ValueError(
                f"num_return_sequences={n} with greedy decoding would return identical "
                "copies; use do_sample=True or num_beams >= num_return_sequences"
            )

    def _check_sampling_types(self) -> None:
        """The sampling controls are numbers (top_k an integer; None: none, or 1.0 for the others)."""
        if self.top_k is not None:
            self.top_k = _as_int("top_k", self.top_k, 0, " (0 or None: no top-k)")
        self.temperature = _as_float("temperature", 1.0 if self.temperature is None else self.temperature)
        self.top_p = None if self.top_p is None else _as_float("top_p", self.top_p)
        self.min_p = None if self.min_p is None else _as_float("min_p", self.min_p)
        penalty = self.repetition_penalty
        self.repetition_penalty = _as_float("repetition_penalty", 1.0 if penalty is None else penalty)

    def _resolve_length(self, context: int) -> None:
        """New tokens: max_new_tokens, else max_length less the prompt, else 20; the prompt fits `context`."""
        t = self.input_ids.shape[1]
        if self.max_new_tokens is None:
            if self.max_length is not None and self.max_length < t:
                raise ValueError(f"max_length={self.max_length} is shorter than the prompt ({t} tokens)")
            self.max_new_tokens = self.max_length - t if self.max_length is not None else 20
        if self.max_new_tokens < 0 or (self.min_new_tokens or 0) < 0:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} and min_new_tokens={self.min_new_tokens} must be >= 0"
            )
        if t > context:
            raise ValueError(
                f"the prompt has {t} tokens, longer than the model's context "
                f"(max_position_embeddings={context})"
            )

    def _check_sampling_ranges(self) -> None:
        if self.do_sample and not self.temperature > 0:  # nan too
            raise ValueError(f"temperature={self.temperature} must be > 0 when sampling")
        seed = self.seed
        if seed is not None and not -(2**63) <= _as_int("seed", seed) < 2**64:  # what torch's seeding takes
            raise ValueError(f"seed={seed} must be in [-2**63, 2**64)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1]")
        if not self.repetition_penalty > 0:
            raise ValueError(
                f"repetition_penalty={self.repetition_penalty} must be a strictly positive float "
                "(1.0: no penalty)"
            )

    def _resolve_ids(self, model: Any) -> None:
        """Stop strings (they need the tokenizer); the eos and pad ids: left out, the checkpoint's; given as
        None, none (then the first eos id pads, as transformers)."""
        given = self.stop_strings
        self.stops = [given] if isinstance(given, str) else list(given or [])
        if any(not isinstance(s, str) or not s for s in self.stops):
            raise TypeError(f"stop_strings must be non-empty strings, found {given!r}")
        if self.stops and self.tokenizer is None:
            raise ValueError("stop_strings needs a tokenizer")
        if self.eos_token_id is NOT_SET:
            self.eos = []
        elif self.eos_token_id is not None:
            self.eos = as_token_ids(self.eos_token_id)
        else:
            self.eos = default_eos_ids(model)
        if self.pad_token_id is NOT_SET:
            self.pad_token_id = None
        elif self.pad_token_id is None:
            self.pad_token_id = generation_default(model, "pad_token_id")
        if self.pad_token_id is not None:
            self.pad_token_id = _as_int("pad_token_id", self.pad_token_id)
        self.pad = self.pad_token_id if self.pad_token_id is not None else (self.eos or [0])[0]

    def _derive(self, device: torch.device) -> None:
        """The prompt on `device`, its mask (when none is given, inferred as transformers does: `input_ids !=
        pad` when the pad id occurs and is not an eos id, whose positions could be real) and the rest of
        what the loops read."""
        self.warpers = dict(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p
        )
        self.rules = StepRules(self.no_repeat_ngram_size, self.repetition_penalty)
        ids = self.input_ids = self.input_ids.to(device)
        pad, mask = self.pad_token_id, self.attention_mask
        if mask is not None:
            mask = mask.to(device).long()
        elif pad is not None and pad not in self.eos and bool((ids == pad).any()):
            mask = (ids != pad).long()  # (b, t)
        # min_new_tokens, when given (even 0), overrides min_length (as in transformers)
        t = ids.shape[1]
        self.min_total = t + self.min_new_tokens if self.min_new_tokens is not None else self.min_length
        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        # left padding is ignored by the repetition penalty and the stop strings, as transformers' penalty
        if mask is None:
            self.starts = torch.zeros(ids.shape[0], dtype=torch.long, device=device)
        else:
            self.starts = (mask != 0).long().argmax(dim=1)
            if bool(mask.all()):
                mask = None
        self.attention_mask = mask


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


@dataclass
class _Batch:
    """One greedy / sampling generate in progress: the output and which of its rows still generate.

    Finished rows stay in the batch, fed the pad token (`keep_all`), when per-step scores are asked for,
    when sampling a batch (transformers draws for them too, so the random stream, and with it every row's
    tokens, matches its for the same seed), and with stopping criteria (they see the whole batch, as in
    transformers). Otherwise they leave the batch and the cache (the results are the same).
    """

    args: GenerationArgs
    prompt: Tensor  # (b, t) the prompts (each num_return_sequences times)
    out: Tensor  # (b, t + room) the sequences so far, pad after them; the room grows as tokens come
    starts: Tensor  # (b,) where each row's tokens start, after its left padding
    mask: Tensor | None  # (active, past) the cache rows' real (1) and padding (0) columns
    active: Tensor  # (active,) the rows of `out` in the cache, in cache order
    finished: Tensor  # (b,) bool, keep_all: the rows done, fed the pad
    keep_all: bool
    eos: Tensor | None  # the eos ids
    stop_window: int  # tokens decoded to look for a stop string: >= 1 byte each
    scores: list[Tensor] = field(default_factory=list)  # per step (b, vocab), keep_all and output_scores
    logits: list[Tensor] = field(default_factory=list)  # per step (b, vocab), keep_all and output_logits

    @classmethod
    def start(cls, args: GenerationArgs) -> _Batch:
        ids, mask, starts, n = args.input_ids, args.attention_mask, args.starts, args.num_return_sequences
        if n > 1:  # each prompt's n copies next to each other: (b * n, t)
            ids, starts = ids.repeat_interleave(n, dim=0), starts.repeat_interleave(n)
            mask = mask.repeat_interleave(n, dim=0) if mask is not None else None
        (b, t), device = ids.shape, ids.device
        out = torch.full((b, t + min(args.max_new_tokens, _ROOM)), args.pad, dtype=torch.long, device=device)
        out[:, :t] = ids
        return cls(
            args,
            ids,
            out,
            starts,
            mask,
            active=torch.arange(b, device=device),
            finished=torch.zeros(b, dtype=torch.bool, device=device),
            keep_all=args.keep_scores or (args.do_sample and b > 1) or bool(args.criteria),
            eos=torch.tensor(args.eos, device=device) if args.eos else None,
            stop_window=max((len(s.encode("utf-8")) for s in args.stops), default=0) + 8,
        )

    @property
    def t(self) -> int:
        return self.prompt.shape[1]

    def next_tokens(self, logits: Tensor, length: int) -> Tensor:
        """The next token of each active row from its logits (active, vocab); `length`: tokens so far."""
        args, raw = self.args, logits.float()
        # the sequences so far, only for the rules that read them (a copy per step otherwise wasted)
        history = self.out[self.active, :length] if args.rules.reads_history else None  # (active, length)
        scores = constrain_scores(
            raw, history, self.starts[self.active], length, args.min_total, args.eos, args.rules
        )
        if args.do_sample:
            scores = process_logits(scores, None, **args.warpers)
        nxt = pick_tokens(scores, args.do_sample, args.generator)  # (active,)
        if not self.keep_all:
            return nxt
        if args.output_scores:
            self.scores.append(scores)
        if args.output_logits:
            self.logits.append(raw)
        return nxt.masked_fill(self.finished, args.pad)

    def add(self, nxt: Tensor, length: int) -> Tensor:
        """Write the active rows' next tokens nxt (active,) at column `length`; which of them are done:
        an eos id, a stop string, a stopping criterion; (active,) bool."""
        args = self.args
        if length == self.out.shape[1]:  # full: double the new-token room
            self.out = widen(self.out, self.t + grown_room(length - self.t, args.max_new_tokens), args.pad)
        self.out[self.active, length] = nxt
        if args.streamer is not None:
            args.streamer.put(nxt.cpu())
        done = torch.isin(nxt, self.eos) if self.eos is not None else torch.zeros_like(nxt, dtype=torch.bool)
        if args.stops:  # (keep_all: not the rows done before)
            live = ~self.finished if self.keep_all else torch.ones_like(done)
            rows = self.active[live]
            done[live] |= stop_string_hits(
                args.tokenizer, self.out, rows, self.starts, length + 1, args.stops, self.stop_window
            )
        if args.criteria:  # (keep_all: every row is here, in order)
            scores = tuple(self.scores) if args.return_dict_in_generate and args.output_scores else None
            done |= criteria_hits(args.criteria, self.out[:, : length + 1], scores)
        if self.keep_all:
            self.finished |= done
        return done

    def all_done(self) -> bool:
        return self.keep_all and bool(self.finished.all())

    def drop(self, done: Tensor, nxt: Tensor, cache: HybridMambaAttentionDynamicCache) -> Tensor | None:
        """Unless keep_all, the rows `done` leave the batch and the cache; the next tokens of those that
        stay (None: none stay)."""
        if self.keep_all or not bool(done.any()):
            return nxt
        keep = ~done
        if not bool(keep.any()):
            return None
        self.active, nxt = self.active[keep], nxt[keep]
        cache.select_batch(keep)
        if self.mask is not None:
            self.mask = self.mask[keep]
        return nxt

    def next_mask(self) -> Tensor | None:
        """The mask of the next step: one more real column."""
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self.mask

    def result(self, length: int) -> Tensor | GenerateOutput:
        """The sequences (b, length), or with return_dict_in_generate a GenerateOutput."""
        args, ids = self.args, self.out[:, :length]
        if not args.return_dict_in_generate:
            return ids
        return GenerateOutput(
            ids,
            tuple(self.scores) if args.output_scores else None,
            tuple(self.logits) if args.output_logits else None,
        )


def _decode(model: Any, args: GenerationArgs) -> Tensor | GenerateOutput:
    """Greedy decoding or sampling: the prompt prefilled once, then one token per step for the rows
    still generating."""
    batch = _Batch.start(args)
    t = batch.t
    if args.streamer is not None:
        args.streamer.put(batch.prompt.cpu())
    if args.max_new_tokens == 0:
        return batch.result(t)
    cache = HybridMambaAttentionDynamicCache(model.config)
    logits = prefill(model, batch.prompt, cache, batch.mask, args.prefill_chunk_size)  # (b, vocab)
    for length in range(t, t + args.max_new_tokens):  # tokens per sequence before this step's
        nxt = batch.next_tokens(logits, length)  # (active,)
        done = batch.add(nxt, length)
        if length + 1 == t + args.max_new_tokens or batch.all_done():
            break
        nxt = batch.drop(done, nxt, cache)
        if nxt is None:
            break
        logits = decode_step(model, cache, nxt, batch.next_mask())
    return batch.result(length + 1)


def _beam_search(model: Any, args: GenerationArgs) -> Tensor | GenerateBeamOutput:
    """generate with num_beams > 1: `bamba.beam_search`."""
    beams = beam_search(
        model,
        args.input_ids,
        args.attention_mask,
        args.starts,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        room=min(args.max_new_tokens, _ROOM),
        min_total=args.min_total,
        eos=args.eos,
        pad=args.pad,
        rules=args.rules,
        length_penalty=args.length_penalty,
        early_stopping=args.early_stopping,
        num_return_sequences=args.num_return_sequences,
        prefill_chunk_size=args.prefill_chunk_size,
        keep_scores=args.keep_scores,
        sampling=args.warpers if args.do_sample else None,
        generator=args.generator,
    )
    if not args.return_dict_in_generate:
        return beams.sequences
    return GenerateBeamOutput(
        beams.sequences,
        beams.sequences_scores if args.output_scores else None,
        beams.scores if args.output_scores else None,
        beams.logits if args.output_logits else None,
        beams.beam_indices,
    )
