"""The Linear paths of `bamba.linear` and `bamba.quantize` against plain F.linear, side by side.

For each path, one pass over every Linear layer of a model config (bench-small by default: the 87
layers a decode step runs, weights far larger than the caches) is timed at several row counts, the
paths in turn within each repetition (best of --reps), and the weight bytes read per second are printed
next to the baselines measured in the same run, and next to the memory's read bandwidth measured first
(the best of a PyTorch sum and the C++ kernels' read loop, `bamba.kernels.read_bandwidth`):

- fp32: F.linear (the baseline) | oneDNN matmul on the dense weight (`Linear`'s path for 4-256 rows);
- bf16: F.linear | oneDNN on the packed weight (`PackedLinear`);
- int8 / int4: the quantized modules (packed aten kernels up to their row limits, then dequantize + GEMM);
- the C++ decode kernels of `bamba.kernels` (where they are built; `--isa avx2` takes their AVX2 path),
  beside the PyTorch path each replaces: fp32 (and the compiled GEMV at 1 row), bf16 (bf16 rows, as a bf16
  model's), int8 weight-only (against `_weight_int8pack_mm`, and the compiled GEMV at 1 row),
  int4 (activations rounded to int8 per block of 32; against `_weight_int4pack_mm_for_cpu`);
- int8dq: the module (rows quantized to int8, `torch._int_mm`, rescaled) and the bare `_int_mm` on
  the rows it takes (uint8 where `int_mm_takes_uint8()`), which shows what the per-call quantization
  and rescaling cost;
- where `torchao` is installed (it is not a dependency: `pip install torchao`), its weight-only configs on
  the same layers in bf16, as `quantize_` applies them: `Int8WeightOnlyConfig()` and int4 with group size
  128 through its CPU format (`PrototypeInt4WeightOnlyConfig` in torchao >= 0.16, earlier
  `Int4WeightOnlyConfig(layout=Int4CPULayout())`). A config this torchao cannot run on the CPU is
  reported with its error. This is the measurement behind `bamba.quantize` using PyTorch's own kernels.

Run: python benchmarks/bench_linear.py [--preset bench-small] [--threads 2] [--rows 1,8,16,64] [--reps 5]
[--only kernels] (the kernels and the paths they replace only) [--isa avx512|avx2]

With --decode fp32,bf16,int8,int4 it times whole decode steps of a model instead (the checkpoint of
--checkpoint, default .bench/bench-small, created as `bamba bench` creates it), loaded as the command
line loads it (pack=True; int8 / int4 quantized on load), after a 128-token prompt, at each of
--batches: the kernels against the paths they replace (BAMBA_KERNELS=0's; for bf16, a second copy with
oneDNN-packed weights, as pack=True gave before the kernels), in alternating blocks of --steps steps on
two copies of the same cache, --rounds times. It prints tokens/s of each (median and range over rounds),
their ratio per round, the weight bytes read per second, and whether the greedy tokens agreed.
--prefill 512 adds prompts of that many tokens (batch 1), timed the same way.

--clock cpu times with this process's CPU time instead of the wall clock: on a machine shared with other
work, and with --threads 1, it counts the work done rather than the time slices others took.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

from bamba import kernels
from bamba.cache import HybridMambaAttentionDynamicCache
from bamba.config import preset
from bamba.decoding import decode_step, prefill
from bamba.linear import (
    PackedLinear,
    compiled_gemv,
    gemv_fp32,
    gemv_int8,
    onednn_available,
    onednn_linear,
    pack_for_cpu,
    weight_bytes,
)
from bamba.model import BambaForCausalLM
from bamba.quantize import (
    SHORT_NAMES,
    Int4WeightOnlyLinear,
    Int8DynamicActivationInt8WeightLinear,
    Int8WeightOnlyLinear,
    int_mm_takes_uint8,
)


def linear_shapes(cfg) -> list[tuple[int, int]]:
    """(out, in) of every Linear layer a decode step runs, in order (the lm_head last)."""
    shapes = []
    for kind in cfg.layers_block_type:
        if kind == "mamba":
            shapes += [
                (cfg.mamba_in_proj_size, cfg.hidden_size),
                (cfg.hidden_size, cfg.mamba_intermediate_size),
            ]
        else:
            q, kv = (
                cfg.num_attention_heads * cfg.attention_head_dim,
                cfg.num_key_value_heads * cfg.attention_head_dim,
            )
            shapes += [
                (q, cfg.hidden_size),
                (kv, cfg.hidden_size),
                (kv, cfg.hidden_size),
                (cfg.hidden_size, q),
            ]
        shapes += [(cfg.intermediate_size, cfg.hidden_size)] * 2 + [(cfg.hidden_size, cfg.intermediate_size)]
    return shapes + [(cfg.vocab_size, cfg.hidden_size)]


def torchao_paths(dense: list[torch.nn.Linear]) -> dict[str, tuple[list, torch.dtype, float]]:
    """torchao's int8 and int4 (group 128) weight-only versions of `dense`, where torchao is installed
    and runs them on this CPU; a failing config is printed, not raised."""
    try:
        import torchao
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        print("torchao is not installed: its rows are left out (pip install torchao)")
        return {}

    def int4_config():
        try:  # torchao >= 0.16: the CPU int4 format is a prototype config
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            return PrototypeInt4WeightOnlyConfig(group_size=128)
        except ImportError:
            from torchao.dtypes import Int4CPULayout
            from torchao.quantization import Int4WeightOnlyConfig

            return Int4WeightOnlyConfig(group_size=128, layout=Int4CPULayout(), version=1)

    paths = {}
    for name, make_config, per_weight in (("int8", Int8WeightOnlyConfig, 1), ("int4", int4_config, 0.5)):
        label = f"torchao {torchao.__version__} {name}"
        try:
            layers = [torch.nn.Linear(m.in_features, m.out_features, bias=False) for m in dense]
            for q, m in zip(layers, dense):
                q.weight.data.copy_(m.weight)
            layers = torch.nn.Sequential(*layers).to(torch.bfloat16)
            quantize_(layers, make_config())
            probe = torch.zeros(1, layers[0].in_features, dtype=torch.bfloat16)
            layers[0](probe)  # raises here if this torchao cannot run the config on the CPU
            paths[label] = ([(m, m.in_features) for m in layers], torch.bfloat16, per_weight)
        except Exception as e:  # noqa: BLE001 - report any torchao failure and go on
            print(f"{label}: cannot run here: {type(e).__name__}: {str(e)[:200]}")
    return paths


CLOCK = [time.perf_counter]  # --clock cpu: time.process_time


def time_passes(paths: dict, xs_of: dict, reps: int) -> dict[str, float]:
    """Best time of one call of every fn of each path on the input of its width, the paths in turn
    within each repetition (so that a machine's drift touches them alike); the first round warms up."""
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(reps + 1):
        for name, (fns, _, _) in paths.items():
            xs = xs_of[name]
            t = CLOCK[0]()
            for fn, k in fns:
                fn(xs[k])
            best[name] = min(best[name], CLOCK[0]() - t)
    return best


def module_paths(dense: list[torch.nn.Linear]) -> dict[str, tuple[list, torch.dtype, float]]:
    """name -> (fns with their input widths, activation dtype, bytes per weight): the PyTorch paths."""
    paths: dict[str, tuple[list, torch.dtype, float]] = {}

    def plain(w: torch.Tensor):
        return lambda x: F.linear(x, w)

    paths["fp32 F.linear (baseline)"] = ([(plain(m.weight), m.in_features) for m in dense], torch.float32, 4)
    if onednn_available():
        paths["fp32 oneDNN"] = (
            [(lambda x, w=m.weight: onednn_linear(x, w), m.in_features) for m in dense],
            torch.float32,
            4,
        )
    bf16 = [torch.nn.Linear(m.in_features, m.out_features, bias=False).to(torch.bfloat16) for m in dense]
    paths["bf16 F.linear (baseline)"] = ([(plain(m.weight), m.in_features) for m in bf16], torch.bfloat16, 2)
    if onednn_available():
        packed = [PackedLinear(m) for m in bf16]
        paths["bf16 packed oneDNN"] = ([(m, m.in_features) for m in packed], torch.bfloat16, 2)
    q8 = [Int8WeightOnlyLinear.from_linear(m) for m in dense]
    paths["int8 weight-only module"] = ([(m, m.in_features) for m in q8], torch.float32, 1)
    dq = [Int8DynamicActivationInt8WeightLinear.from_linear(m) for m in dense]
    paths["int8dq module"] = ([(m, m.in_features) for m in dq], torch.float32, 1)
    rows_dtype = torch.uint8 if int_mm_takes_uint8() else torch.int8  # what the module feeds _int_mm
    paths[f"int8dq bare _int_mm {str(rows_dtype)[6:]}"] = (
        [(lambda x, w=m.weight: torch._int_mm(x, w.t()), m.in_features) for m in dq],
        rows_dtype,
        1,
    )
    q4 = [Int4WeightOnlyLinear.from_linear(m) for m in dense]
    paths["int4 weight-only module"] = ([(m, m.in_features) for m in q4], torch.float32, 0.5)
    paths.update(torchao_paths(dense))
    return paths


def kernel_paths(
    dense: list[torch.nn.Linear], rows: int, isa: int
) -> dict[str, tuple[list, torch.dtype, float]]:
    """The C++ kernels and the PyTorch paths they replace (in that order, per weight type)."""
    paths: dict[str, tuple[list, torch.dtype, float]] = {}
    name = kernels.ISA_NAMES[isa]
    if rows == 1:
        paths["fp32 compiled GEMV (Inductor)"] = (
            [(lambda x, w=m.weight: compiled_gemv(gemv_fp32, x, None, w), m.in_features) for m in dense],
            torch.float32,
            4,
        )
    if onednn_available():
        paths["fp32 oneDNN"] = (
            [(lambda x, w=m.weight: onednn_linear(x, w), m.in_features) for m in dense],
            torch.float32,
            4,
        )
    paths[f"fp32 kernel {name}"] = (
        [(lambda x, w=m.weight: kernels.dense(x, w, isa=isa), m.in_features) for m in dense],
        torch.float32,
        4,
    )
    bf16 = [m.weight.bfloat16() for m in dense]
    if onednn_available():
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in bf16]
        paths["bf16 packed oneDNN"] = (
            [(lambda x, w=w: onednn_linear(x, w), w.shape[1]) for w in packed],
            torch.bfloat16,
            2,
        )
    paths[f"bf16 kernel {name}"] = (
        [(lambda x, w=w: kernels.dense(x, w, isa=isa), w.shape[1]) for w in bf16],  # bf16 rows
        torch.bfloat16,
        2,
    )
    del bf16
    q8 = [Int8WeightOnlyLinear.from_linear(m) for m in dense]
    if rows == 1:
        paths["int8 compiled GEMV (Inductor)"] = (
            [
                (lambda x, m=m: compiled_gemv(gemv_int8, x, None, m.weight, m.scales), m.in_features)
                for m in q8
            ],
            torch.float32,
            1,
        )
    paths["int8 _weight_int8pack_mm"] = (
        [
            (lambda x, m=m: torch.ops.aten._weight_int8pack_mm(x, m.weight, m.scales), m.in_features)
            for m in q8
        ],
        torch.bfloat16,
        1,
    )
    paths[f"int8 kernel {name}"] = (
        [(lambda x, m=m: kernels.dense(x, m.weight, m.scales, isa=isa), m.in_features) for m in q8],
        torch.float32,
        1,
    )
    q4 = [Int4WeightOnlyLinear.from_linear(m) for m in dense]
    paths["int4 _weight_int4pack_mm"] = (
        [
            (
                lambda x, m=m: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x, m.weight, m.group_size, m.scales_and_zeros
                ),
                m.in_features,
            )
            for m in q4
        ],
        torch.bfloat16,
        0.5,
    )
    paths[f"int4 kernel {name}"] = (
        [
            (
                lambda x, m=m: kernels.int4(x, m.weight, m.scales_and_zeros, m.group_size, isa=isa),
                m.in_features,
            )
            for m in q4
        ],
        torch.float32,
        0.5,
    )
    return paths


