"""`bamba serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: /v1/completions, /v1/chat/completions (streamed as Server-Sent Events when asked), /v1/models,
/health, /metrics (Prometheus), /tokenize, /detokenize, /tokenizer_info. The model loads in the
background: /health answers 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .chat import load_for_cli
from .engine import Engine, Event, SamplingParams
from .engine import Request as EngineRequest
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse,
)
from .quantize import SHORT_NAMES
from .responses import ChatShape, Choice, CompletionShape, usage_of
from .sampling import default_eos_ids

log = logging.getLogger("bamba.serve")


@dataclass
class EngineSettings:
    """How the engine batches and caches (the `bamba serve` options)."""

    max_running: int = 16
    max_queue: int = 256
    prefix_cache_bytes: int = 2**30
    prefill_chunk: int = 256


class _Run:
    """A request in the engine, seen from the event loop: its events arrive on an asyncio queue."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams, rid: str) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:  # (called from the engine's thread)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(self.queue.put_nowait, event)

        self.request = EngineRequest(rid, prompt, params, sink)
        self.choices = [Choice() for _ in range(params.n)]
        self.engine = engine

    async def events(self) -> AsyncIterator[Event]:
        """Each event until every choice has finished; a failed request raises APIError(500)."""
        while any(c.finish_reason is None for c in self.choices):
            event = await self.queue.get()
            if event.error is not None:
                raise APIError(500, f"the engine failed on this request: {event.error}", type="server_error")
            c = self.choices[event.index]
            c.text += event.text
            c.token_ids += event.token_ids
            c.logprobs += event.logprobs
            c.finish_reason = event.finish_reason
            yield event

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


class Server:
    """The loaded model and its engine, and the checks every endpoint shares."""

    def __init__(
        self, model: Any, tokenizer: Any, name: str, settings: EngineSettings, metrics: ServerMetrics
    ) -> None:
        self.model, self.tokenizer, self.name, self.metrics = model, tokenizer, name, metrics
        self.context = model.config.max_position_embeddings
        self.vocab_size = model.config.vocab_size
        self.engine = Engine(
            model,
            tokenizer,
            max_running=settings.max_running,
            max_queue=settings.max_queue,
            prefix_cache_bytes=settings.prefix_cache_bytes,
            prefill_chunk=settings.prefill_chunk,
            eos_ids=default_eos_ids(model),
            metrics=metrics,
        )
        self.engine.start()

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.name}'",
                "model",
                "model_not_found",
            )

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(
                400,
                f"{param}: token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                param,
                "invalid_value",
            )
        if len(ids) >= self.context:
            raise APIError(
                400,
                f"{param}: {len(ids)} tokens; this model's maximum context length is {self.context} tokens "
                "(prompt and completion together)",
                param,
                "context_length_exceeded",
            )
        return ids

    def max_tokens(self, prompt: list[int], asked: int | None, default: int | None) -> int:
        n = asked if asked is not None else (default if default is not None else self.context - len(prompt))
        if len(prompt) + n > self.context:
            raise APIError(
                400,
                f"max_tokens={n} with a {len(prompt)}-token prompt is past this model's maximum context length "
                f"of {self.context} tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        return n

    def submit(self, prompt: list[int], params: SamplingParams, rid: str) -> _Run:
        run = _Run(self.engine, prompt, params, rid)
        try:
            self.engine.submit(run.request)
        except OverflowError as e:
            raise APIError(
                429, f"the server is busy: {e}; retry later", None, "rate_limit_exceeded", "rate_limit_error"
            ) from None
        self.metrics.prompt_tokens.inc(len(prompt))
        return run

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


# ----- the app -------------------------------------------------------------------------------------------
def create_app(
    load: Callable[[], tuple[Any, Any]],
    name: str,
    api_key: str | None = None,
    settings: EngineSettings | None = None,
) -> FastAPI:
    """The app; `load()` gives (model, tokenizer) and runs in a background thread at start-up."""
    metrics = ServerMetrics()
    state: dict[str, Any] = {"server": None, "error": None}

    def load_in_background() -> None:
        try:
            model, tokenizer = load()
            state["server"] = Server(model, tokenizer, name, settings or EngineSettings(), metrics)
            log.info("model %s ready", name)
        except Exception as e:  # noqa: BLE001  (reported by /health and every request)
            state["error"] = f"{type(e).__name__}: {e}"
            log.error("loading %s failed: %s", name, state["error"])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load_in_background, name="bamba-load", daemon=True).start()
        yield
        if state["server"] is not None:
            state["server"].engine.stop()

    app = FastAPI(title="bamba", lifespan=lifespan)
    app.state.bamba = state

    def server(request: Request) -> Server:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(
                401, "a valid API key is needed (Authorization: Bearer KEY)", None, "invalid_api_key"
            )
        if state["server"] is None:
            message = (
                f"the model failed to load: {state['error']}"
                if state["error"]
                else "the model is still loading"
            )
            raise APIError(503, message, None, "model_not_ready", "server_error")
        return state["server"]

    _add_error_handlers(app)
    _add_info_routes(app, state, metrics, server, name)
    _add_tokenizer_routes(app, server)
    _add_generation_routes(app, server)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(
            APIError(500, f"{type(e).__name__}: {e}", type="server_error").body(), status_code=500
        )


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None


