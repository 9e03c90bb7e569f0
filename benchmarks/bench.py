"""`bamba bench`: this project against `transformers` on the CPU, same checkpoint, same thread count.

    bamba bench --threads 2               # creates .bench/bench-small once (random weights), then measures
    bamba bench --quick --json out.json   # fewer tokens, no 4096-token prompts
    bamba bench --rounds 3                # everything three times: medians, and each ratio's range
    python benchmarks/bench.py ...        # the same

What is measured, and how (a child process per configuration, the machine's limits measured in the same
run, each ratio from a pair run back to back): benchmarks/README.md, "The comparison harness".
"""

from __future__ import annotations

import copy
import dataclasses
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

import torch

from bamba.cache import HybridMambaAttentionDynamicCache
from bamba.checkpoint import read_config
from bamba.cli import bench_arguments, build_parser
from bamba.config import preset
from bamba.decoding import decode_step, prefill
from bamba.files import atomic_write
from bamba.linear import (
    GEMV_PROBES,
    X86,
    compiled_gemv_is_fast,
    onednn_available,
    onednn_fp32_is_fast,
    onednn_linear,
    weight_bytes,
)
from bamba.model import BambaForCausalLM
from bamba.quantize import SHORT_NAMES
from bamba.runtime import tune_cpu_allocator

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
    out = f"{folder.rstrip('/')}-{variant}"
    if os.path.isfile(os.path.join(out, "quantization_config.json")):
        return out
    print(f"creating {out} ...", file=sys.stderr)
    BambaForCausalLM.from_pretrained(folder, quantization=QUANT[variant]).save_pretrained(out)
    return out


# ----- one measured configuration (runs in a child process) ----------------------------------------------
def load_model(impl: str, folder: str, variant: str, device: str = "cpu") -> Any:
    """`impl`'s model of `folder` in `variant`: ours as the command line loads it (pack=True), a quantized
    variant from its saved folder (a realistic RSS); transformers' as `from_pretrained(dtype=...)`."""
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    if impl == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        return transformers.BambaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    if variant in QUANT:
        folder = ensure_quantized_checkpoint(folder, variant)
        return BambaForCausalLM.from_pretrained(folder, device=device, pack=True)
    return BambaForCausalLM.from_pretrained(folder, dtype=dtype, device=device, pack=True)


@dataclasses.dataclass
class Subject:
    """One loaded implementation and what its measures share: the clock, the random prompts, the cache.
    Ours decodes through bamba.decoding, as `generate` does; transformers' through its own forward."""

    impl: str
    model: Any
    device: str = "cpu"
    gen: torch.Generator = dataclasses.field(default_factory=lambda: torch.Generator().manual_seed(0))

    def __post_init__(self) -> None:
        self.cuda = torch.device(self.device).type == "cuda"

    def clock(self) -> float:
        """perf_counter, after the GPU's queued work (on a GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def random_ids(self, n: int) -> torch.Tensor:
        """A random prompt of n tokens, (1, n)."""
        vocab = self.model.config.vocab_size
        return torch.randint(0, vocab, (1, n), generator=self.gen).to(self.device)

    def new_cache(self) -> Any:
        if self.impl == "transformers":
            from transformers import DynamicCache

            return DynamicCache(config=self.model.config)
        return HybridMambaAttentionDynamicCache(self.model.config)

    def prefill(self, ids: torch.Tensor, cache: Any, chunk: int | None = None) -> torch.Tensor:
        """Run ids (b, l) through `cache`, in pieces of `chunk` tokens if given; last logits (b, V)."""
        if self.impl != "transformers":
            return prefill(self.model, ids, cache, chunk=chunk)
        chunk = chunk or ids.shape[1]
        for start in range(0, ids.shape[1], chunk):
            logits = self._hf_forward(ids[:, start : start + chunk], cache, start)
        return logits

    def step(self, tokens: torch.Tensor, cache: Any, past: int) -> torch.Tensor:
        """One decode step of tokens (b, 1) after `past` tokens in `cache`; the next logits (b, V)."""
        if self.impl != "transformers":
            return decode_step(self.model, cache, tokens[:, 0])
        return self._hf_forward(tokens, cache, past)

    def _hf_forward(self, ids: torch.Tensor, cache: Any, past: int) -> torch.Tensor:
        """transformers' forward of ids (b, l) after `past` cached tokens; last logits (b, V)."""
        b, l = ids.shape
        pos = torch.arange(past, past + l, device=ids.device)[None].expand(b, l)  # (b, l)
        out = self.model(input_ids=ids, cache=cache, use_cache=True, position_ids=pos, logits_to_keep=1)
        return out.logits[:, -1]

    def repeat_cache(self, cache: Any, b: int) -> Any:
        """A copy of `cache` (batch 1) repeated to batch b."""
        cache = copy.deepcopy(cache)
        if b == 1:
            return cache
        if self.impl != "transformers":
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