def inputs(dtype: torch.dtype, rows: int, widths: set[int]) -> dict[int, torch.Tensor]:
    """A random input of `rows` rows for each width: quantized rows for the bare _int_mm."""
    if dtype in (torch.int8, torch.uint8):
        low = -127 if dtype == torch.int8 else 1
        return {k: torch.randint(low, low + 255, (rows, k), dtype=dtype) for k in widths}
    return {k: torch.randn(rows, k).to(dtype) for k in widths}


def read_bandwidth(threads: int) -> str:
    """The memory's read bandwidth, in words: a PyTorch sum and the kernels' read loop, best of 5 each."""
    buf = torch.ones(256 * 2**20)  # 1 GiB
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    del buf
    words = f"memory read: torch sum {2**30 / best / 1e9:.1f} GB/s"
    if kernels.available():
        words += f", kernels' loop {kernels.read_bandwidth(threads=threads) / 1e9:.1f} GB/s"
    return words


# ----- whole decode steps: the kernels against the paths they replace ----------------------------------------
def decode_models(folder: str, variant: str) -> tuple[BambaForCausalLM, BambaForCausalLM]:
    """(the model the kernels serve, the baseline's): the same model object except for bf16, whose
    baseline is a copy with oneDNN-packed weights (what pack=True made of it before the kernels)."""
    if variant in SHORT_NAMES:
        model = BambaForCausalLM.from_pretrained(folder, quantization=SHORT_NAMES[variant], pack=True)
    else:
        dtype = torch.bfloat16 if variant == "bf16" else torch.float32
        model = BambaForCausalLM.from_pretrained(folder, dtype=dtype, pack=True)
    if variant != "bf16":
        return model, model
    baseline = copy.deepcopy(model)
    pack_for_cpu(baseline, dtypes=(torch.bfloat16,))
    return model, baseline