def _add_info_routes(app: FastAPI, state: dict, metrics: ServerMetrics, server: Callable, name: str) -> None:
    @app.get("/health")
    async def health() -> Response:
        if state["server"] is None:
            return JSONResponse(
                {"status": "error" if state["error"] else "loading", "error": state["error"]}, 503
            )
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        srv = server(request)
        card = {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "bamba",
            "max_model_len": srv.context,
        }
        return {"object": "list", "data": [card]}


def _add_tokenizer_routes(app: FastAPI, server: Callable) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        srv = server(request)
        body = parse(TokenizeRequest, await _json_body(request))
        srv.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", "prompt", "invalid_value")
        if body.messages is not None:
            ids = _chat_ids(srv, body.messages, body.add_generation_prompt)
        else:
            ids = srv.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": srv.context}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        srv = server(request)
        body = parse(DetokenizeRequest, await _json_body(request))
        srv.check_model(body.model)
        return {"prompt": srv.tokenizer.decode(srv.check_ids(body.tokens, "tokens"))}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict:
        tok = server(request).tokenizer
        info = {k: getattr(tok, k) for k in ("eos_token", "bos_token", "pad_token", "unk_token")}
        return {
            **info,
            "chat_template": tok.chat_template,
            "vocab_size": tok.vocab_size,
            "tokenizer_class": "Tokenizer",
        }


def _chat_ids(srv: Server, messages: list, add_generation_prompt: bool = True) -> list[int]:
    try:
        return srv.tokenizer.apply_chat_template(
            [m.model_dump(exclude_none=True) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,
        )
    except Exception as e:  # noqa: BLE001  (a template's own refusal: the request's fault)
        raise APIError(
            400,
            f"messages: the chat template refused them ({type(e).__name__}: {e})",
            "messages",
            "invalid_value",
        ) from None


# ----- completions and chat ------------------------------------------------------------------------------
def _add_generation_routes(app: FastAPI, server: Callable) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        srv = server(request)
        body = parse(CompletionRequest, await _json_body(request))
        srv.check_model(body.model)
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of other than n is not supported", "best_of", "invalid_value")
        prompts = _completion_prompts(srv, body.prompt)
        prompt_lp = body.logprobs if body.echo and body.logprobs is not None else None
        params = [
            body.sampling(srv.max_tokens(ids, body.max_tokens, 16), body.logprobs, prompt_lp)
            for _, ids in prompts
        ]
        rid = f"cmpl-{secrets.token_hex(12)}"
        runs = [srv.submit(ids, p, f"{rid}-{i}") for i, ((_, ids), p) in enumerate(zip(prompts, params))]
        shape = CompletionShape(srv, rid, body, prompts)
        return await _respond(request, srv, runs, shape, body.stream, body.stream_options)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        srv = server(request)
        body = parse(ChatRequest, await _json_body(request))
        srv.check_model(body.model)
        ids = srv.check_ids(_chat_ids(srv, body.messages), "messages")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling(srv.max_tokens(ids, asked, None), top, None)
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        runs = [srv.submit(ids, params, rid)]
        return await _respond(request, srv, runs, ChatShape(srv, rid, body), body.stream, body.stream_options)


def _completion_prompts(srv: Server, prompt: Any) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) of each prompt: a string, strings, token ids, or lists of them."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for i, p in enumerate(prompt):
        ids = srv.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, f"prompt[{i}] is empty after tokenization", "prompt", "invalid_value")
        out.append((p if isinstance(p, str) else None, srv.check_ids(ids, "prompt")))
    return out