@dataclasses.dataclass
class Stream:
    """Rows being decoded greedily: their cache, the tokens to feed next (b, 1), the tokens so far."""

    cache: Any
    next_tokens: torch.Tensor
    past: int


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
    if kind not in ("prefill", "decode"):
        raise ValueError(f"unknown benchmark kind {kind!r}")
    torch.set_num_threads(threads)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    subject = Subject(impl, load_model(impl, folder, variant, device), device)
    result: dict[str, Any] = {"impl": impl, "variant": variant, "kind": kind}
    result["load_s"] = time.perf_counter() - t0
    result["weight_bytes"] = weight_bytes(subject.model)
    result["step_weight_bytes"] = weight_bytes(subject.model, decode_step=True)  # all but an untied embedding
    with torch.inference_mode():
        if kind == "prefill":
            result |= _measure_prefill(subject, lengths, chunk, reps)
        else:
            result |= _measure_decode(subject, prompts, batches, steps, chunk)
    result["peak_rss"] = peak_rss()
    if cuda:
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return result


def _measure_prefill(s: Subject, lengths: tuple[int, ...], chunk: int | None, reps: int) -> dict[str, float]:
    """prefill_{l}: tokens/s of a prompt of l tokens (batch 1), the best of `reps`, after a warm-up."""
    s.prefill(s.random_ids(64), s.new_cache())
    out = {}
    for l in lengths:
        ids = s.random_ids(l)
        best = float("inf")
        for _ in range(reps):
            cache = s.new_cache()
            t = s.clock()
            s.prefill(ids, cache, chunk)
            best = min(best, s.clock() - t)
            del cache
        out[f"prefill_{l}"] = l / best
    return out


