"""bamba vs transformers on one CUDA GPU, side by side, on the bench-small checkpoint (random weights).

    python benchmarks/bench_cuda.py [--checkpoint DIR] [--dtypes bfloat16,float32] [--json FILE]

Both load the same folder in the same dtype onto the GPU and run their pure-PyTorch paths (no mamba_ssm /
causal_conv1d kernels), with the same token ids. Measured, as `bamba bench` does on the CPU: prefill tok/s
(batch 1, 512 and 2048 tokens, logits of the last token only, best of 3), and decode tok/s at batch 1 and 8
after a 128- and a 4096-token prompt (greedy, 32 steps after 2 warm-up steps; the batch-8 cache is the
batch-1 prompt's cache repeated). Every timing brackets the work with torch.cuda.synchronize(). Also:
peak GPU memory of each, and the largest logit difference between the two on one prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from bamba.bench import DEFAULT_DIR, PRESET, _forward, _new_cache, _prefill, _repeat_cache, ensure_checkpoint

CUDA = torch.device("cuda")


def load(impl: str, folder: str, dtype: torch.dtype) -> Any:
    if impl == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        return transformers.BambaForCausalLM.from_pretrained(folder, dtype=dtype).to(CUDA).eval()
    from bamba import BambaForCausalLM

    return BambaForCausalLM.from_pretrained(folder, dtype=dtype, device=CUDA)


def timed(fn: Any) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def measure(impl: str, folder: str, dtype: torch.dtype, vocab: int, steps: int = 32) -> dict[str, float]:
    torch.cuda.reset_peak_memory_stats()
    model = load(impl, folder, dtype)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    with torch.inference_mode():
        _prefill(
            impl,
            model,
            torch.randint(0, vocab, (1, 64), generator=gen).to(CUDA),
            _new_cache(impl, model),
            None,
        )
        for n in (512, 2048):
            ids = torch.randint(0, vocab, (1, n), generator=gen).to(CUDA)
            best = min(
                timed(lambda ids=ids: _prefill(impl, model, ids, _new_cache(impl, model), None))
                for _ in range(3)
            )
            out[f"prefill_{n}"] = n / best
        for prompt in (128, 4096):
            ids = torch.randint(0, vocab, (1, prompt), generator=gen).to(CUDA)
            base = _new_cache(impl, model)
            logits = _prefill(impl, model, ids, base, None)
            for b in (1, 8):
                cache = _repeat_cache(impl, base, b)
                state = {
                    "next": logits[:, -1].argmax(-1, keepdim=True).expand(b, 1).contiguous(),
                    "past": prompt,
                }

                def step(state: dict = state, cache: Any = cache) -> None:
                    logits = _forward(impl, model, state["next"], cache, state["past"])
                    state["next"], state["past"] = logits[:, -1].argmax(-1, keepdim=True), state["past"] + 1

                for _ in range(2):
                    step()
                out[f"decode_b{b}_after_{prompt}"] = (
                    b * steps / timed(lambda step=step: [step() for _ in range(steps)])
                )
                del cache
    out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def logit_difference(folder: str, dtype: torch.dtype, vocab: int) -> float:
    ids = torch.randint(0, vocab, (1, 300), generator=torch.Generator().manual_seed(1)).to(CUDA)
    logits = []
    for impl in ("bamba", "transformers"):
        model = load(impl, folder, dtype)
        with torch.inference_mode():
            logits.append(model(ids, use_cache=False).logits.float())
        model = None
        torch.cuda.empty_cache()
    return (logits[0] - logits[1]).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=os.path.join(DEFAULT_DIR, PRESET))
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda: no CUDA GPU here")
    folder = ensure_checkpoint(args.checkpoint)
    vocab = json.load(open(os.path.join(folder, "config.json")))["vocab_size"]
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    print(f"{report['gpu']}, torch {torch.__version__}, {folder}")
    print(f"{'dtype':9s}{'measure':22s}{'bamba':>10s}{'transformers':>14s}{'ratio':>8s}")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        ours = measure("bamba", folder, dtype, vocab)
        torch.cuda.empty_cache()
        theirs = measure("transformers", folder, dtype, vocab)
        torch.cuda.empty_cache()
        diff = logit_difference(folder, dtype, vocab)
        for key in ours:
            ratio = ours[key] / theirs[key] if key != "peak_gpu_gib" else theirs[key] / ours[key]
            print(f"{name:9s}{key:22s}{ours[key]:10.1f}{theirs[key]:14.1f}{ratio:7.2f}x")
            report["rows"].append(dict(dtype=name, measure=key, bamba=ours[key], transformers=theirs[key]))
        print(f"{name:9s}{'max |logit diff|':22s}{diff:10.4f}")
        report["rows"].append(dict(dtype=name, measure="max_abs_logit_diff", value=diff))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
