"""Packed (padding-free) vs padded training, side by side: real-token throughput and peak memory.

    python benchmarks/bench_packing.py                          # ../shared/data/tinyshakespeare.txt, demo preset
    python benchmarks/bench_packing.py --data corpus.txt --steps 10 --threads 2
    python benchmarks/bench_packing.py --synthetic              # random tokens, no file needed

Both modes train the same model (same initial weights, AdamW) on the same examples, in the same groups:
examples with long-tailed lengths (log-uniform in [min_len, max_len], so most are short and a few are long)
are cut from the text (UTF-8 bytes as token ids, no tokenizer needed) and grouped in order into steps of at
most `--tokens` real tokens. A step is then fed either

- packed: one (1, T) row, `position_ids` and `seq_idx` from `DataCollatorWithFlattening` (no padding), or
- padded: `pad_batch`, a (B, longest) batch with an attention mask (what a plain trainer does),

so both see exactly the same real tokens. Each mode runs in its own child process: its peak RSS is its own
(`ru_maxrss`), reported next to the RSS the child had before its first step.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import random
import resource
import time

DEFAULT_DATA = os.path.join("..", "shared", "data", "tinyshakespeare.txt")
BYTE_OFFSET = 3  # token id = byte + 3: ids 0, 1, 2 stay pad / bos / eos


def make_groups(args: argparse.Namespace) -> list[list[list[int]]]:
    """Steps of examples: each step a list of examples whose lengths sum to at most args.tokens."""
    from bamba.data import pack_examples

    rng = random.Random(args.seed)
    if args.synthetic:
        source = [rng.randrange(256) for _ in range(1 << 20)]
    else:
        with open(args.data, "rb") as f:
            source = list(f.read())
    examples = []
    for _ in range(args.steps * args.tokens // 64 + 64):  # more than enough
        n = int(math.exp(rng.uniform(math.log(args.min_len), math.log(args.max_len + 1))))
        n = min(max(n, args.min_len), args.max_len)
        start = rng.randrange(len(source) - n)
        examples.append([b + BYTE_OFFSET for b in source[start : start + n]])
    groups = list(pack_examples(examples, args.tokens))
    return groups[: args.steps + 1]  # one warm-up step + the measured steps


def run_mode(mode: str, args: argparse.Namespace, groups: list[list[list[int]]]) -> dict[str, float]:
    """Train `len(groups)` steps in one mode (the first one unmeasured); returns throughput and memory."""
    import torch

    from bamba import BambaForCausalLM
    from bamba.config import preset
    from bamba.data import DataCollatorWithFlattening, pad_batch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = BambaForCausalLM(preset(args.config))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    collator = DataCollatorWithFlattening(return_seq_idx=True)
    rss_start = _rss_mib()
    real, fed, elapsed, losses = 0, 0, 0.0, []
    for i, group in enumerate(groups):
        if mode == "packed":
            batch = collator([{"input_ids": ex} for ex in group])  # (1, T) rows
        else:
            batch = pad_batch(group, pad_token_id=0)  # (B, longest) + attention_mask
            batch["labels"][:, 0] = -100  # as packed: the first token of an example is never a target
        n_targets = int((batch["labels"][:, 1:] != -100).sum())
        t0 = time.perf_counter()
        loss = model(**batch, num_items_in_batch=n_targets, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if i > 0:  # step 0 warms up allocators and kernels
            real += sum(map(len, group))
            fed += batch["input_ids"].numel()
            elapsed += dt
    return {
        "tokens_per_s": real / elapsed,
        "real_tokens": real,
        "fed_tokens": fed,
        "seconds": elapsed,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "rss_start_mib": rss_start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(mode: str, args: argparse.Namespace, groups: list, queue: mp.Queue) -> None:
    queue.put(run_mode(mode, args, groups))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="a text file (its bytes are the tokens)")
    parser.add_argument("--synthetic", action="store_true", help="random bytes instead of a file")
    parser.add_argument("--config", default="demo", help="model preset")
    parser.add_argument("--tokens", type=int, default=2048, help="real tokens per step (the row budget)")
    parser.add_argument("--steps", type=int, default=8, help="measured steps (after one warm-up step)")
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.synthetic and not os.path.isfile(args.data):
        parser.error(f"--data {args.data}: no such file (give a text file, or --synthetic)")
    if args.max_len > args.tokens:
        parser.error(f"--max-len {args.max_len} must be <= --tokens {args.tokens}")

    groups = make_groups(args)
    lengths = [len(ex) for g in groups for ex in g]
    source = "synthetic bytes" if args.synthetic else args.data
    print(
        f"preset {args.config} | {source} | {len(groups) - 1} measured steps of <= {args.tokens} real tokens | "
        f"{len(lengths)} examples, lengths {min(lengths)}..{max(lengths)} (median {sorted(lengths)[len(lengths) // 2]}) "
        f"| {args.threads} thread(s)"
    )
    ctx = mp.get_context("spawn")
    results = {}
    for mode in ("packed", "padded"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(mode, args, groups, queue))
        proc.start()
        results[mode] = queue.get()
        proc.join()

    print(
        f"{'mode':<8} {'real tok/s':>11} {'fed tokens':>11} {'padding':>8} {'seconds':>8} {'peak RSS':>10} {'start RSS':>10}"
    )
    for mode, r in results.items():
        pad = 1 - r["real_tokens"] / r["fed_tokens"]
        print(
            f"{mode:<8} {r['tokens_per_s']:>11,.0f} {r['fed_tokens']:>11,} {pad:>8.1%} {r['seconds']:>8.1f} "
            f"{r['peak_rss_mib']:>7,.0f} MiB {r['rss_start_mib']:>6,.0f} MiB"
        )
    packed, padded = results["packed"], results["padded"]
    extra = [r["peak_rss_mib"] - r["rss_start_mib"] for r in (packed, padded)]
    print(
        f"packed / padded: throughput x{packed['tokens_per_s'] / padded['tokens_per_s']:.2f}, "
        f"peak memory above start x{extra[0] / max(extra[1], 1e-9):.2f} ({extra[0]:,.0f} vs {extra[1]:,.0f} MiB) | "
        f"first-step loss {packed['first_loss']:.4f} vs {padded['first_loss']:.4f} (same tokens, same weights)"
    )


if __name__ == "__main__":
    main()
