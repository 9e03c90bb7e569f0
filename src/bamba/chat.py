"""`bamba generate` and `bamba chat` as plain keyword-argument functions (their argparse is in bamba.cli)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .checkpoint import one_device
from .demo import demo_path
from .generation import generate
from .hub import resolve_folder
from .linear import weight_bytes
from .model import BambaForCausalLM
from .sampling import NonFiniteScores, eos_ids_with, pad_id_of
from .streamers import TextStreamer
from .tokenizer import Tokenizer


def load_for_cli(
    model: str | None, dtype: str | None, device: str | None, quantize: str | None
) -> tuple[BambaForCausalLM, Tokenizer]:
    """Model and tokenizer for the CLI: the embedded demo model when `model` is None."""
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
    try:
        if num_beams > 1:  # whole sequences: nothing to stream before the end
            out = generate(lm, ids, num_beams=num_beams, **common)
            new = out[0, ids.shape[1] :].tolist()
            times.extend([time.perf_counter()] * len(new))
            on_text(tok.decode(new, skip_special_tokens=True))
        else:
            streamer = TimedStreamer(tok, skip_prompt=True, on_text=on_text, skip_special_tokens=True)
            generate(lm, ids, **common, streamer=streamer)
    except NonFiniteScores as e:  # (weights that hold NaN: say whose)
        raise NonFiniteScores(f"{model or 'the demo model'}: {e}") from None
    if stats is not None:
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
    talk = _Conversation(tok, lm.config.max_position_embeddings, max_new_tokens, system)
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
        ids = talk.prompt(line)
        if ids is not None:
            talk.add(line, _reply(lm, tok, ids, talk, sampling, output_fn))


class _Conversation:
    """The chat so far, and the prompt of its next line: the head (the system message, or its text), as
    many of the latest turns as fit the context less the reply's budget, and the line."""

    def __init__(self, tok: Any, context: int, max_new_tokens: int, system: str | None) -> None:
        self.tok = tok
        self.has_template = getattr(tok, "chat_template", None) is not None
        self.context = context
        self.max_new_tokens = max_new_tokens
        self.head: list[Any] = []  # what every prompt starts with: the system message (or text)
        if system is not None:
            self.head = [{"role": "system", "content": system}] if self.has_template else [system + "\n\n"]
        self.turns: list[list[Any]] = []  # earlier turns: [user, assistant] messages, or [line + reply] text
        self.dropped = 0  # oldest turns left out of the prompt (they never come back)

    def _message(self, line: str) -> list[Any]:
        return [{"role": "user", "content": line}] if self.has_template else [line + "\n"]

    def prompt(self, line: str) -> list[int] | None:
        """The ids of the prompt that `line` makes; None, with a note, when the line alone is too long."""
        new = self._message(line)
        context, budget = self.context, max(1, self.context - self.max_new_tokens)  # room for a whole reply
        ids = _chat_prompt(self.tok, self.has_template, self.head + new)  # the least prompt this line makes
        if len(ids) > context:  # refused before any turn is left out: the history stays as it was
            _chat_note(
                f"this line makes a prompt of {len(ids)} tokens"
                + (" with the system message" if self.head else "")
                + f", beyond the model's context ({context} tokens); type a shorter one"
            )
            return None
        while self.dropped < len(self.turns):  # leave out the oldest turns until the rest fit the budget
            kept = [m for turn in self.turns[self.dropped :] for m in turn]
            with_turns = _chat_prompt(self.tok, self.has_template, self.head + kept + new)
            if len(with_turns) <= budget:
                return with_turns
            self.dropped += 1
            _chat_note(
                f"the oldest turn is left out of the prompt ({self.dropped} so far), so that the "
                f"conversation fits the model's context ({context} tokens, {self.max_new_tokens} of them "
                "for the reply)"
            )
        return ids

    def add(self, line: str, reply: str) -> None:
        """The turn of `line` and its `reply` (a template-less turn ends at the reply's first blank line)."""
        new = self._message(line)
        if self.has_template:
            self.turns.append([*new, {"role": "assistant", "content": reply}])
        else:
            self.turns.append([new[0] + _reply_text(reply).split("\n\n")[0] + "\n\n"])


def _reply(
    lm: Any,
    tok: Any,
    ids: list[int],
    talk: _Conversation,
    sampling: dict[str, Any],
    output_fn: Callable[[str], None],
) -> str:
    """Generate the reply to the prompt `ids`, streaming it to `output_fn`; the reply's text."""
    pieces: list[str] = []
    prompt_ids = torch.tensor([ids])
    room = min(talk.max_new_tokens, talk.context - len(ids))  # the reply stays within the context too
    if room < talk.max_new_tokens:
        _chat_note(
            f"this reply can take {room} tokens, not {talk.max_new_tokens}: the prompt has {len(ids)} of "
            f"the model's {talk.context}"
        )
    generate(
        lm,
        prompt_ids,
        max_new_tokens=room,
        **sampling,
        eos_token_id=eos_ids_with(lm, tok),
        **pad_id_of(tok),
        stopping_criteria=None if talk.has_template else [_blank_line_in_reply(tok, prompt_ids.shape[1])],
        tokenizer=tok,
        streamer=TextStreamer(
            tok,
            skip_prompt=True,
            on_text=lambda s: (pieces.append(s), output_fn(s)),
            skip_special_tokens=True,
        ),
    )
    output_fn("\n")
    return "".join(pieces)


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