def _measure_decode(
    s: Subject, prompts: tuple[int, ...], batches: tuple[int, ...], steps: int, chunk: int | None
) -> dict[str, float]:
    """decode_b{b}_after_{p}: tokens/s of all b rows after a p-token prompt, the prompts decoded side by
    side in alternating blocks of steps (see run_case)."""
    firsts = {}  # prompt -> (its cache at batch 1, the first token to decode (1, 1))
    for p in prompts:
        base = s.new_cache()
        logits = s.prefill(s.random_ids(p), base, chunk)  # (1, V)
        firsts[p] = (base, logits.argmax(-1, keepdim=True))
    out = {}
    for b in batches:
        rows = {
            p: Stream(s.repeat_cache(c, b), t.expand(b, 1).contiguous(), p) for p, (c, t) in firsts.items()
        }
        for p in prompts:
            _decode_steps(s, rows[p], 2)  # warm-up
        spent = dict.fromkeys(prompts, 0.0)
        blocks = min(4, steps)
        for i in range(blocks):
            for p in prompts:
                spent[p] += _decode_steps(s, rows[p], steps // blocks + (i < steps % blocks))
        for p in prompts:
            out[f"decode_b{b}_after_{p}"] = b * steps / spent[p]
        del rows
    return out


def _decode_steps(s: Subject, rows: Stream, n: int) -> float:
    """n greedy decode steps of `rows`, which are updated in place; returns the seconds they took."""
    t = s.clock()
    for _ in range(n):
        logits = s.step(rows.next_tokens, rows.cache, rows.past)  # (b, V)
        rows.next_tokens = logits.argmax(-1, keepdim=True)  # (b, 1)
        rows.past += 1
    return s.clock() - t


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


# ----- the machine's limits (measured in a child process too) -----------------------------------------------
def machine_limits(threads: int) -> dict[str, Any]:
    """fp32 matmul FLOP/s (the faster of torch.mm's BLAS and oneDNN; both are kept), int8 matmul (int32
    sums) op/s, and memory read bandwidth (bytes/s), best of a few runs each; and the CPU's name and the
    paths `bamba.linear` takes for fp32 matmuls there."""
    torch.set_num_threads(threads)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    out: dict[str, Any] = {"cpu": cpu_name(), **_sgemm_flops(a, b)}
    out |= _fp32_matmul_paths()
    return {**out, "int8_gemm_ops": _int8_gemm_ops(a, b), "mem_bandwidth": _read_bandwidth()}


def _sgemm_flops(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """FLOP/s of a @ b (square, n x n) through BLAS and, where it is there, oneDNN; sgemm_flops the faster."""
    n = a.shape[0]
    gemms = {"sgemm_blas_flops": lambda: a @ b}  # MKL
    if onednn_available():
        gemms["sgemm_onednn_flops"] = lambda: onednn_linear(a, b)
    out = {}
    for key, gemm in gemms.items():
        gemm()
        out[key] = 2 * n**3 / min(_timed(gemm) for _ in range(5))
    out["sgemm_flops"] = max(out.values())
    return out


def _fp32_matmul_paths() -> dict[str, str]:
    """Which paths bamba.linear takes for fp32 matmuls here, in words, and its compiled-GEMV probe."""
    if onednn_fp32_is_fast():
        paths = "oneDNN"
    else:
        paths = "BLAS, oneDNN for 4-256 rows" if onednn_available() and X86 else "BLAS"
    taken = compiled_gemv_is_fast(torch.float32)
    paths += f"; 1 row: {'compiled GEMV' if taken else 'no compiled GEMV'}"
    probe = GEMV_PROBES.get(torch.float32, "")  # its times, or why not
    if not taken:
        paths += f" ({probe})"
    return {"fp32_matmuls": paths, "compiled_gemv_probe": probe}


def _int8_gemm_ops(a: torch.Tensor, b: torch.Tensor) -> float:
    """op/s of the int8 GEMM with int32 sums (torch._int_mm) on a and b quantized, n x n."""
    qa, qb = a.clamp(-1, 1).mul(127).to(torch.int8), b.clamp(-1, 1).mul(127).to(torch.int8)
    torch._int_mm(qa, qb)
    best = min(_timed(lambda: torch._int_mm(qa, qb)) for _ in range(5))
    return 2 * a.shape[0] ** 3 / best


def _read_bandwidth() -> float:
    """Memory read bandwidth (bytes/s): summing a buffer far larger than any last-level cache."""
    buf = torch.ones(384 * 2**20)  # 1.5 GiB
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(5))
    return buf.numel() * 4 / best


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
def _child(spec: dict[str, Any], threads: int, script: str = __file__) -> dict[str, Any]:
    """Run `spec` (a run_case configuration, or {"limits": True}) in a child process of `script` (this
    one, or another harness that takes `--worker SPEC`)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)],
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
    # after 128 tokens in a process of its own; after 4096 beside 128 (see benchmarks/README.md)
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
    _check_arguments(checkpoint, threads, variants, transformers, json_path, allocator, rounds)
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
    groups = plan(quick, variants, long_prompt, transformers)
    runs = _run_rounds(groups, base, json_path)
    report = {**base, "rows": _rows(runs, cfg, limits), "runs": runs}
    print(format_table(report))
    print(json.dumps({**base, "rows": report["rows"]}))
    if json_path:
        atomic_write(json_path, lambda f: json.dump(report, f, indent=2))
    return report


def _check_arguments(
    checkpoint: str | None,
    threads: int,
    variants: tuple[str, ...],
    transformers: bool,
    json_path: str | None,
    allocator: str,
    rounds: int,
) -> None:
    """bench's arguments, checked before anything is created or measured (minutes of it)."""
    if allocator not in ("default", "tuned"):
        raise ValueError(f"allocator={allocator!r}: expected 'default' or 'tuned'")
    if type(threads) is not int or threads < 1:
        raise ValueError(f"threads={threads!r}: expected an integer >= 1")
    if type(rounds) is not int or rounds < 1:
        raise ValueError(f"rounds={rounds!r}: expected an integer >= 1")
    if json_path:
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


def _run_rounds(groups: list[list[dict]], base: dict[str, Any], json_path: str | None) -> list[dict]:
    """Every configuration of `groups`, `base["rounds"]` times, each in a child; the runs' figures.
    A child that fails leaves the runs measured before it in `json_path`, with the error."""
    folder, threads, rounds = base["checkpoint"], base["threads"], base["rounds"]
    runs: list[dict] = []
    for rnd in range(rounds):
        for group in groups:
            # The pair's order alternates between rounds, so a machine that drifts does not favour one side.
            for spec in group if rnd % 2 == 0 else group[::-1]:
                t = time.perf_counter()
                try:
                    r = _child(
                        {**spec, "folder": folder, "threads": threads, "allocator": base["allocator"]},
                        threads,
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
    return runs


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
            rows.append(_row(r, key, _transformers_run(runs, s, key), cfg, limits))
    return rows


def _transformers_run(runs: list[dict], spec: dict, key: str) -> dict | None:
    """transformers' fp32 run of the same kind (and prompts) as `spec` that measured `key`."""
    for r in runs:
        s = r["spec"]
        if s["impl"] == "transformers" and s["variant"] == "fp32" and key in r:
            if (s["kind"], s.get("prompts")) == (spec["kind"], spec.get("prompts")):
                return r
    return None


def _row(r: dict, key: str, hf: dict | None, cfg: Any, limits: dict[str, float]) -> dict[str, Any]:
    """The report's row of figure `key` of our run `r` beside transformers' run `hf` (None without)."""
    s = r["spec"]
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
    return row


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


# ----- as a script: `python benchmarks/bench.py [options of bamba bench]`, and the children --------------
def _worker_main(spec_json: str) -> None:
    """A child: measure the configuration `spec_json` (or the machine's limits), print it as JSON."""
    spec = json.loads(spec_json)
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
    """`python benchmarks/bench.py [options]`: the options of `bamba bench`, parsed by bamba.cli."""
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        _worker_main(argv[argv.index("--worker") + 1])
        return 0
    bench(**bench_arguments(build_parser().parse_args(["bench", *argv])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
