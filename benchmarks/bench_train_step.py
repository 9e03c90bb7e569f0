"""fp32 training steps on the CPU, side by side: this project, this project with F.linear only, transformers.

    python benchmarks/bench_train_step.py                      # demo and bench-small presets, 2 threads
    python benchmarks/bench_train_step.py --presets demo --tokens 4096 --steps 5

Each (preset, implementation) runs in its own child process, with the same random initial weights (a
checkpoint folder saved once, which transformers loads too), the same random token batch, and AdamW;
it times `--steps` full steps (forward with labels, backward, optimizer step) after one warm-up step and
reports tokens/s and the first step's loss (the same for all three). The implementations:

- bamba: as `bamba train` runs (fp32 Linear layers train through oneDNN where `bamba.linear` measured its
  GEMM faster than MKL's: `onednn_trains()`);
- bamba F.linear: the same model with that path switched off (every Linear is F.linear: the baseline);
- transformers: `BambaForCausalLM` from transformers (a test extra), on the same folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

IMPLS = ("bamba", "bamba F.linear", "transformers")


def child(impl: str, folder: str, tokens: int, steps: int, threads: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    if impl == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.BambaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        import bamba.linear
        from bamba import BambaForCausalLM

        if impl == "bamba F.linear":
            bamba.linear.onednn_trains = lambda: False  # every Linear takes F.linear
        model = BambaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first_loss = step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return {"tok_s": tokens * steps / (time.perf_counter() - t), "first_loss": first_loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="demo,bench-small")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per step (one row)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(**spec)))
        return

    import torch

    from bamba import BambaForCausalLM
    from bamba.config import preset

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    print(f"{args.tokens} tokens per step, {args.steps} steps after a warm-up, {args.threads} threads")
    print(f"{'preset':12s} {'implementation':16s} {'tok/s':>8s} {'vs transformers':>16s} {'first loss':>11s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets.split(","):
            folder = os.path.join(tmp, name)
            torch.manual_seed(0)
            BambaForCausalLM(preset(name)).save_pretrained(folder)
            results = {}
            for impl in IMPLS:
                spec = dict(
                    impl=impl, folder=folder, tokens=args.tokens, steps=args.steps, threads=args.threads
                )
                out = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps(spec)],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if out.returncode != 0:
                    raise RuntimeError(f"{name} / {impl} failed:\n{out.stderr[-2000:]}")
                results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            base = results["transformers"]["tok_s"]
            for impl, r in results.items():
                print(
                    f"{name:12s} {impl:16s} {r['tok_s']:8.0f} {r['tok_s'] / base:15.2f}x {r['first_loss']:11.6f}"
                )


if __name__ == "__main__":
    main()
