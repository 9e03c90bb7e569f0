"""bamba vs transformers on one CUDA GPU, side by side, on the bench-small checkpoint (random weights).

    python benchmarks/bench_cuda.py [--checkpoint DIR] [--variants bf16,fp32] [--json FILE]

Both load the same folder in the same dtype onto the GPU and run their pure-PyTorch paths (no mamba_ssm /
causal_conv1d kernels), with the same token ids. The measures are `bamba bench`'s (`bench.run_case`,
here in one process, timings bracketed by torch.cuda.synchronize): prefill tok/s (batch 1, 512 and 2048
tokens, logits of the last token only, best of 3), and decode tok/s at batch 1 and 8 after a 128- and a
4096-token prompt (greedy, 32 steps after 2 warm-up steps; the batch-8 cache is the batch-1 prompt's cache
repeated). Also: peak GPU memory of each, and the largest logit difference between the two on one prompt.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from bench import DEFAULT_DIR, PRESET, ensure_checkpoint, load_model, run_case  # benchmarks/bench.py

CUDA = "cuda"


def measure(impl: str, folder: str, variant: str) -> dict[str, float]:
    """Prefill and decode tok/s, and peak GPU memory (GiB), of one implementation in one variant."""
    common = dict(impl=impl, folder=folder, threads=torch.get_num_threads(), variant=variant, device=CUDA)
    runs = [run_case(kind="prefill", lengths=(512, 2048), reps=3, **common)]
    out = {k: v for k, v in runs[0].items() if k.startswith("prefill_")}
    for prompt in (128, 4096):  # each in a call of its own: the peak memory is that prompt's
        runs.append(run_case(kind="decode", prompts=(prompt,), batches=(1, 8), steps=32, **common))
        out |= {k: v for k, v in runs[-1].items() if k.startswith("decode_")}  # decode_b{b}_after_{prompt}
        torch.cuda.empty_cache()
    out["peak_gpu_gib"] = max(r["peak_gpu_bytes"] for r in runs) / 2**30
    return out


def logit_difference(folder: str, variant: str, vocab: int) -> float:
    ids = torch.randint(0, vocab, (1, 300), generator=torch.Generator().manual_seed(1)).to(CUDA)
    logits = []
    for impl in ("bamba", "transformers"):
        model = load_model(impl, folder, variant, CUDA)
        with torch.inference_mode():
            logits.append(model(ids, use_cache=False).logits.float())
        model = None
        torch.cuda.empty_cache()
    return (logits[0] - logits[1]).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=os.path.join(DEFAULT_DIR, PRESET))
    p.add_argument("--variants", default="bf16,fp32")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda: no CUDA GPU here")
    folder = ensure_checkpoint(args.checkpoint)
    vocab = json.load(open(os.path.join(folder, "config.json")))["vocab_size"]
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    print(f"{report['gpu']}, torch {torch.__version__}, {folder}")
    print(f"{'variant':9s}{'measure':22s}{'bamba':>10s}{'transformers':>14s}{'ratio':>8s}")
    for variant in args.variants.split(","):
        ours = measure("bamba", folder, variant)
        theirs = measure("transformers", folder, variant)
        diff = logit_difference(folder, variant, vocab)
        for key in ours:
            ratio = ours[key] / theirs[key] if key != "peak_gpu_gib" else theirs[key] / ours[key]
            print(f"{variant:9s}{key:22s}{ours[key]:10.1f}{theirs[key]:14.1f}{ratio:7.2f}x")
            report["rows"].append(
                dict(variant=variant, measure=key, bamba=ours[key], transformers=theirs[key])
            )
        print(f"{variant:9s}{'max |logit diff|':22s}{diff:10.4f}")
        report["rows"].append(dict(variant=variant, measure="max_abs_logit_diff", value=diff))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
