"""lm-evaluation-harness against `bamba serve`: a local loglikelihood task (Tiny Shakespeare continuations)
scored by `lm_eval --model local-completions` through the server, and the same loglikelihoods computed
directly with the model; both printed.

    pip install "lm-eval[api]"
    python recipes/lm_eval_serve.py [--text ../shared/data/tinyshakespeare.txt] [--docs 200] [--model FOLDER]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import torch

TASK = """task: shakespeare_continuations
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def documents(text_path: str, n: int) -> list[dict]:
    """Pairs of consecutive non-empty lines: the second continues the first."""
    with open(text_path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    return [{"context": lines[i] + "\n", "continuation": lines[i + 1]} for i in range(0, 2 * n, 2)]


def direct_loglikelihoods(model_path: str | None, docs: list[dict]) -> list[float]:
    """log p(continuation | context) with the model itself, tokenized as lm-eval does (the whole text
    encoded without special tokens, split where the encoding of the context, less its trailing
    whitespace, ends)."""
    from bamba import BambaForCausalLM, Tokenizer
    from bamba.demo import demo_path

    folder = model_path or demo_path()
    model = BambaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # as the server is run
    tok = Tokenizer.from_pretrained(folder)
    out = []
    for d in docs:
        context = d["context"].rstrip()  # lm-eval moves the context's trailing whitespace to the continuation
        whole = tok.encode(d["context"] + d["continuation"], add_special_tokens=False)
        n_ctx = len(tok.encode(context, add_special_tokens=False))
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)  # (l, vocab)
        out.append(sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole))))
    return out


@contextlib.contextmanager
def server(model_path: str | None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "bamba",
        "serve",
        "--port",
        str(port),
        "--model-name",
        "bamba",
        "--dtype",
        "float32",
    ]
    proc = subprocess.Popen(cmd + (["--model", model_path] if model_path else []))
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError("bamba serve exited")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--text", default=os.path.join(here, "..", "..", "shared", "data", "tinyshakespeare.txt"))
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    args = ap.parse_args()
    docs = documents(args.text, args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "docs.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
        with open(os.path.join(tmp, "task.yaml"), "w") as f:
            f.write(TASK.format(data=data))
        with server(args.model) as url:
            subprocess.run(
                ["lm_eval", "--model", "local-completions", "--tasks", "shakespeare_continuations",
                 "--include_path", tmp, "--output_path", os.path.join(tmp, "out"), "--model_args",
                 f"model=bamba,base_url={url}/v1/completions,num_concurrent=4,max_retries=1,tokenizer_backend=remote"],
                check=True,
            )  # fmt: skip
        result = json.load(
            open(glob.glob(os.path.join(tmp, "out", "**", "results_*.json"), recursive=True)[0])
        )
    served = result["results"]["shakespeare_continuations"]["perplexity,none"]
    lls = direct_loglikelihoods(args.model, docs)
    direct = math.exp(-sum(lls) / len(lls))
    print(
        f"{len(docs)} documents: perplexity through bamba serve + lm_eval {served:.6f}, computed directly {direct:.6f}"
    )


if __name__ == "__main__":
    main()
