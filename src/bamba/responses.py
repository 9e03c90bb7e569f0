"""OpenAI's response objects for `bamba serve`: whole responses and streamed chunks, from a run's outputs.

A run (server._Run) has `request` (prompt ids, prompt logprobs, cached tokens) and `choices` (text,
token ids, logprobs, finish reason of each choice); the server (server.Server) gives the model's name
and each token's text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .engine import Event, TokenLogprob
from .protocol import ChatRequest, CompletionRequest


@dataclass
class Choice:
    """One choice's output as it comes in."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


def usage_of(runs: list[Any]) -> dict:
    prompt = sum(len(r.request.prompt) for r in runs)
    completion = sum(r.completion_tokens for r in runs)
    cached = sum(r.request.cached_tokens for r in runs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class CompletionShape:
    """/v1/completions' objects: text_completion, with choice index = prompt * n + choice."""

    def __init__(
        self, srv: Any, rid: str, body: CompletionRequest, prompts: list[tuple[str | None, list[int]]]
    ) -> None:
        self.srv, self.rid, self.body, self.prompts = srv, rid, body, prompts
        self.created = int(time.time())

    def _obj(self, choices: list[dict], **extra: Any) -> dict:
        return {
            "id": self.rid,
            "object": "text_completion",
            "created": self.created,
            "model": self.srv.name,
            "choices": choices,
            **extra,
        }

    def _prompt_text(self, r: int) -> str:
        text, ids = self.prompts[r]
        return text if text is not None else self.srv.tokenizer.decode(ids)

    def full(self, runs: list[Any], usage: dict) -> dict:
        choices = []
        for r, run in enumerate(runs):
            for i, c in enumerate(run.choices):
                text = (self._prompt_text(r) if self.body.echo else "") + c.text
                choices.append(
                    {
                        "index": r * self.body.n + i,
                        "text": text,
                        "logprobs": self._logprobs(run, c, self.body.echo),
                        "finish_reason": c.finish_reason,
                    }
                )
        return self._obj(choices, usage=usage)

    def first_chunks(self, runs: list[Any]) -> list[dict]:
        if not self.body.echo:
            return []
        return [
            self._obj(
                [
                    {
                        "index": r * self.body.n + i,
                        "text": self._prompt_text(r),
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for r in range(len(runs))
            for i in range(self.body.n)
        ]

    def chunks(self, r: int, run: Any, event: Event) -> list[dict]:
        part = Choice(event.text, event.token_ids, event.logprobs)
        logprobs = self._logprobs(run, part, False) if self.body.logprobs is not None else None
        choice = {
            "index": r * self.body.n + event.index,
            "text": event.text,
            "logprobs": logprobs,
            "finish_reason": event.finish_reason,
        }
        return [self._obj([choice])]

    def usage_chunk(self, usage: dict) -> dict:
        return self._obj([], usage=usage)

    def _logprobs(self, run: Any, c: Choice, echo: bool) -> dict | None:
        if self.body.logprobs is None:
            return None
        entries: list[tuple[int, TokenLogprob | None]] = []
        if echo:
            entries += list(zip(run.request.prompt, run.request.prompt_logprobs))
        entries += [(lp.token_id, lp) for lp in c.logprobs]
        tokens = [self.srv.token_text(t) for t, _ in entries]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob if lp is not None else None for _, lp in entries],
            "top_logprobs": [
                {self.srv.token_text(i): v for i, v in lp.top} if lp is not None else None
                for _, lp in entries
            ],
            "text_offset": offsets,
        }


class ChatShape:
    """/v1/chat/completions' objects: chat.completion and chat.completion.chunk."""

    def __init__(self, srv: Any, rid: str, body: ChatRequest) -> None:
        self.srv, self.rid, self.body = srv, rid, body
        self.created = int(time.time())

    def _obj(self, kind: str, choices: list[dict], **extra: Any) -> dict:
        return {
            "id": self.rid,
            "object": kind,
            "created": self.created,
            "model": self.srv.name,
            "choices": choices,
            **extra,
        }

    def full(self, runs: list[Any], usage: dict) -> dict:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(runs[0].choices)
        ]
        return self._obj("chat.completion", choices, usage=usage)

    def first_chunks(self, runs: list[Any]) -> list[dict]:
        return [
            self._obj(
                "chat.completion.chunk",
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            )
            for i in range(self.body.n)
        ]

    def chunks(self, r: int, run: Any, event: Event) -> list[dict]:
        delta = {"content": event.text} if event.text or event.finish_reason is None else {}
        choice = {
            "index": event.index,
            "delta": delta,
            "logprobs": self._logprobs(event.logprobs),
            "finish_reason": event.finish_reason,
        }
        return [self._obj("chat.completion.chunk", [choice])]

    def usage_chunk(self, usage: dict) -> dict:
        return self._obj("chat.completion.chunk", [], usage=usage)

    def _logprobs(self, lps: list[TokenLogprob]) -> dict | None:
        if not self.body.logprobs:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            text = self.srv.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {
                    **entry(lp.token_id, lp.logprob),
                    "top_logprobs": [entry(i, v) for i, v in lp.top[: self.body.top_logprobs or 0]],
                }
                for lp in lps
            ]
        }
