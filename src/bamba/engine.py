"""The serving engine: continuous batching over one model, with exact prefix-state caching.

One thread owns the model. Each iteration it prefills one piece of the oldest waiting prompt (in its own
one-row cache, restored from the longest cached prefix), then advances every running row by one token
(`decoding.decode_step`, the step `generate` takes). A prompt whose prefill is done joins the running
batch; a row that is done leaves it. Rows hold contexts of different lengths: the batch's keys/values are
right-aligned, with masked padding on the left of shorter rows (see the cache's row operations).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import HybridMambaAttentionDynamicCache
from .decoding import decode_step
from .prefix_cache import PrefixCache
from .sampling import draw, process_logits

log = logging.getLogger("bamba.serve")


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI's names; 0 / None: off)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k log-probabilities of each generated token
    prompt_logprobs: int | None = None  # the same for each prompt token (echo)
    n: int = 1


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (raw logits) and the `top` most likely tokens'."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What the engine reports to a request's sink: new text of one choice, its end, or a failure."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    error: str | None = None


@dataclass
class Request:
    """A prompt to complete. `sink(event)` is called from the engine's thread."""

    id: str
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    arrival: float = field(default_factory=time.monotonic)
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    first_token_time: float | None = None
    aborted: bool = False


class _Row:
    """One running choice of a request: its tokens, text decoder, random stream and stop checks."""

    def __init__(self, request: Request, index: int, tokenizer: Any, generator: torch.Generator) -> None:
        self.request, self.index, self.generator = request, index, generator
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.tokens: list[int] = []
        self.text = ""  # decoded so far
        self.sent = 0  # characters of `text` already reported
        self.last_token_time = time.monotonic()


@dataclass
class _Prefill:
    """A prompt being prefilled: its one-row cache, how far it got, and the last logits."""

    request: Request
    cache: HybridMambaAttentionDynamicCache
    done: int
    split_at: int  # a position where a snapshot is wanted (a prefix another prompt shares), or 0
    logits: Tensor | None = None  # (vocab,) fp32 after `done` tokens