def alternate(run: Any, rounds: int) -> dict[str, list[float]]:
    """run(name) -> seconds for "ours" and "baseline", alternating (the pair's order too), `rounds` times."""
    figures: dict[str, list[float]] = {"ours": [], "baseline": []}
    for r in range(rounds):
        for name in ("ours", "baseline") if r % 2 == 0 else ("baseline", "ours"):
            figures[name].append(run(name))
    return figures


def _path_of(name: str) -> Any:
    """The kernels on ("ours") or off ("baseline": BAMBA_KERNELS=0's paths)."""
    return mock.patch.object(kernels, "available", kernels.available if name == "ours" else lambda: False)


def decode_rounds(models: tuple, batch: int, steps: int, rounds: int) -> dict[str, list]:
    """tok/s of the kernels ("ours") and of the baseline, per round, each on its own copy of one cache
    prefilled with a 128-token prompt; and the greedy tokens each produced."""
    ours, base = models
    gen = torch.Generator().manual_seed(0)
    cache = HybridMambaAttentionDynamicCache(ours.config)
    first = prefill(ours, torch.randint(0, ours.config.vocab_size, (1, 128), generator=gen), cache).argmax(-1)
    cache.batch_repeat_interleave(batch)
    state = {
        name: [copy.deepcopy(cache), first.expand(batch).contiguous(), []] for name in ("ours", "baseline")
    }

    def run(name: str, n: int = steps) -> float:
        model = ours if name == "ours" else base
        c, tokens, seen = state[name]
        with _path_of(name):
            t = CLOCK[0]()
            for _ in range(n):
                tokens = decode_step(model, c, tokens).argmax(-1)  # (batch,)
                seen.append(tokens[0].item())
            spent = CLOCK[0]() - t
        state[name][1] = tokens
        return batch * n / spent

    for name in ("ours", "baseline"):
        run(name, 4)  # warm-up (the baseline's compiled GEMV compiles here)
    figures = alternate(run, rounds)
    figures["agree"] = [a == b for a, b in zip(state["ours"][2], state["baseline"][2])]
    return figures