async def _respond(
    request: Request, srv: Server, runs: list[_Run], shape: Any, stream: bool, options: Any
) -> Response:
    """Stream the runs' chunks as Server-Sent Events, or wait for them and answer once."""
    start = time.monotonic()
    usage = options is not None and options.include_usage
    if stream:
        return StreamingResponse(
            _sse(request, srv, runs, shape, start, usage), media_type="text/event-stream"
        )
    watch = asyncio.create_task(_abort_on_disconnect(request, srv, runs))
    try:
        for run in runs:
            async for _ in run.events():
                pass
    except APIError:
        _finish_log(srv, shape.rid, runs, start, "error")
        raise
    finally:
        watch.cancel()
    _finish_log(srv, shape.rid, runs, start, "ok")
    return JSONResponse(shape.full(runs, usage_of(runs)))


async def _sse(
    request: Request, srv: Server, runs: list[_Run], shape: Any, start: float, usage: bool
) -> AsyncIterator[str]:
    status = "aborted"
    try:
        for chunk in shape.first_chunks(runs):
            yield f"data: {json.dumps(chunk)}\n\n"
        for r, run in enumerate(runs):
            async for event in run.events():
                for chunk in shape.chunks(r, run, event):
                    yield f"data: {json.dumps(chunk)}\n\n"
        if usage:
            yield f"data: {json.dumps(shape.usage_chunk(usage_of(runs)))}\n\n"
        status = "ok"
    except APIError as e:
        status = "error"
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        if status == "aborted":
            for run in runs:
                srv.engine.abort(run.request)
        _finish_log(srv, shape.rid, runs, start, status)
    yield "data: [DONE]\n\n"


async def _abort_on_disconnect(request: Request, srv: Server, runs: list[_Run]) -> None:
    """Free a non-streamed request's slots when its client goes away."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    for run in runs:
        srv.engine.abort(run.request)


def _finish_log(srv: Server, rid: str, runs: list[_Run], start: float, status: str) -> None:
    """One line per request: id, tokens in / out / cached, time to first token, total time."""
    now = time.monotonic()
    firsts = [r.request.first_token_time for r in runs if r.request.first_token_time is not None]
    ttft = f"{min(firsts) - start:.3f}s" if firsts else "-"
    u = usage_of(runs)
    srv.metrics.requests.labels(status=status).inc()
    if firsts:
        srv.metrics.ttft.observe(min(firsts) - min(r.request.arrival for r in runs))
    log.info(
        "%s %s prompt=%d completion=%d cached=%d ttft=%s total=%.3fs",
        rid,
        status,
        u["prompt_tokens"],
        u["completion_tokens"],
        u["prompt_tokens_details"]["cached_tokens"],
        ttft,
        now - start,
    )


# ----- running it ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def running_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` with uvicorn from a background thread for the duration of the block (tests,
    benchmarks, notebooks); yields the base URL once the socket listens (port 0: a free one)."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def serve(
    model: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    quantize: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_running: int = 16,
    max_queue: int = 256,
    prefix_cache_gib: float = 1.0,
    model_name: str | None = None,
) -> None:
    """Serve `model` (a folder or hub id; None: the embedded demo) until interrupted."""
    import uvicorn

    if max_running < 1 or max_queue < 0 or not prefix_cache_gib >= 0:
        raise ValueError(
            f"max_running must be >= 1, max_queue >= 0, prefix_cache_gib >= 0; found {max_running}, "
            f"{max_queue}, {prefix_cache_gib}"
        )
    name = model_name or (model if model is not None else "bamba-demo")
    method = SHORT_NAMES.get(quantize, quantize) if quantize is not None else None  # int8 -> int8_weight_only
    settings = EngineSettings(max_running, max_queue, int(prefix_cache_gib * 2**30))
    app = create_app(lambda: load_for_cli(model, dtype, device, method), name, api_key, settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(app, host=host, port=port, log_level="info")