class Engine:
    """Runs requests through `model` in one background thread (`start`), or step by step (`step`)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_running: int = 16,
        max_queue: int = 256,
        prefix_cache_bytes: int = 2**30,
        prefill_chunk: int = 256,
        eos_ids: list[int] | None = None,
        metrics: Any = None,
    ) -> None:
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.config = model.config
        self.max_running, self.max_queue, self.prefill_chunk = max_running, max_queue, prefill_chunk
        self.context = self.config.max_position_embeddings
        self.eos_ids = set(eos_ids or [])
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.waiting: deque[Request] = deque()
        self.prefilling: _Prefill | None = None
        self.rows: list[_Row] = []
        self.cache = HybridMambaAttentionDynamicCache(self.config)
        self.mask: Tensor | None = None  # (rows, columns) bool: the batch's real (True) and padding columns
        self.prefilled_tokens = 0  # prompt tokens run through the model (cache hits excluded)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ----- the calling side (any thread) -------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; OverflowError when the waiting line is full."""
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise OverflowError(f"the waiting line is full ({self.max_queue} requests)")
            self.waiting.append(request)
            self._wake.notify()

    def abort(self, request: Request) -> None:
        """Stop a request at the next step (its client went away); its slot is freed."""
        request.aborted = True
        with self._wake:
            self._wake.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bamba-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def num_running(self) -> int:
        return len(self.rows) + (self.prefilling is not None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def _run(self) -> None:
        while not self._stopping:
            try:
                worked = self.step()
            except Exception as e:  # noqa: BLE001  (a bug here must not leave every client waiting forever)
                log.exception("engine step failed; failing the requests in flight")
                self._fail_everything(e)
                worked = True
            if not worked:
                with self._wake:
                    if not self._stopping and not self.waiting:
                        self._wake.wait(timeout=0.5)

    def _fail_everything(self, error: Exception) -> None:
        """Fail every request in flight and start from an empty batch."""
        requests = {id(r.request): r.request for r in self.rows}
        if self.prefilling is not None:
            requests[id(self.prefilling.request)] = self.prefilling.request
        for request in requests.values():
            with contextlib.suppress(Exception):
                self._fail(request, error)
        self.rows, self.prefilling = [], None
        self.cache, self.mask = HybridMambaAttentionDynamicCache(self.config), None

    # ----- one iteration ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        """One prefill piece (if a prompt waits and the batch has room) and one decode step; False when
        there was nothing to do."""
        self._drop_aborted()
        if self.prefilling is None:
            self._admit()
        worked = False
        if self.prefilling is not None:
            self._guarded(self.prefilling.request, self._prefill_piece)
            worked = True
        if self.rows:
            self._decode()
            worked = True
        if self.metrics is not None:
            self.metrics.set_load(len(self.rows), len(self.waiting))
        return worked

    def _guarded(self, request: Request, fn: Callable[[], None]) -> None:
        """Run fn; an exception fails `request` alone (the engine goes on)."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (a failure inside the model ends this request, not the server)
            if self.prefilling is not None and self.prefilling.request is request:
                self.prefilling = None
            self._fail(request, e)

    def _fail(self, request: Request, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        for i in range(request.params.n):
            request.sink(Event(i, finish_reason="error", error=message))
        if self.metrics is not None:
            self.metrics.request_failed()

    def _drop_aborted(self) -> None:
        if self.prefilling is not None and self.prefilling.request.aborted:
            self.prefilling = None
        with self._wake:
            self.waiting = deque(r for r in self.waiting if not r.aborted)
        gone = [i for i, row in enumerate(self.rows) if row.request.aborted]
        if gone:
            self._remove_rows(gone)

    # ----- prefill ---------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Start prefilling the oldest waiting request when its choices fit in the batch."""
        with self._wake:
            if not self.waiting or len(self.rows) + self.waiting[0].params.n > self.max_running:
                return
            request = self.waiting.popleft()
        snap = None
        if request.params.prompt_logprobs is None:  # prompt logprobs need every prompt position's logits
            snap = self.prefix_cache.lookup(request.prompt)
        if snap is None:
            cache, done, logits = HybridMambaAttentionDynamicCache(self.config), 0, None
        else:
            cache = HybridMambaAttentionDynamicCache.from_row_state(self.config, snap.state)
            done, logits = len(snap.tokens), snap.logits
        request.cached_tokens = done
        # where this prompt leaves a prefix that an earlier one shares: worth a snapshot of its own
        shared = self.prefix_cache.longest_shared_prefix(request.prompt)
        self.prefilling = _Prefill(request, cache, done, shared if shared > done else 0, logits)
        if self.metrics is not None:
            self.metrics.prefix_lookup(hit=done > 0, cached_tokens=done)

    def _prefill_piece(self) -> None:
        """Run the next piece of the prompt: up to the next multiple of `prefill_chunk`, or to a shared
        prefix's end; snapshot its state there. The last piece sends the request to the batch."""
        p = self.prefilling
        prompt = p.request.prompt
        if p.done < len(prompt):
            end = min((p.done // self.prefill_chunk + 1) * self.prefill_chunk, len(prompt))
            if p.done < p.split_at < end:
                end = p.split_at
            ids = torch.tensor([prompt[p.done : end]], device=self._device)  # (1, t)
            want_all = p.request.params.prompt_logprobs is not None
            logits = (
                self.model(ids, past_key_values=p.cache, use_cache=True, logits_to_keep=0 if want_all else 1)
                .logits[0]
                .float()
            )  # (t or 1, vocab)
            if want_all:
                self._record_prompt_logprobs(p, logits, end)
            p.done, p.logits = end, logits[-1]
            self.prefilled_tokens += ids.shape[1]
            if self.metrics is not None:
                self.metrics.prefilled(ids.shape[1])
            if end % self.prefill_chunk == 0 or end == p.split_at or end == len(prompt):
                self._snapshot(prompt[:end], p.cache, 0, p.logits)
        if p.done == len(prompt):
            self.prefilling = None
            self._join(p)

    def _record_prompt_logprobs(self, p: _Prefill, logits: Tensor, end: int) -> None:
        """Logprobs of prompt tokens p.done+1 .. end (the first prompt token has none)."""
        prompt, k = p.request.prompt, p.request.params.prompt_logprobs
        if p.done == 0:
            p.request.prompt_logprobs.append(None)
        elif p.logits is not None:  # the token at p.done, predicted by the previous piece's last logits
            p.request.prompt_logprobs.append(token_logprob(p.logits, prompt[p.done], k))
        for j in range(p.done + 1, end):
            p.request.prompt_logprobs.append(token_logprob(logits[j - p.done - 1], prompt[j], k))

    def _snapshot(
        self, tokens: list[int], cache: HybridMambaAttentionDynamicCache, row: int, logits: Tensor
    ) -> None:
        if self.prefix_cache.capacity_bytes and not self.prefix_cache.contains(tokens):
            self.prefix_cache.insert(tokens, cache.row_state(row, len(tokens)), logits.clone())
            if self.metrics is not None:
                self.metrics.set_cache_bytes(self.prefix_cache.bytes)

    # ----- the running batch -----------------------------------------------------------------------------
    def _join(self, p: _Prefill) -> None:
        """Sample each choice's first token from the prompt's last logits and add its rows to the batch."""
        request, n = p.request, p.request.params.n
        cache = p.cache
        if n > 1:
            cache.batch_repeat_interleave(n)
        width, length = max(self.cache.seen_tokens, cache.seen_tokens), cache.seen_tokens
        new_mask = torch.ones(n, length, dtype=torch.bool, device=self._device)
        old = self.mask if self.mask is not None else new_mask[:0]
        self.cache.extend_batch(cache)
        self.mask = torch.cat([F.pad(old, (width - old.shape[1], 0)), F.pad(new_mask, (width - length, 0))])
        seed = request.params.seed
        for i in range(n):
            generator = torch.Generator(device=self._device)
            generator.manual_seed(seed + i if seed is not None else int(torch.randint(2**62, ()).item()))
            self.rows.append(_Row(request, i, self.tokenizer, generator))
        request.first_token_time = time.monotonic()
        self._advance(list(range(len(self.rows) - n, len(self.rows))), p.logits[None].expand(n, -1))

    def _decode(self) -> None:
        """Feed every row its last token; sample the next."""
        tokens = torch.tensor([row.tokens[-1] for row in self.rows], device=self._device)  # (rows,)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        mask = None if bool(self.mask.all()) else self.mask
        try:
            logits = decode_step(self.model, self.cache, tokens, mask).float()  # (rows, vocab)
        except Exception as e:  # noqa: BLE001  (the whole batch's step failed: its requests fail)
            for request in {id(r.request): r.request for r in self.rows}.values():
                self._fail(request, e)
            self._remove_rows(list(range(len(self.rows))))
            return
        self._advance(list(range(len(self.rows))), logits)

    def _advance(self, indices: list[int], logits: Tensor) -> None:
        """Sample the next token of rows `indices` from logits (len(indices), vocab); report; retire the
        rows that are done."""
        done = []
        for i, row_logits in zip(indices, logits):
            row = self.rows[i]
            try:
                finish = self._sample_and_report(row, row_logits)
            except Exception as e:  # noqa: BLE001
                self._fail(row.request, e)
                row.request.aborted = True
                finish = "error"
            if finish is not None:
                done.append(i)
        if done:
            self._remove_rows(done)

    def _sample_and_report(self, row: _Row, logits: Tensor) -> str | None:
        """Choose row's next token, emit its text; the finish reason when the row is done."""
        params = row.request.params
        token = sample(logits, params, row.generator)
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.token_out(now - row.last_token_time, first=not row.tokens)
        row.last_token_time = now
        row.tokens.append(token)
        lp = [token_logprob(logits, token, params.logprobs)] if params.logprobs is not None else []
        stop_token = token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos)
        if not stop_token:
            row.text += row.decoder.step(token)
        finish = self._finish_reason(row, stop_token)
        if finish is not None and not stop_token:
            row.text += row.decoder.flush()
            finish = self._finish_reason(row, False) or finish  # a stop string may end in the flushed text
        text = self._reportable(row, finish)
        row.request.sink(Event(row.index, text, [token], lp, finish))
        if finish is not None:
            self._remember_reply(row, logits)
        return finish

    def _finish_reason(self, row: _Row, stop_token: bool) -> str | None:
        params = row.request.params
        if stop_token:
            return "stop"
        for s in params.stop:
            at = row.text.find(s)
            if at >= 0:
                row.text = row.text[:at]
                return "stop"
        if len(row.tokens) >= params.max_tokens or len(row.request.prompt) + len(row.tokens) >= self.context:
            return "length"
        return None

    def _reportable(self, row: _Row, finish: str | None) -> str:
        """The text not yet reported, less a tail that could still grow into a stop string."""
        hold = 0 if finish is not None else max((len(s) - 1 for s in row.request.params.stop), default=0)
        end = max(row.sent, len(row.text) - hold)
        text, row.sent = row.text[row.sent : end], end
        return text

    def _remember_reply(self, row: _Row, logits: Tensor) -> None:
        """Snapshot prompt + reply (less the last token, which was never fed): a chat's next turn
        re-reads only its new message."""
        if not self.prefix_cache.capacity_bytes or len(row.tokens) < 2:
            return
        tokens = row.request.prompt + row.tokens[:-1]  # what the row's state holds; logits predict the last
        self._snapshot(tokens, self.cache, self.rows.index(row), logits)

    def _remove_rows(self, indices: list[int]) -> None:
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = HybridMambaAttentionDynamicCache(self.config), None
            return
        self.cache.select_batch(torch.tensor(keep, device=self._device))
        self.mask = self.mask[keep]
        lead = int((~self.mask).all(0).long().cumprod(0).sum())  # columns that are padding in every row
        self.cache.drop_leading(lead)
        self.mask = self.mask[:, lead:]

    @property
    def _device(self) -> torch.device:
        return self.model.lm_head.weight.device


# ----- sampling and log-probabilities ---------------------------------------------------------------------
def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token from logits (vocab,) fp32: argmax at temperature 0, else a draw from the
    processed distribution with the row's own random stream."""
    if params.temperature == 0:
        return int(logits.argmax())
    scores = process_logits(
        logits[None],
        None,
        temperature=params.temperature,
        top_k=params.top_k or None,
        top_p=params.top_p,
        min_p=params.min_p or None,
    )  # (1, vocab)
    return int(draw(scores, 1, generator))


def token_logprob(logits: Tensor, token: int, top: int | None) -> TokenLogprob:
    """log p(token) under logits (vocab,), and the `top` most likely tokens' (the chosen one added if it
    is not among them)."""
    logp = logits.float().log_softmax(-1)
    best: list[tuple[int, float]] = []
    if top:
        values, ids = logp.topk(top)
        best = list(zip(ids.tolist(), values.tolist()))
    chosen = float(logp[token])
    if top and token not in {i for i, _ in best}:
        best.append((token, chosen))
    return TokenLogprob(token, chosen if math.isfinite(chosen) else -9999.0, best)