def prefill_rounds(models: tuple, length: int, rounds: int) -> dict[str, list]:
    """tok/s of a prompt of `length` tokens (batch 1, last logits only), ours and the baseline's."""
    ids = torch.randint(
        0, models[0].config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1)
    )

    def run(name: str) -> float:
        model = models[0] if name == "ours" else models[1]
        with _path_of(name):
            t = CLOCK[0]()
            prefill(model, ids, HybridMambaAttentionDynamicCache(model.config))
            return length / (CLOCK[0]() - t)

    for name in ("ours", "baseline"):
        run(name)  # warm-up
    return alternate(run, rounds)


def _spread(v: list[float], fmt: str = ".1f") -> str:
    return f"{statistics.median(v):{fmt}} ({min(v):{fmt}}-{max(v):{fmt}})"


def decode_main(args: argparse.Namespace) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench import ensure_checkpoint  # the harness's checkpoint (benchmarks/bench.py)

    folder = ensure_checkpoint(args.checkpoint)
    print(
        f"{folder}: {args.threads} threads, {read_bandwidth(args.threads)}; kernels: {kernels.STATUS} "
        f"({kernels.ISA_NAMES.get(kernels.isa(), 'none')})"
    )
    print(f"{'variant':8s} {'measure':>12s} {'ours tok/s':>17s} {'baseline tok/s':>17s} {'ratio':>15s} "
          f"{'GB/s':>11s} agree")  # fmt: skip
    with torch.inference_mode():
        for variant in args.decode.split(","):
            models = decode_models(folder, variant)
            step_bytes = weight_bytes(models[0], decode_step=True)
            rows = [(f"decode b{b}", b) for b in (int(b) for b in args.batches.split(","))]
            rows += [(f"prefill {n}", n) for n in (int(n) for n in args.prefill.split(",") if n)]
            for label, n in rows:
                if label.startswith("decode"):
                    f = decode_rounds(models, n, args.steps, args.rounds)
                    gbs = [statistics.median(f[k]) / n * step_bytes / 1e9 for k in ("ours", "baseline")]
                    extra = f"{gbs[0]:5.1f}/{gbs[1]:<5.1f} {sum(f['agree'])}/{len(f['agree'])}"
                else:
                    f, extra = prefill_rounds(models, n, args.rounds), ""
                ratios = [a / b for a, b in zip(f["ours"], f["baseline"])]
                print(
                    f"{variant:8s} {label:>12s} {_spread(f['ours']):>17s} {_spread(f['baseline']):>17s} "
                    f"{_spread(ratios, '.2f'):>15s} {extra}"
                )
            del models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,8,16,64")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=("all", "kernels"), default="all")
    ap.add_argument("--isa", choices=tuple(kernels.ISA_NAMES.values()), default=None)
    ap.add_argument("--decode", default=None, help="variants (fp32,bf16,int8,int4): whole decode steps")
    ap.add_argument("--checkpoint", default=".bench/bench-small")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prefill", default="", help="prompt lengths to time too (--decode), e.g. 512")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this process's CPU time (with --threads 1: the work, whoever else shares the cores)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
    if args.decode:
        return decode_main(args)
    torch.manual_seed(0)
    shapes = linear_shapes(preset(args.preset))
    n_weights = sum(o * i for o, i in shapes)
    print(
        f"{args.preset}: {len(shapes)} Linear layers, {n_weights / 1e6:.0f}M weights, {args.threads} threads; "
        f"{read_bandwidth(args.threads)}; kernels: {kernels.STATUS or ['not built']}"
    )
    isa = {v: k for k, v in kernels.ISA_NAMES.items()}[args.isa] if args.isa else kernels.isa()
    with torch.inference_mode():
        dense = [torch.nn.Linear(i, o, bias=False) for o, i in shapes]
        fixed = module_paths(dense) if args.only == "all" else {}
        widths = {i for _, i in shapes}
        print(f"{'path':32s} {'rows':>5s} {'ms/pass':>9s} {'GB/s':>7s}")
        for rows in (int(r) for r in args.rows.split(",")):
            paths = dict(fixed)
            if isa:
                paths |= kernel_paths(dense, rows, isa)
            xs_of = {name: inputs(dtype, rows, widths) for name, (_, dtype, _) in paths.items()}
            best = time_passes(paths, xs_of, args.reps)
            for name, (_, _, per_weight) in paths.items():
                t = best[name]
                print(f"{name:32s} {rows:5d} {t * 1e3:9.2f} {n_weights * per_weight / t / 1e9:7.1f}")


if __name__ == "__main__":
    main()
