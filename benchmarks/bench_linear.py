"""The Linear paths of `bamba.linear` and `bamba.quantize` against plain F.linear, side by side.

For each path, one pass over every Linear layer of a model config (bench-small by default: the 87
layers a decode step runs, weights far larger than the caches) is timed at several row counts, and
the weight bytes read per second are printed next to the baseline measured in the same run:

- fp32: F.linear (the baseline) | oneDNN matmul on the dense weight (`Linear`'s path for 4-256 rows);
- bf16: F.linear | oneDNN on the packed weight (`PackedLinear`);
- int8 / int4: the quantized modules (packed aten kernels up to their row limits, then dequantize + GEMM);
- int8dq: the module (rows quantized to int8, `torch._int_mm`, rescaled) and the bare `_int_mm` on
  the rows it takes (uint8 where `int_mm_takes_uint8()`), which shows what the per-call quantization
  and rescaling cost;
- where `torchao` is installed (it is not a dependency: `pip install torchao`), its weight-only configs on
  the same layers in bf16, as `quantize_` applies them: `Int8WeightOnlyConfig()` and int4 with group size
  128 through its CPU format (`PrototypeInt4WeightOnlyConfig` in torchao >= 0.16, earlier
  `Int4WeightOnlyConfig(layout=Int4CPULayout())`). A config this torchao cannot run on the CPU is
  reported with its error. This is the measurement behind `bamba.quantize` using PyTorch's own kernels.

Run: python benchmarks/bench_linear.py [--preset bench-small] [--threads 2] [--rows 1,8,16,64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bamba.config import preset
from bamba.linear import PackedLinear, onednn_available, onednn_linear
from bamba.quantize import (
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


def time_pass(fns: list, xs: dict[int, torch.Tensor], reps: int = 3) -> float:
    """Best time of one call of every fn on the input of its width."""
    best = float("inf")
    for _ in range(reps + 1):  # the first pass warms up
        t = time.perf_counter()
        for fn, k in fns:
            fn(xs[k])
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,8,16,64")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = linear_shapes(preset(args.preset))
    n_weights = sum(o * i for o, i in shapes)
    print(
        f"{args.preset}: {len(shapes)} Linear layers, {n_weights / 1e6:.0f}M weights, {args.threads} threads"
    )

    with torch.inference_mode():
        dense = [torch.nn.Linear(i, o, bias=False) for o, i in shapes]
        paths: dict[
            str, tuple[list, torch.dtype, float]
        ] = {}  # name -> (fns, activation dtype, bytes/weight)

        def plain(w: torch.Tensor):
            return lambda x: F.linear(x, w)

        def onednn(w: torch.Tensor):
            return lambda x: onednn_linear(x, w)

        paths["fp32 F.linear (baseline)"] = (
            [(plain(m.weight), m.in_features) for m in dense],
            torch.float32,
            4,
        )
        if onednn_available():
            paths["fp32 oneDNN"] = ([(onednn(m.weight), m.in_features) for m in dense], torch.float32, 4)
        bf16 = [torch.nn.Linear(m.in_features, m.out_features, bias=False).to(torch.bfloat16) for m in dense]
        paths["bf16 F.linear (baseline)"] = (
            [(plain(m.weight), m.in_features) for m in bf16],
            torch.bfloat16,
            2,
        )
        if onednn_available():
            packed = [PackedLinear(m) for m in bf16]
            paths["bf16 packed oneDNN"] = ([(m, m.in_features) for m in packed], torch.bfloat16, 2)
        del bf16
        q8 = [Int8WeightOnlyLinear.from_linear(m) for m in dense]
        paths["int8 weight-only kernel"] = ([(m, m.in_features) for m in q8], torch.float32, 1)
        dq = [Int8DynamicActivationInt8WeightLinear.from_linear(m) for m in dense]
        paths["int8dq module"] = ([(m, m.in_features) for m in dq], torch.float32, 1)
        rows_dtype = torch.uint8 if int_mm_takes_uint8() else torch.int8  # what the module feeds _int_mm
        paths[f"int8dq bare _int_mm {str(rows_dtype)[6:]}"] = (
            [(lambda x, w=m.weight: torch._int_mm(x, w.t()), m.in_features) for m in dq],
            rows_dtype,
            1,
        )
        q4 = [Int4WeightOnlyLinear.from_linear(m) for m in dense]
        paths["int4 weight-only kernel"] = ([(m, m.in_features) for m in q4], torch.float32, 0.5)
        paths.update(torchao_paths(dense))

        widths = {i for _, i in shapes}
        print(f"{'path':28s} {'rows':>5s} {'ms/pass':>9s} {'GB/s':>7s}")
        for rows in (int(r) for r in args.rows.split(",")):
            for name, (fns, dtype, per_weight) in paths.items():
                if dtype in (torch.int8, torch.uint8):  # the bare _int_mm's inputs: quantized rows
                    low = -127 if dtype == torch.int8 else 1
                    xs = {k: torch.randint(low, low + 255, (rows, k), dtype=dtype) for k in widths}
                else:
                    xs = {k: torch.randn(rows, k).to(dtype) for k in widths}
                t = time_pass(fns, xs)
                print(f"{name:28s} {rows:5d} {t * 1e3:9.2f} {n_weights * per_weight / t / 1e9:7.1f}")


if __name__ == "__main__":
    main()
