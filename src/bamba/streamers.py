"""Streamers: `generate` hands them token ids as they come; they emit text as soon as it is complete."""

from __future__ import annotations

import inspect
import queue
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from .tokenizer import DecodeStream


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
