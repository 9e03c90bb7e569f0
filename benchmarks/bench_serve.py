"""`bamba serve` under load, on bench-small (random weights), in one process: throughput and time to
first token at 1, 4 and 16 concurrent clients; TTFT with a shared 2,000-token system prompt, prefix cache
on and off; an 8-turn chat's prefilled tokens with the cache and without.

    python benchmarks/bench_serve.py [--threads 2] [--folder .bench/bench-small]

bench-small has no tokenizer: a word-level one of its vocabulary size ("w0" .. "w32767", plus the chat
roles) is written beside it, so text and token ids map one to one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from bench import ensure_checkpoint  # benchmarks/bench.py

from bamba import BambaForCausalLM, Tokenizer
from bamba.runtime import tune_cpu_allocator
from bamba.server import EngineSettings, create_app, running_in_thread

ROLES = ["system:", "user:", "assistant:"]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def ensure_word_tokenizer(folder: str, vocab_size: int) -> None:
    """tokenizer.json: one word per id, whitespace-split (the last ids are the chat roles)."""
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    words = [f"w{i}" for i in range(vocab_size - len(ROLES) - 1)] + ["<unk>"] + ROLES
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": TEMPLATE, "unk_token": "<unk>"}, f)


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(30000)}" for _ in range(n))


@contextlib.contextmanager
def serving(model, tok, cache_gib: float):
    app = create_app(
        lambda: (model, tok), "bench-small", settings=EngineSettings(16, 256, int(cache_gib * 2**30))
    )
    with running_in_thread(app) as url:
        while httpx.get(url + "/health").status_code != 200:
            time.sleep(0.1)
        yield url


def stream_completion(url: str, body: dict) -> tuple[float, float, int, str]:
    """(time to first token, total time, completion tokens, text) of one streamed request."""
    start, first, text, tokens = time.perf_counter(), None, "", 0
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    body = {**body, "model": "bench-small", "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + path, json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                piece = c.get("text") or (c.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter()
                text += piece
    return (first or time.perf_counter()) - start, time.perf_counter() - start, tokens, text


def prefilled(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("bamba_prefill_tokens_total"):
            return float(line.split()[-1])
    return 0.0


def concurrency(model, tok, clients: int, rng: random.Random) -> dict:
    bodies = [
        {"prompt": words(rng, 128), "max_tokens": 64, "temperature": 0, "ignore_eos": True}
        for _ in range(clients)
    ]
    with serving(model, tok, 1.0) as url:
        stream_completion(url, {"prompt": words(rng, 16), "max_tokens": 4})  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda b: stream_completion(url, b), bodies))
        wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {
        "clients": clients,
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
    }


def generate_rate(model, tok, rng: random.Random) -> float:
    """One client's baseline: `generate` on the same prompt size, in this process, no server (tok/s,
    prefill included, as a client's figure is)."""
    ids = torch.tensor([tok.encode(words(rng, 128))])
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=64, min_new_tokens=64)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def single_client(model, tok, rng: random.Random, rounds: int = 3) -> dict:
    """One client against `generate`, alternating: the server's own cost at batch 1."""
    body = {"max_tokens": 64, "temperature": 0, "ignore_eos": True}
    served, direct = [], []
    with serving(model, tok, 0.0) as url:
        stream_completion(url, {"prompt": words(rng, 16), "max_tokens": 4})  # warm-up
        generate_rate(model, tok, rng)
        for _ in range(rounds):
            direct.append(generate_rate(model, tok, rng))
            _, wall, tokens, _ = stream_completion(url, {**body, "prompt": words(rng, 128)})
            served.append(tokens / wall)
    return {"served": served, "generate": direct}


def shared_prefix(model, tok, cache_gib: float, rng: random.Random) -> dict:
    system = words(rng, 2000)
    with serving(model, tok, cache_gib) as url:
        for _ in range(2):  # the first reads it; the second leaves a snapshot where the prompts part
            stream_completion(url, {"prompt": system + " " + words(rng, 20), "max_tokens": 1})
        ttfts = [
            stream_completion(
                url, {"prompt": system + " " + words(rng, 20), "max_tokens": 8, "ignore_eos": True}
            )[0]
            for _ in range(5)
        ]
    return {"cache": cache_gib > 0, "ttft_median": statistics.median(ttfts), "ttfts": ttfts}


def chat(model, tok, cache_gib: float, rng: random.Random, turns: int = 8) -> dict:
    messages: list[dict] = [{"role": "system", "content": words(rng, 200)}]
    with serving(model, tok, cache_gib) as url:
        before = prefilled(url)
        for _ in range(turns):
            messages.append({"role": "user", "content": words(rng, 100)})
            _, _, _, reply = stream_completion(
                url, {"messages": messages, "max_tokens": 64, "ignore_eos": True, "temperature": 0}
            )
            messages.append({"role": "assistant", "content": reply})
        done = prefilled(url) - before
    conversation = len(tok.apply_chat_template(messages, return_dict=False))
    return {
        "cache": cache_gib > 0,
        "prefilled": done,
        "conversation_tokens": conversation,
        "ratio": done / conversation,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folder", default=".bench/bench-small")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    folder = ensure_checkpoint(args.folder)
    model = BambaForCausalLM.from_pretrained(folder, pack=True).eval()
    ensure_word_tokenizer(folder, model.config.vocab_size)
    tok = Tokenizer.from_pretrained(folder)
    rng = random.Random(0)
    results: dict = {"threads": args.threads, "concurrency": [], "shared_prefix": [], "chat": []}
    results["single"] = r = single_client(model, tok, rng)
    print(
        "1 client against generate, alternating: "
        + ", ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(r["served"], r["generate"]))
        + " tok/s",
        flush=True,
    )
    for clients in (1, 4, 16):
        results["concurrency"].append(r := concurrency(model, tok, clients, rng))
        print(
            f"{clients:2d} clients: {r['tokens_per_s']:7.1f} tok/s, TTFT p50 {r['ttft_p50']:.3f}s p95 {r['ttft_p95']:.3f}s",
            flush=True,
        )
    for gib in (1.0, 0.0):
        results["shared_prefix"].append(r := shared_prefix(model, tok, gib, rng))
        print(
            f"2,000-token shared prefix, cache {'on ' if gib else 'off'}: TTFT median {r['ttft_median']:.3f}s",
            flush=True,
        )
    for gib in (1.0, 0.0):
        results["chat"].append(r := chat(model, tok, gib, rng))
        print(
            f"8-turn chat, cache {'on ' if gib else 'off'}: prefilled {r['prefilled']:.0f} tokens for a "
            f"{r['conversation_tokens']}-token conversation ({r['ratio']:.2f}x)",
            flush=True,
        )
    c = results["concurrency"]
    s = results["shared_prefix"]
    print(
        f"16 clients / 1 client throughput: {c[2]['tokens_per_s'] / c[0]['tokens_per_s']:.2f}x (target >= 4x)"
    )
    print(
        f"shared-prefix TTFT, cache off / on: {s[1]['ttft_median'] / s[0]['ttft_median']:.1f}x (target >= 10x)"
    )
    print(
        f"8-turn chat prefilled / conversation, cache on: {results['chat'][0]['ratio']:.2f}x (target <= 1.2x)"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
