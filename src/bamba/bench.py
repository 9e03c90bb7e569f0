"""Side-by-side CPU benchmark: this project against `transformers`, same checkpoint, same thread count.

    bamba bench --threads 2               # creates .bench/bench-small once (random weights), then measures
    bamba bench --quick --json out.json   # fewer tokens, no 4096-token prompts
    bamba bench --rounds 3                # everything three times: medians, and each ratio's range
    python benchmarks/bench.py ...        # the same

Every measured configuration runs in its own child process (`python -m bamba.bench --worker SPEC`), so
the peak RSS reported is that run's own (`ru_maxrss` of the child). The machine's limits are measured in
the same run: fp32 matmul FLOP/s (a large sgemm, the faster of MKL and oneDNN) and memory read
bandwidth (summing a buffer far larger than the last-level cache). From them:

- prefill fraction = tokens/s * matmul FLOPs per token / sgemm FLOP/s, where the FLOPs per token are
  2 * (weights of every Linear but the lm_head) + causal attention (4 * mean context * heads * head_dim
  per attention layer); the SSD scan's own FLOPs are left out, so the fraction is a lower bound. For
  int8dq (int8 activations and weights) the peak is the int8 GEMM's op/s (`torch._int_mm`), measured too;
- decode fraction = steps/s * bytes read per step / bandwidth, where a step reads every weight but the
  embedding table (lm_head included), reads and writes each row's SSM state (fp32) and conv window, and
  reads each row's keys and values.

Both implementations' workers run with glibc's malloc as it comes, or with `--allocator tuned` both call
`bamba.runtime.tune_cpu_allocator` (large freed blocks kept for reuse, as the `bamba` command line does
for itself; it speeds up transformers' batched decoding a lot, ours little). This project is loaded as
the command line loads it (`from_pretrained(..., pack=True)`: bf16 weights
in oneDNN's layout where that was measured to pay); transformers as `from_pretrained(dtype=float32)`.

Each fp32 measure of transformers runs right before or after ours (the pair's order alternates between
rounds), so a ratio compares figures taken in the same minute on a machine whose speed drifts. With
`--rounds N` the whole plan runs N times; each figure is the median over rounds with its range, and each
ratio the median of the rounds' own ratios.

Decode after a P-token prompt: the prompt is prefilled at batch 1 and the cache is then repeated to the
batch size (the cost of a decode step depends on the cache's size, not on its contents); then tokens are
decoded greedily, one forward per step, for both implementations alike. Decoding after 128 tokens is
measured in a process of its own. Decoding after 4096 tokens runs in another, beside a 128-token prompt,
in alternating blocks of steps, so that the extra cost of a token after the long prompt (`extra_cost`:
tok/s after 128 / tok/s after 4096 - 1) compares figures of the same minutes and the same process state.
(Not the reported 128-token figure: glibc's malloc, once a 4096-token prompt has been through it, serves
transformers' batched decoding twice as fast as in a fresh process, 45 against 21 tok/s at batch 8 on
the EPYC.)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from .quantize import SHORT_NAMES

DEFAULT_DIR = ".bench"
PRESET = "bench-small"
# Target ratios of issue 5 (ours / transformers fp32), keyed like the result rows.
TARGETS = {
    ("fp32", "prefill", 512): 1.5,
    ("fp32", "prefill", 2048): 1.5,
    ("fp32", "decode", 1, 128): 2.0,
    ("fp32", "decode", 8, 128): 2.7,
    ("bf16", "decode", 1, 128): 3.0,
    ("int8", "decode", 1, 128): 5.0,
    ("int4", "decode", 1, 128): 6.0,
}
QUANT = SHORT_NAMES  # variant -> quantization method: int8, int4 (weight-only), int8dq


# ----- checkpoints --------------------------------------------------------------------------------------
def ensure_checkpoint(folder: str, preset_name: str = PRESET, seed: int = 0) -> str:
    """A random-weight fp32 checkpoint of `preset_name` in `folder`, created once and reused."""
    import torch

    from .config import preset
    from .model import BambaForCausalLM

    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    print(f"creating {folder} ({preset_name}, random weights, seed {seed}) ...", file=sys.stderr)
    torch.manual_seed(seed)
    model = BambaForCausalLM(preset(preset_name)).eval()
    with torch.no_grad():  # realistic Mamba parameters rather than the all-equal initialisation
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", "D")) or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def ensure_quantized_checkpoint(folder: str, variant: str) -> str:
    """`folder` quantized with `variant` (a key of QUANT), saved once beside it and reused."""
    from .model import BambaForCausalLM

    out = f"{folder.rstrip('/')}-{variant}"
    if os.path.isfile(os.path.join(out, "quantization_config.json")):
        return out
    print(f"creating {out} ...", file=sys.stderr)
    BambaForCausalLM.from_pretrained(folder, quantization=QUANT[variant]).save_pretrained(out)
    return out


# ----- one measured configuration (runs in a child process) ----------------------------------------------
def _load(impl: str, folder: str, variant: str, device: str = "cpu") -> Any:
    import torch

    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    if impl == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        return transformers.BambaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    from .model import BambaForCausalLM

    if variant in QUANT:
        folder = ensure_quantized_checkpoint(folder, variant)  # a saved quantized model: realistic RSS
        return BambaForCausalLM.from_pretrained(folder, device=device, pack=True)
    return BambaForCausalLM.from_pretrained(folder, dtype=dtype, device=device, pack=True)  # as the CLI loads


def _forward(impl: str, model: Any, ids: Any, cache: Any, past: int, keep: int = 1) -> Any:
    """One forward of `ids` (b, l) continuing `cache` (which holds `past` tokens); logits (b, keep, V)."""
    import torch

    if impl == "transformers":
        b, l = ids.shape
        pos = torch.arange(past, past + l, device=ids.device)[None].expand(b, l)
        return model(input_ids=ids, cache=cache, use_cache=True, position_ids=pos, logits_to_keep=keep).logits
    return model(ids, past_key_values=cache, use_cache=True, logits_to_keep=keep).logits


def _new_cache(impl: str, model: Any) -> Any:
    if impl == "transformers":
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    from .cache import HybridMambaAttentionDynamicCache

    return HybridMambaAttentionDynamicCache(model.config)


def _repeat_cache(impl: str, cache: Any, b: int) -> Any:
    """A copy of `cache` (batch 1) repeated to batch b."""
    cache = copy.deepcopy(cache)
    if b == 1:
        return cache
    if impl != "transformers":
        cache.batch_repeat_interleave(b)
        return cache
    # transformers 5's linear-attention cache layers lack batch_repeat_interleave: repeat their tensors.
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "repeat_interleave") and t.dim() > 0:
                setattr(layer, name, t.repeat_interleave(b, dim=0))
        for name in ("conv_states", "recurrent_states"):
            states = getattr(layer, name, None)
            if isinstance(states, (list, dict)):
                items = states.items() if isinstance(states, dict) else enumerate(states)
                for k, t in list(items):
                    if t is not None and hasattr(t, "repeat_interleave"):
                        states[k] = t.repeat_interleave(b, dim=0)
    return cache


def _prefill(impl: str, model: Any, ids: Any, cache: Any, chunk: int | None) -> Any:
    """Run the prompt through the cache, in pieces of `chunk` tokens if given; last logits (b, 1, V)."""
    if not chunk:
        return _forward(impl, model, ids, cache, 0)
    for start in range(0, ids.shape[1], chunk):
        logits = _forward(impl, model, ids[:, start : start + chunk], cache, start)
    return logits


def run_case(
    impl: str,
    folder: str,
    threads: int,
    kind: str,
    variant: str = "fp32",
    lengths: tuple[int, ...] = (),
    prompts: tuple[int, ...] = (128,),
    batches: tuple[int, ...] = (1,),
    steps: int = 16,
    chunk: int | None = None,
    reps: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """Measure one configuration in this process; returns figures and this process's peak RSS (and, on
    a GPU, its peak GPU memory).

    kind "prefill": tokens/s for each prompt length (batch 1, last logits only), best of `reps`.
    kind "decode": tokens/s (all rows) at each batch size after each of `prompts` (a prompt of that many
    tokens), `steps` steps each, as `decode_b{batch}_after_{prompt}`. The prompts' caches live side by
    side and are decoded in alternating blocks of steps, so that the figures after a short and after a
    long prompt are taken in the same minutes (their ratio is the extra cost of a long context).
    On a GPU every timing waits for the device's queued work (torch.cuda.synchronize).
    """
    import torch

    from .linear import weight_bytes

    torch.set_num_threads(threads)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    t0 = time.perf_counter()
    model = _load(impl, folder, variant, device)
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def random_ids(n: int) -> Any:
        return torch.randint(0, vocab, (1, n), generator=gen).to(device)

    result: dict[str, Any] = {"impl": impl, "variant": variant, "kind": kind, "load_s": load_s}
    result["weight_bytes"] = weight_bytes(model)
    result["step_weight_bytes"] = weight_bytes(model, decode_step=True)  # all but an untied embedding
    with torch.inference_mode():
        if kind == "prefill":
            _prefill(impl, model, random_ids(64), _new_cache(impl, model), None)
            for l in lengths:
                ids = random_ids(l)
                best = float("inf")
                for _ in range(reps):
                    cache = _new_cache(impl, model)
                    t = clock()
                    _prefill(impl, model, ids, cache, chunk if l > (chunk or l) else None)
                    best = min(best, clock() - t)
                    del cache
                result[f"prefill_{l}"] = l / best
        elif kind == "decode":
            firsts = {}  # prompt -> (its cache at batch 1, the first token to decode (1, 1))
            for p in prompts:
                base = _new_cache(impl, model)
                logits = _prefill(impl, model, random_ids(p), base, chunk if p > (chunk or p) else None)
                firsts[p] = (base, logits[:, -1].argmax(-1, keepdim=True))
            for b in batches:
                # per prompt: [cache, next tokens (b, 1), tokens so far]
                rows = {
                    p: [_repeat_cache(impl, c, b), t.expand(b, 1).contiguous(), p]
                    for p, (c, t) in firsts.items()
                }
                for p in prompts:
                    _decode_steps(impl, model, rows[p], 2, clock)  # warm-up
                spent = dict.fromkeys(prompts, 0.0)
                blocks = min(4, steps)
                for i in range(blocks):
                    for p in prompts:
                        spent[p] += _decode_steps(
                            impl, model, rows[p], steps // blocks + (i < steps % blocks), clock
                        )
                for p in prompts:
                    result[f"decode_b{b}_after_{p}"] = b * steps / spent[p]
                del rows
        else:
            raise ValueError(f"unknown benchmark kind {kind!r}")
    result["peak_rss"] = peak_rss()
    if cuda:
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return result


def _decode_steps(impl: str, model: Any, state: list, n: int, clock: Any) -> float:
    """n greedy decode steps from state [cache, next tokens (b, 1), tokens so far], updated in place;
    returns the seconds they took."""
    cache, nxt, past = state
    t = clock()
    for _ in range(n):
        out = _forward(impl, model, nxt, cache, past)
        nxt = out[:, -1].argmax(-1, keepdim=True)
        past += 1
    state[1:] = [nxt, past]
    return clock() - t


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM (Linux), which, unlike ru_maxrss, does not carry over the
    parent's peak through fork + exec; ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux units: KiB


def _state_bytes(cfg: Any, b: int, context: int) -> int:
    """Bytes a decode step moves for the cache: SSM states read + written (fp32), conv windows, keys/values."""
    n_attn = sum(kind == "attention" for kind in cfg.layers_block_type)
    n_mamba = cfg.num_hidden_layers - n_attn
    ssm = cfg.mamba_n_heads * cfg.mamba_d_head * cfg.mamba_d_state * 4 * 2
    conv = cfg.mamba_conv_dim * (cfg.mamba_d_conv - 1) * 4 * 2
    kv = 2 * cfg.num_key_value_heads * cfg.attention_head_dim * context * 4
    return b * (n_mamba * (ssm + conv) + n_attn * kv)


def _linear_flops_per_token(cfg: Any, context: int) -> float:
    """Matmul FLOPs per prefill token: Linear layers except the lm_head, and causal attention."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    n_attn = sum(kind == "attention" for kind in cfg.layers_block_type)
    n_mamba = cfg.num_hidden_layers - n_attn
    attn_proj = d * cfg.attention_head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    mamba_proj = d * cfg.mamba_in_proj_size + cfg.mamba_intermediate_size * d
    params = cfg.num_hidden_layers * 3 * d * f + n_attn * attn_proj + n_mamba * mamba_proj
    attn = n_attn * 4 * (context / 2) * cfg.num_attention_heads * cfg.attention_head_dim
    return 2.0 * params + attn


