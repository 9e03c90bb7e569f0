"""`bamba serve` over HTTP: a real uvicorn server on 127.0.0.1, talked to with the official openai client."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from bamba.generation import generate
from bamba.server import EngineSettings, create_app, running_in_thread

http = httpx.Client(timeout=120)  # (a first request in a fresh process pays one-time CPU probes)


@contextlib.contextmanager
def running(load, name: str = "demo", api_key: str | None = None, wait: bool = True, **settings):
    """A server on a free loopback port; yields (base url, app) once /health says ready (or loading)."""
    app = create_app(load, name, api_key, EngineSettings(**settings))
    with running_in_thread(app) as url:
        deadline = time.monotonic() + 60
        while http.get(url + "/health").status_code != (200 if wait else 503) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield url, app


@pytest.fixture(scope="module")
def server(demo_fp32):
    with running(lambda: demo_fp32, max_running=8, prefill_chunk=32) as (url, app):
        yield url, app


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


def alone(demo_fp32, prompt_ids: list[int], n: int) -> list[int]:
    model, _ = demo_fp32
    out = generate(model, torch.tensor([prompt_ids]), max_new_tokens=n)[0, len(prompt_ids) :].tolist()
    return out[: out.index(2) + 1] if 2 in out else out  # (generate pads after eos)


def test_completion_equals_generate(client, demo_fp32):
    _, tok = demo_fp32
    r = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=16, temperature=0)
    expected = tok.decode(alone(demo_fp32, tok.encode("ROMEO:"), 16), skip_special_tokens=True)
    assert r.choices[0].text == expected and r.object == "text_completion"
    assert r.usage.prompt_tokens == len(tok.encode("ROMEO:")) and r.usage.completion_tokens <= 16


def test_streamed_completion_equals_the_whole_one(client):
    kw = dict(model="demo", prompt=["ROMEO:", "JULIET:"], max_tokens=12, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts = ["", ""]
    for c in chunks[:-1]:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == [c.text for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_streamed_and_not(client, demo_fp32):
    _, tok = demo_fp32
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    r = client.chat.completions.create(model="demo", messages=messages, max_tokens=12, temperature=0)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert r.choices[0].message.content == tok.decode(alone(demo_fp32, ids, 12), skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(
        model="demo",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(
        ids
    )  # the same prompt, again: all cached


def test_n_seed_and_stop(client):
    kw = dict(model="demo", prompt="ROMEO:", max_tokens=12, temperature=1.0, seed=11, n=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
    assert a.choices[0].text != a.choices[1].text
    greedy = (
        client.completions.create(model="demo", prompt="ROMEO:", max_tokens=12, temperature=0).choices[0].text
    )
    stop = greedy[4:6]
    r = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == greedy[: greedy.index(stop)] and r.choices[0].finish_reason == "stop"


def test_echo_logprobs_as_lm_eval_reads_them(client, demo_fp32):
    """lm-eval's local-completions loglikelihood request: token ids, echo, logprobs=1, max_tokens=1; it sums
    token_logprobs[ctxlen:-1] and checks each against max(top_logprobs)."""
    model, tok = demo_fp32
    context, continuation = tok.encode("ROMEO:\nI will"), tok.encode(" go", add_special_tokens=False)
    ids = context + continuation
    r = client.completions.create(
        model="demo", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    direct = sum(float(logp[i - 1, ids[i]]) for i in range(len(context), len(ids)))
    assert abs(sum(lp.token_logprobs[len(context) : -1]) - direct) < 1e-4
    assert r.choices[0].text.startswith(tok.decode(ids)) and lp.text_offset[0] == 0
    greedy = all(t == max(top.values()) for t, top in zip(lp.token_logprobs[1:-1], lp.top_logprobs[1:-1]))
    assert greedy == all(int(logp[i - 1].argmax()) == ids[i] for i in range(1, len(ids)))


def test_sixteen_clients_at_once(server, demo_fp32):
    """16 concurrent greedy clients with mixed prompts, some sharing a long prefix: each gets exactly what
    its prompt gives alone, nothing lost or crossed."""
    _, tok = demo_fp32
    base = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east. " * 4
    prompts = [base + f"Line {i}:" if i % 2 else f"Speaker {i}:" for i in range(16)]
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=300)

    def ask(p: str) -> str:
        return client.completions.create(model="demo", prompt=p, max_tokens=10, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts))
    for p, a in zip(prompts, answers):
        assert a == tok.decode(alone(demo_fp32, tok.encode(p), 10), skip_special_tokens=True)


def test_a_prefix_hit_skips_prefill(server, client, demo_fp32):
    """/metrics' prefilled-token counter grows by the new part only when a prompt extends a cached one."""
    _, tok = demo_fp32
    url = server[0]

    def prefilled() -> float:
        for line in http.get(url + "/metrics").text.splitlines():
            if line.startswith("bamba_prefill_tokens_total"):
                return float(line.split()[-1])
        raise AssertionError("no bamba_prefill_tokens_total")

    first = tok.encode("KING HENRY:\nOnce more unto the breach, dear friends, once more; " * 3)
    more = tok.encode("or close the wall up", add_special_tokens=False)
    client.completions.create(model="demo", prompt=first, max_tokens=2, temperature=0)
    before = prefilled()
    r = client.completions.create(model="demo", prompt=first + more, max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens == len(first)  # the end of the first prompt
    assert prefilled() - before == len(more)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "hi"}, 400, "model"),
        ({"model": "demo"}, 400, "prompt"),
        ({"model": "demo", "prompt": "hi", "bogus": 1}, 400, "bogus"),
        ({"model": "demo", "prompt": 5}, 400, "prompt"),
        ({"model": "demo", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "nope", "prompt": "hi"}, 404, "model"),
        ({"model": "demo", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "demo", "prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
        ({"model": "demo", "prompt": [1] * 4096}, 400, "prompt"),
        ({"model": "demo", "prompt": [1, 2048]}, 400, "prompt"),
        ({"model": "demo", "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
        ({"model": "demo", "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"model": "demo", "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
        ({"model": "demo", "prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = http.post(server[0] + "/v1/completions", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"] and error["type"] and "code" in error


def test_not_json_and_bad_chat(server):
    r = http.post(
        server[0] + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = http.post(
        server[0] + "/v1/chat/completions", json={"model": "demo", "messages": [{"role": "wizard"}]}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = http.post(server[0] + "/v1/chat/completions", json={"model": "demo", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_info_and_tokenizer_endpoints(server, demo_fp32):
    _, tok = demo_fp32
    url = server[0]
    assert http.get(url + "/health").status_code == 200
    models = http.get(url + "/v1/models").json()
    assert models["data"][0]["id"] == "demo" and models["data"][0]["max_model_len"] == 4096
    r = http.post(url + "/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("test", add_special_tokens=False) and r["count"] == len(r["tokens"])
    assert http.post(url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "test"
    info = http.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    text = http.get(url + "/metrics").text
    for name in (
        "bamba_requests_total",
        "bamba_prompt_tokens_total",
        "bamba_generation_tokens_total",
        "bamba_requests_running",
        "bamba_requests_waiting",
        "bamba_prefix_cache_hits_total",
        "bamba_prefix_cache_bytes",
        "bamba_time_to_first_token_seconds_bucket",
        "bamba_time_per_output_token_seconds_bucket",
    ):
        assert name in text


def test_a_disconnected_client_frees_its_slot(server):
    url, app = server
    with http.stream(
        "POST",
        url + "/v1/completions",
        json={
            "model": "demo",
            "prompt": "ROMEO:",
            "max_tokens": 3000,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        },
    ) as r:
        lines = r.iter_lines()
        next(lines)
        next(lines)
    engine = app.state.bamba["server"].engine
    deadline = time.monotonic() + 30
    while engine.num_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_running == 0


def test_api_key_and_queue_limit(demo_fp32, caplog):
    with running(lambda: demo_fp32, api_key="sekrit", max_queue=0) as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = http.post(url + "/v1/completions", json={"model": "demo", "prompt": "hi"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0)
        with pytest.raises(openai.RateLimitError):  # a waiting line of 0: every request is turned away
            client.completions.create(model="demo", prompt="hi", max_tokens=2)
        assert http.get(url + "/health").status_code == 200  # (open, as vLLM's)


def test_health_is_503_while_loading_and_requests_are_logged(demo_fp32, caplog):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return demo_fp32

    with running(slow_load, wait=False) as (url, _):
        assert http.get(url + "/health").status_code == 503
        r = http.post(url + "/v1/completions", json={"model": "demo", "prompt": "hi"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        release.set()
        deadline = time.monotonic() + 30
        while http.get(url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        with caplog.at_level(logging.INFO, logger="bamba.serve"):
            http.post(url + "/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 3})
        line = next(r.message for r in caplog.records if r.name == "bamba.serve" and "prompt=" in r.message)
        assert (
            "cmpl-" in line
            and "completion=3" in line
            and "cached=" in line
            and "ttft=" in line
            and "total=" in line
        )


def test_an_engine_failure_fails_that_request_only(demo_fp32):
    from test_engine import Poisoned

    model, tok = demo_fp32
    with running(lambda: (Poisoned(model, poison=5), tok)) as (url, _):
        r = http.post(url + "/v1/completions", json={"model": "demo", "prompt": [1, 5, 6], "max_tokens": 3})
        assert r.status_code == 500 and "poisoned prompt" in r.json()["error"]["message"]
        ok = http.post(
            url + "/v1/completions",
            json={"model": "demo", "prompt": "ROMEO:", "max_tokens": 3, "temperature": 0},
        )
        assert ok.status_code == 200 and json.loads(ok.text)["choices"][0]["text"]


def test_bamba_serve_command_serves_the_demo_model():
    """`bamba serve` with no model: the embedded demo_fp32, on localhost; one completion, then a clean stop."""
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bamba", "serve", "--port", str(port), "--max-running", "2"],
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if http.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.2)
        r = http.post(
            url + "/v1/completions", json={"model": "bamba-demo", "prompt": "ROMEO:", "max_tokens": 4}
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "prompt=" in err and "completion=4" in err  # the request's log line