def machine_limits(threads: int) -> dict[str, Any]:
    """fp32 matmul FLOP/s (the faster of torch.mm's BLAS and oneDNN; both are kept), int8 matmul (int32
    sums) op/s, and memory read bandwidth (bytes/s), best of a few runs each; and the CPU's name and the
    paths `bamba.linear` takes for fp32 matmuls there."""
    import torch

    torch.set_num_threads(threads)
    from .linear import (
        GEMV_PROBES,
        X86,
        compiled_gemv_is_fast,
        onednn_available,
        onednn_fp32_is_fast,
        onednn_linear,
    )

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemms = {"sgemm_blas_flops": lambda: a @ b}  # MKL
    if onednn_available():
        gemms["sgemm_onednn_flops"] = lambda: onednn_linear(a, b)
    out: dict[str, Any] = {"cpu": cpu_name()}
    for key, gemm in gemms.items():
        gemm()
        out[key] = 2 * n**3 / min(_timed(gemm) for _ in range(5))
    out["sgemm_flops"] = max(out[key] for key in gemms)
    if onednn_fp32_is_fast():
        out["fp32_matmuls"] = "oneDNN"
    else:
        out["fp32_matmuls"] = "BLAS, oneDNN for 4-256 rows" if onednn_available() and X86 else "BLAS"
    taken = compiled_gemv_is_fast(torch.float32)
    out["fp32_matmuls"] += f"; 1 row: {'compiled GEMV' if taken else 'no compiled GEMV'}"
    out["compiled_gemv_probe"] = GEMV_PROBES.get(torch.float32, "")  # its times, or why not
    if not taken:
        out["fp32_matmuls"] += f" ({out['compiled_gemv_probe']})"
    qa, qb = a.clamp(-1, 1).mul(127).to(torch.int8), b.clamp(-1, 1).mul(127).to(torch.int8)
    torch._int_mm(qa, qb)
    best = min(_timed(lambda: torch._int_mm(qa, qb)) for _ in range(5))
    int8_ops = 2 * n**3 / best
    buf = torch.ones(384 * 2**20)  # 1.5 GiB: far beyond any last-level cache
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(5))
    bandwidth = buf.numel() * 4 / best
    return {**out, "int8_gemm_ops": int8_ops, "mem_bandwidth": bandwidth}


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ----- the parent: plan, spawn children, report --------------------------------------------------------
def _child(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "bamba.bench", "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan(quick: bool, variants: tuple[str, ...], long_prompt: bool, transformers: bool) -> list[list[dict]]:
    """The configurations to run, in groups that run back to back: each fp32 measure of transformers
    beside ours (so a ratio compares figures taken in the same minute), then our other variants alone."""
    steps = 8 if quick else 32
    impls = (["transformers"] if transformers else []) + ["bamba"]
    groups = [
        [
            dict(impl=i, kind="prefill", variant="fp32", lengths=(512, 2048), reps=1 if quick else 2)
            for i in impls
        ]
    ]
    # after 128 tokens in a process of its own; after 4096 beside 128 (see the module doc)
    for prompts in [(128,)] + ([] if quick else [(128, 4096)]):
        groups.append(
            [
                dict(impl=i, kind="decode", variant="fp32", prompts=prompts, batches=(1, 8), steps=steps)
                for i in impls
            ]
        )
    for v in variants:
        if v == "fp32":
            continue
        groups.append([dict(impl="bamba", kind="prefill", variant=v, lengths=(512,), reps=1)])
        groups.append(
            [dict(impl="bamba", kind="decode", variant=v, prompts=(128,), batches=(1, 8), steps=steps)]
        )
    if long_prompt:
        groups.append(
            [dict(impl="bamba", kind="prefill", variant="fp32", lengths=(32768,), chunk=2048, reps=1)]
        )
    return groups


def bench(
    checkpoint: str | None = None,
    threads: int = 2,
    quick: bool = False,
    variants: tuple[str, ...] = ("fp32", "bf16", "int8", "int4", "int8dq"),
    long_prompt: bool = False,
    transformers: bool = True,
    json_path: str | None = None,
    allocator: str = "default",
    rounds: int = 1,
) -> dict[str, Any]:
    """Run the side-by-side benchmark; print a table and return (and optionally write) the JSON report.

    allocator: "default" (glibc as it comes, for both implementations) or "tuned" (both workers call
    `bamba.runtime.tune_cpu_allocator`, as the `bamba` command line does for itself).
    rounds: how many times the whole plan runs. Each figure is then the median over the rounds, with its
    range (`*_range`: min, max), and a ratio is the median of the rounds' ratios, each taken from a pair
    measured back to back (the pair's order alternates)."""
    if allocator not in ("default", "tuned"):
        raise ValueError(f"allocator={allocator!r}: expected 'default' or 'tuned'")
    if type(threads) is not int or threads < 1:
        raise ValueError(f"threads={threads!r}: expected an integer >= 1")
    if type(rounds) is not int or rounds < 1:
        raise ValueError(f"rounds={rounds!r}: expected an integer >= 1")
    if json_path:  # checked now, not after minutes of measuring
        parent = os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise ValueError(f"json_path={json_path!r}: {parent} is not a writable folder")
        if os.path.isdir(json_path):
            raise ValueError(f"json_path={json_path!r} is a folder; give a file path (e.g. bench.json)")
    if not variants:
        raise ValueError("variants: none given; expected a comma list of fp32, bf16, " + ", ".join(QUANT))
    for v in variants:
        if v not in ("fp32", "bf16", *QUANT):
            raise ValueError(f"variant {v!r}: expected one of fp32, bf16, {', '.join(QUANT)}")
    if transformers and importlib.util.find_spec("transformers") is None:
        raise ValueError(
            "bench compares with transformers, which is not installed: pip install transformers (or "
            'pip install -e ".[test]"), or pass --no-transformers to measure this project alone'
        )
    if checkpoint is not None and not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise ValueError(
            f"checkpoint={checkpoint!r}: no config.json there; give a checkpoint folder, or leave it out to "
            f"create (once) and use the random bench-small one under {DEFAULT_DIR}/"
        )
    from .checkpoint import read_config
    from .files import atomic_write

    folder = checkpoint or ensure_checkpoint(os.path.join(DEFAULT_DIR, PRESET))  # (a given one exists)
    cfg = read_config(folder)
    for v in variants:
        if v in QUANT:
            ensure_quantized_checkpoint(folder, v)
    limits = _child({"limits": True, "threads": threads, "allocator": allocator}, threads)
    base = {
        "checkpoint": folder,
        "threads": threads,
        "allocator": allocator,
        "rounds": rounds,
        "limits": limits,
    }
    runs: list[dict] = []
    for rnd in range(rounds):
        for group in plan(quick, variants, long_prompt, transformers):
            # The pair's order alternates between rounds, so a machine that drifts does not favour one side.
            for spec in group if rnd % 2 == 0 else group[::-1]:
                t = time.perf_counter()
                try:
                    r = _child(
                        {**spec, "folder": folder, "threads": threads, "allocator": allocator}, threads
                    )
                except RuntimeError as e:
                    if json_path:  # what was measured is not lost
                        partial = {**base, "runs": runs, "error": str(e)}
                        atomic_write(json_path, lambda f, d=partial: json.dump(d, f, indent=2))
                        print(
                            f"bench: the runs measured before the failure are in {json_path}", file=sys.stderr
                        )
                    raise
                r["spec"], r["round"] = spec, rnd
                runs.append(r)
                print(
                    f"  round {rnd + 1}/{rounds} {spec['impl']:12s} {spec['variant']:4s} {spec['kind']:7s} "
                    f"done in {time.perf_counter() - t:5.1f} s",
                    file=sys.stderr,
                )
    report = {**base, "rows": _rows(runs, cfg, limits), "runs": runs}
    print(format_table(report))
    print(json.dumps({**base, "rows": report["rows"]}))
    if json_path:
        atomic_write(json_path, lambda f: json.dump(report, f, indent=2))
    return report


# the figures summarised over rounds (median and range)
MEDIAN_KEYS = (
    "bamba",
    "transformers_fp32",
    "ratio",
    "limit_fraction",
    "extra_cost",
    "transformers_extra_cost",
)


def _rows(runs: list[dict], cfg: Any, limits: dict[str, float]) -> list[dict]:
    """The report's rows: `_round_rows` of each round; over several rounds, the median of each figure in
    MEDIAN_KEYS with its range (min, max) as `<key>_range`, and the largest peak RSS."""
    rounds = sorted({r.get("round", 0) for r in runs})
    per_round = [_round_rows([r for r in runs if r.get("round", 0) == k], cfg, limits) for k in rounds]
    if len(per_round) == 1:
        return per_round[0]
    rows = []
    for same in zip(*per_round, strict=True):  # every round ran the same plan: rows line up
        row = dict(same[0])
        for key in MEDIAN_KEYS:
            values = [r.get(key) for r in same]
            if None not in values:
                row[key] = statistics.median(values)
                row[f"{key}_range"] = [min(values), max(values)]
        for key in ("bamba_peak_rss", "transformers_peak_rss"):
            if same[0][key] is not None:
                row[key] = max(r[key] for r in same)
        rows.append(row)
    return rows


def _round_rows(runs: list[dict], cfg: Any, limits: dict[str, float]) -> list[dict]:
    """One row per figure of one round: ours, transformers' (fp32, same round), ratio, target, fraction
    of the limit."""

    def transformers_run(spec: dict, key: str) -> dict | None:
        """transformers' fp32 run of the same kind (and prompts) as `spec` that measured `key`."""
        for r in runs:
            s = r["spec"]
            if s["impl"] == "transformers" and s["variant"] == "fp32" and key in r:
                if (s["kind"], s.get("prompts")) == (spec["kind"], spec.get("prompts")):
                    return r
        return None

    rows = []
    for r in runs:
        s = r["spec"]
        if s["impl"] != "bamba":
            continue
        keys = [k for k in r if k.startswith("prefill_")]
        decode = sorted((k for k in r if k.startswith("decode_")), key=lambda k: _decode_key(k)[::-1])
        if len(s.get("prompts", ())) > 1:  # the shortest prompt is there as the baseline of extra_cost
            decode = [k for k in decode if _decode_key(k)[1] != min(s["prompts"])]
        for key in keys + decode:
            hf = transformers_run(s, key)
            row: dict[str, Any] = {
                "variant": s["variant"],
                "measure": key,
                "unit": "tok/s",
                "bamba": r[key],
                "transformers_fp32": hf[key] if hf else None,
                "bamba_peak_rss": r["peak_rss"],
                "transformers_peak_rss": hf["peak_rss"] if hf else None,
                "bamba_weight_bytes": r["weight_bytes"],
            }
            if s["kind"] == "decode":
                b, prompt = _decode_key(key)
                row["measure"], row["prompt"] = f"decode_b{b}", prompt
                per_step = r["step_weight_bytes"] + _state_bytes(cfg, b, prompt + s["steps"] // 2)
                row["limit_fraction"] = r[key] / b * per_step / limits["mem_bandwidth"]
                target_key = (s["variant"], "decode", b, prompt)
                # the extra cost per token after this prompt against the shortest one (same process)
                short = f"decode_b{b}_after_{min(s['prompts'])}"
                if short != key:
                    row["extra_cost"] = r[short] / r[key] - 1
                    row["transformers_extra_cost"] = hf[short] / hf[key] - 1 if hf else None
            else:
                l = int(key.removeprefix("prefill_"))
                peak = limits["int8_gemm_ops" if s["variant"] == "int8dq" else "sgemm_flops"]
                row["limit_fraction"] = r[key] * _linear_flops_per_token(cfg, l) / peak
                target_key = (s["variant"], "prefill", l)
            row["ratio"] = row["bamba"] / row["transformers_fp32"] if hf else None
            row["target"] = TARGETS.get(target_key)
            rows.append(row)
    return rows


def _decode_key(key: str) -> tuple[int, int]:
    """(batch, prompt) of a key "decode_b{batch}_after_{prompt}"."""
    b, prompt = key.removeprefix("decode_b").split("_after_")
    return int(b), int(prompt)


def _fmt(value: float | int | None, spec: str, suffix: str = "", width: int = 9) -> str:
    """A table cell: `value` formatted with `spec` plus `suffix`, right-aligned; blank for None."""
    return f"{'' if value is None else format(value, spec) + suffix:>{width}}"


def format_table(report: dict) -> str:
    lim = report["limits"]
    lines = [
        f"checkpoint {report['checkpoint']}, {report['threads']} threads, {report.get('allocator', 'default')} "
        f"allocator; machine: {lim.get('cpu', '?')}, sgemm {lim['sgemm_flops'] / 1e9:.0f} GFLOP/s "
        f"(fp32 matmuls: {lim.get('fp32_matmuls', '?')}), int8 GEMM {lim['int8_gemm_ops'] / 1e9:.0f} Gop/s, "
        f"memory read {lim['mem_bandwidth'] / 1e9:.1f} GB/s",
        f"{'variant':7s} {'measure':14s} {'prompt':>6s} {'bamba':>9s} {'hf fp32':>9s} {'ratio':>6s} "
        f"{'target':>6s} {'limit%':>6s} {'RSS bamba':>10s} {'RSS hf':>8s}",
    ]
    rounds = report.get("rounds", 1)
    if rounds > 1:
        ranges = any("ratio_range" in r for r in report["rows"])  # (none without transformers)
        range_note = "; ratio range: the lowest and highest round's ratio" if ranges else ""
        lines.insert(1, f"medians of {rounds} rounds{range_note}")
        if ranges:
            lines[-1] += f" {'ratio range':>12s}"
    for r in report["rows"]:
        rss_hf = r["transformers_peak_rss"]
        line = (
            f"{r['variant']:7s} {r['measure']:14s} {_fmt(r.get('prompt'), '', width=6)} {_fmt(r['bamba'], '9.1f')} "
            f"{_fmt(r['transformers_fp32'], '9.1f')} {_fmt(r['ratio'], '5.2f', 'x', 6)} "
            f"{_fmt(r['target'], '.1f', 'x', 6)} {_fmt(None if r['limit_fraction'] is None else 100 * r['limit_fraction'], '5.0f', '%', 6)} "
            f"{_fmt(r['bamba_peak_rss'] / 2**30, '8.2f', 'Gi', 10)} "
            f"{_fmt(None if rss_hf is None else rss_hf / 2**30, '6.2f', 'Gi', 8)}"
        )
        if "ratio_range" in r:
            line += f" {'{:.2f}-{:.2f}x'.format(*r['ratio_range']):>12s}"
        lines.append(line)
    for r in report["rows"]:
        if r.get("extra_cost") is not None:
            line = (
                f"{r['variant']} {r['measure']}: a token after {r['prompt']} tokens costs "
                f"{100 * r['extra_cost']:+.1f}% against the shortest prompt (same process)"
            )
            if "extra_cost_range" in r:
                line += " [{:+.1f}%, {:+.1f}%]".format(*(100 * v for v in r["extra_cost_range"]))
            if r.get("transformers_extra_cost") is not None:
                line += f"; transformers {100 * r['transformers_extra_cost']:+.1f}%"
            lines.append(line)
    return "\n".join(lines)


# ----- command line -------------------------------------------------------------------------------------
def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark against transformers on the CPU (prefill, decode, memory)")
    p.add_argument(
        "--checkpoint", default=None, help=f"checkpoint folder (default {DEFAULT_DIR}/{PRESET}, created)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer decode steps, no 4096-token prompts")
    p.add_argument(
        "--variants",
        default="fp32,bf16,int8,int4,int8dq",
        help="comma list of fp32, bf16, int8, int4 (weight-only), int8dq (int8 weights and activations); "
        "fp32 is always measured, beside transformers (the ratios' baseline)",
    )
    p.add_argument("--long", action="store_true", help="also prefill a 32768-token prompt (chunked)")
    p.add_argument("--no-transformers", action="store_true", help="measure this project only")
    p.add_argument("--json", default=None, help="also write the full report here")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run everything this many times (pairs alternating) and report medians and ranges",
    )
    p.add_argument(
        "--allocator",
        choices=["default", "tuned"],
        default="default",
        help="glibc malloc as it comes, or tuned (bamba.runtime) in both implementations' workers",
    )
    p.set_defaults(
        func=lambda a: (
            bench(
                checkpoint=a.checkpoint,
                threads=a.threads,
                quick=a.quick,
                variants=tuple(v for v in a.variants.split(",") if v),
                long_prompt=a.long,
                transformers=not a.no_transformers,
                json_path=a.json,
                allocator=a.allocator,
                rounds=a.rounds,
            )
            and 0
        )
    )


def _worker_main(argv: list[str]) -> None:
    from .runtime import tune_cpu_allocator

    spec = json.loads(argv[argv.index("--worker") + 1])
    if spec.pop("allocator", "default") == "tuned":  # the same process setting for both implementations
        tune_cpu_allocator()
    if spec.pop("limits", False):
        out = machine_limits(spec["threads"])
    else:
        for key in ("lengths", "batches"):
            if key in spec:
                spec[key] = tuple(spec[key])
        out = run_case(**spec)
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    """`python -m bamba.bench [options]` / `python benchmarks/bench.py [options]` (the options of `bamba bench`)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        _worker_main(argv)
        return 0
    parser = argparse.ArgumentParser(prog="bamba.bench")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
