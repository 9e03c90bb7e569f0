"""Bamba-9B at its real size (issue 19): a random-weight checkpoint of Bamba-9B's exact config.json, written
once the way transformers' save_pretrained writes one, then each variant loaded and run in its own process.

    python benchmarks/bench_9b.py                 # writes .bench/bamba-9b once (19.6 GB), then int4, int8, bf16
    python benchmarks/bench_9b.py --variants int4 --json bench_9b.json
    python benchmarks/bench_9b.py --write-only    # only the checkpoint (says first how much disk it needs)
    python benchmarks/bench_9b.py --shape small   # the same, on a few MB (.bench/small): a smoke run
    python benchmarks/bench_9b.py --layer         # the blocked (de)quantizers against their references

The checkpoint: bf16 safetensors shards of at most 5 GB (the split of huggingface_hub's
`split_torch_state_dict_into_shards`, which transformers' save_pretrained uses), each file laid out as the
safetensors library writes it, the index as transformers writes it (total_parameters, total_size, sorted
weight_map), config.json, generation_config.json, and a byte-level BPE tokenizer.json of the same
vocabulary (128,000 tokens + 256 special ones, as Llama 3's, which Bamba-9B uses). Weights are random,
written tensor by tensor (a few hundred MB in memory at a time).

Per variant, a child process (`--worker SPEC`): `from_pretrained(folder, dtype=torch.bfloat16,
quantization=...)` timed (bf16: memory-mapped, nothing copied), then decode at batch 1 after a 128-token
prompt, prefill of 512 tokens, decode at batch 4; its peak RSS (VmHWM: file-backed pages count, as in
ru_maxrss) after each stage, and what `bamba.memory` predicted. int4 also saves the quantized model and
times loading that folder in another child. The machine's limits (memory read bandwidth; fp32 and bf16
GEMM FLOP/s) are measured in a child of the same run; the fractions are computed as `bamba bench` does
(benchmarks/README.md, "The comparison harness"), the prefill's against the GEMM of the dtype the
prompt's matmuls run in. A variant runs only when MemAvailable covers its predicted peak RSS + 3 GiB
(--headroom: the machine is shared); otherwise the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from typing import Any

import torch
from bench import (  # benchmarks/bench.py
    Stream,
    Subject,
    _decode_steps,
    _linear_flops_per_token,
    _measure_decode,
    _measure_prefill,
    _state_bytes,
    _timed,
    machine_limits,
)
from bench import _child as run_child

from bamba import BambaConfig, BambaForCausalLM
from bamba.checkpoint import read_config
from bamba.config import PRESETS
from bamba.files import atomic_write
from bamba.linear import bf16_gemm_is_fast, weight_bytes
from bamba.memory import available_memory, float_dtype_of, load_needs, predicted_peak_rss
from bamba.quantize import SHORT_NAMES
from bamba.runtime import tune_cpu_allocator

VARIANTS = ("int4", "int8", "bf16")  # int4 first: the one a 24 GiB machine is sure to hold
MAX_SHARD_SIZE = "5GB"  # save_pretrained's default
GIB = 2**30
HEADROOM = 3 * GIB  # a variant runs only when MemAvailable covers its predicted peak RSS + this
# Llama 3's tokenizer (Bamba-9B's): byte-level BPE tokens, then 256 special ones (ids 128000... at 9B)
N_SPECIAL, SPECIAL_TOKENS = 256, ["<|begin_of_text|>", "<|end_of_text|>"]
SHAPES = {  # --shape: the config.json written (transformers.BambaConfig keywords)
    "bamba-9b": dict(PRESETS["bamba-9b"], tie_word_embeddings=False),
    # the demo model's shape, untied as Bamba-9B (attention in the middle, 1 group), 9 MB: for tests and smoke runs
    "small": dict(PRESETS["demo"], tie_word_embeddings=False),
}


def shape_config(shape: str) -> dict[str, Any]:
    """SHAPES[shape] with Llama 3's special token ids: bos, eos (= pad) the first two after the BPE tokens."""
    kwargs = SHAPES[shape]
    bos = kwargs["vocab_size"] - N_SPECIAL
    return dict(kwargs, bos_token_id=bos, eos_token_id=bos + 1, pad_token_id=bos + 1)


# ----- the checkpoint -----------------------------------------------------------------------------------------
def plan_checkpoint(kwargs: dict[str, Any], max_shard_size: str = MAX_SHARD_SIZE) -> tuple[dict, Any]:
    """(the state_dict of a model of config `kwargs` as bf16 `meta` tensors, and its shard split), as
    transformers' save_pretrained makes them: its model's state_dict order (module order, which is not
    ours), cut by huggingface_hub's `split_torch_state_dict_into_shards`."""
    import transformers
    from huggingface_hub import split_torch_state_dict_into_shards

    with torch.device("meta"):
        theirs = transformers.BambaForCausalLM(transformers.BambaConfig(**kwargs)).state_dict()
        ours = BambaForCausalLM(BambaConfig(**kwargs), init=False).state_dict()
    if sorted(theirs) != sorted(ours):
        raise RuntimeError(
            f"parameter names differ from transformers': {sorted(set(theirs) ^ set(ours))[:5]}"
        )
    state = {k: ours[k].to(torch.bfloat16) for k in theirs}
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    return state, split


def write_checkpoint(
    folder: str, shape: str = "bamba-9b", seed: int = 0, max_shard_size: str = MAX_SHARD_SIZE
) -> str:
    """Write a random checkpoint of SHAPES[shape] to `folder`, once (says first how much disk it needs):
    config.json, written last, marks it whole."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    kwargs = shape_config(shape)
    config = BambaConfig(**kwargs)
    state, split = plan_checkpoint(kwargs, max_shard_size)
    need = split.metadata["total_size"] + 20 * 2**20  # + the tokenizer and the JSON files
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    print(
        f"writing {folder}: random bf16 weights, {len(split.filename_to_tensors)} shards; "
        f"needs {need / 1e9:.2f} GB of disk, {free / 1e9:.1f} GB free",
        file=sys.stderr,
    )
    if need > free:
        raise SystemExit(f"{folder}: not enough disk ({need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free)")
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    for i, (name, keys) in enumerate(split.filename_to_tensors.items()):
        atomic_write(os.path.join(folder, name), _shard_writer({k: state[k] for k in keys}, gen), mode="wb")
        print(
            f"  {name} ({i + 1}/{len(split.filename_to_tensors)}) {time.perf_counter() - t:.0f} s",
            file=sys.stderr,
        )
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": sum(t.numel() for t in state.values()), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        _write_json(os.path.join(folder, "model.safetensors.index.json"), index, sort_keys=True)
    write_tokenizer(folder, config.vocab_size)
    gen_config = {k: kwargs[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    _write_json(os.path.join(folder, "generation_config.json"), gen_config)
    cfg = {**json.loads(config.to_json_string()), "dtype": "bfloat16", "architectures": ["BambaForCausalLM"]}
    _write_json(os.path.join(folder, "config.json"), cfg)
    print(f"  written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return folder


def _write_json(path: str, value: Any, sort_keys: bool = False) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=2, sort_keys=sort_keys) + "\n"))


def _shard_writer(tensors: dict[str, torch.Tensor], gen: torch.Generator) -> Any:
    """A function writing `tensors` (bf16 `meta` tensors: their shapes) as the safetensors library lays
    out a file: compact JSON header, metadata first, tensors sorted by name, the header padded with
    spaces to a multiple of 8 bytes; the data random (`_random_values`), made a block at a time."""
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(f: Any) -> None:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            for block in _random_values(name, tensors[name].numel(), gen):
                f.write(memoryview(block.view(torch.uint8).numpy()))

    return write


def _random_values(name: str, numel: int, gen: torch.Generator, block: int = 1 << 24) -> Any:
    """bf16 values for tensor `name`, `block` at a time: weights ~ N(0, 0.02) (the initializer range),
    norms and D near 1, A_log and dt_bias in the ranges Mamba-2 initializes them to."""
    for start in range(0, numel, block):
        x = torch.randn(min(block, numel - start), generator=gen)
        if name.endswith("A_log"):
            x = torch.rand(x.shape, generator=gen).mul_(15).add_(1).log_()  # A in -[1, 16]
        elif name.endswith("dt_bias"):
            dt = torch.rand(x.shape, generator=gen).mul_(0.099).add_(0.001)  # softplus(dt_bias)
            x = dt.expm1().log_()  # (the inverse of softplus: dt in [1e-3, 0.1])
        elif name.endswith((".D", "norm.weight")):
            x = x.mul_(0.1).add_(1)
        else:
            x = x.mul_(0.02)
        yield x.to(torch.bfloat16)


def write_tokenizer(folder: str, vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json: a byte-level BPE of `vocab_size` - N_SPECIAL tokens (the 256
    bytes, pairs of them, then triples) and N_SPECIAL special tokens after them, as Llama 3's."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # one printable character per byte
    vocab = {c: i for i, c in enumerate(chars)}
    n_merges = vocab_size - N_SPECIAL - len(chars)
    merges = [(a, b) for a in chars for b in chars][:n_merges]
    triples = ((a + b, c) for a in chars for b in chars for c in chars)
    merges += [next(triples) for _ in range(n_merges - len(merges))]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Backend(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS + [f"<|reserved_special_token_{i}|>" for i in range(N_SPECIAL - 2)]
    backend.add_special_tokens([AddedToken(s, special=True) for s in specials])
    assert backend.get_vocab_size() == vocab_size, backend.get_vocab_size()
    backend.save(os.path.join(folder, "tokenizer.json"))
    tok_config = {
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(os.path.join(folder, "tokenizer_config.json"), tok_config)


# ----- one variant, in a child process --------------------------------------------------------------------------
def _status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def predicted(folder: str, variant: str) -> int:
    """bamba.memory's predicted peak RSS of loading `folder` as `variant` and generating at batch 1."""
    from bamba.checkpoint import SafetensorsFile, weight_files

    with torch.device("meta"):
        model = BambaForCausalLM(read_config(folder), init=False)
    stored = float_dtype_of({e[0] for p in weight_files(folder) for e in SafetensorsFile(p).entries.values()})
    return predicted_peak_rss(load_needs(model, stored, torch.bfloat16, SHORT_NAMES.get(variant)))


def measure(folder: str, variant: str, threads: int, steps: int) -> dict[str, Any]:
    """Load `folder` as `variant` (quantized while loading), then decode b1, prefill 512, decode b4."""
    torch.set_num_threads(threads)
    out: dict[str, Any] = {"variant": variant, "predicted_peak_rss": predicted(folder, variant)}
    t = time.perf_counter()
    model = BambaForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, quantization=SHORT_NAMES.get(variant)
    )
    out["load_s"] = time.perf_counter() - t
    out["after_load"] = _status()
    out["weight_bytes"] = weight_bytes(model)
    out["step_weight_bytes"] = weight_bytes(model, decode_step=True)
    subject = Subject("bamba", model)
    with torch.inference_mode():
        out |= _measure_decode(subject, (128,), (1,), steps, None)
        out["after_decode_b1"] = _status()
        out |= _measure_prefill(subject, (512,), None, 1)
        out |= _measure_decode(subject, (128,), (4,), steps, None)
    out["after_all"] = _status()
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (Linux: KiB)
    if variant == "int4":
        saved = folder.rstrip("/") + "-int4"
        t = time.perf_counter()
        model.save_pretrained(saved)
        out["save_s"] = time.perf_counter() - t
    return out


def measure_reload(folder: str, threads: int) -> dict[str, Any]:
    """Load a folder saved quantized (as stored, memory-mapped) and decode one token."""
    torch.set_num_threads(threads)
    t = time.perf_counter()
    model = BambaForCausalLM.from_pretrained(folder)
    out: dict[str, Any] = {"load_s": time.perf_counter() - t, "after_load": _status()}
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))
    out["after_forward"] = _status()
    out["stored_bytes"] = sum(
        os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")
    )
    return out


def profile(folder: str, variant: str, threads: int, steps: int) -> dict[str, Any]:
    """Where the time goes: seconds per module class, exclusive of the modules called inside (forward
    hooks), over `steps` decode steps at batch 1 after a 128-token prompt, and over a 512-token prefill."""
    torch.set_num_threads(threads)
    model = BambaForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, quantization=SHORT_NAMES.get(variant)
    )
    subject, stack, spent = Subject("bamba", model), [], {}

    def pre(mod: Any, args: Any) -> None:
        stack.append([time.perf_counter(), 0.0])  # [start, seconds spent in hooked children]

    def post(key: str) -> Any:
        def hook(mod: Any, args: Any, out: Any) -> None:
            start, inner = stack.pop()
            took = time.perf_counter() - start
            spent[key] = spent.get(key, 0.0) + took - inner
            if stack:
                stack[-1][1] += took

        return hook

    for name, mod in model.named_modules():
        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post(type(mod).__name__ + (" (lm_head)" if name == "lm_head" else "")))
    out: dict[str, Any] = {}
    with torch.inference_mode():
        cache = subject.new_cache()
        logits = subject.prefill(subject.random_ids(128), cache)
        rows = Stream(cache, logits.argmax(-1, keepdim=True), 128)
        _decode_steps(subject, rows, 2)  # warm-up
        spent.clear()
        out["decode_b1_s"] = _decode_steps(subject, rows, steps) / steps
        out["decode_b1_by_module"] = {k: v / steps for k, v in spent.items()}
        spent.clear()
        t = time.perf_counter()
        subject.prefill(subject.random_ids(512), subject.new_cache())
        out["prefill_512_s"] = time.perf_counter() - t
        out["prefill_512_by_module"] = dict(spent)
    return out


def limits(threads: int) -> dict[str, Any]:
    """bench.machine_limits, plus the bf16 GEMM's FLOP/s (n x n, best of 5) and which GEMM bf16 prompts take."""
    out = machine_limits(threads)
    n = 2048
    a, b = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
    a @ b
    out["bf16_gemm_flops"] = 2 * n**3 / min(_timed(lambda: a @ b) for _ in range(5))
    out["bf16_prompts_take"] = "bf16 GEMM" if bf16_gemm_is_fast() else "fp32 GEMM (upcast)"
    return out


# ----- one layer: the blocked (de)quantizers against their references ---------------------------------------
def layer_bench(threads: int, reps: int = 3) -> list[tuple[str, float, float, float, float]]:
    """(what, ours s, reference s, ours peak extra MB, reference peak extra MB) on one Bamba-9B MLP weight
    (14336 x 4096, bf16, random): the time is the best of `reps`, each pair run back to back."""
    import importlib

    quantize = importlib.import_module("bamba.quantize")  # (the package's `quantize` is the function)
    torch.set_num_threads(threads)
    w = (torch.randn(14336, 4096, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    q4, q8 = quantize.quantize_int4(w, 128), quantize.quantize_int8(w)
    pairs = {
        "quantize int4": (
            lambda: quantize.quantize_int4(w, 128),
            lambda: quantize.quantize_int4_reference(w, 128),
        ),
        "quantize int8": (lambda: quantize.quantize_int8(w), lambda: quantize.quantize_int8_reference(w)),
        "dequantize int4 to bf16": (
            lambda: quantize.dequantize_int4_blocked(*q4, 128, torch.bfloat16),
            lambda: quantize.dequantize_int4(*q4, 128, torch.bfloat16),
        ),
        "dequantize int8 to bf16": (
            lambda: quantize.dequantize_int8_blocked(*q8, torch.bfloat16),
            lambda: quantize.dequantize_int8(*q8, torch.bfloat16),
        ),
    }
    rows = []
    for what, fns in pairs.items():
        best, peak = [float("inf")] * 2, [0.0] * 2
        for _ in range(reps):
            for i, fn in enumerate(fns):
                before = _status()["VmRSS"]
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := VmRSS
                t = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t)
                peak[i] = max(peak[i], (_status()["VmHWM"] - before) / 2**20)
        rows.append((what, *best, *peak))
    return rows


# ----- the parent -------------------------------------------------------------------------------------------------
def _child(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """bench.py's child runner on this script: a failed child is reported, the others still run."""
    try:
        return run_child(spec, threads, __file__)
    except RuntimeError as e:
        return {"error": str(e)[-2000:]}


def run(
    folder: str,
    variants: tuple[str, ...],
    threads: int,
    steps: int,
    shape: str = "bamba-9b",
    headroom: int = HEADROOM,
) -> dict:
    """The checkpoint (written once), the limits, then each variant in a child (when MemAvailable covers
    its predicted peak RSS + `headroom` bytes): the report."""
    write_checkpoint(folder, shape)
    report: dict[str, Any] = {"folder": folder, "threads": threads, "steps": steps}
    report["limits"] = _child({"limits": True}, threads)
    report["variants"] = {}
    for v in variants:
        need = predicted(folder, v)
        available, source = available_memory()
        if available < need + headroom:
            report["variants"][v] = {
                "skipped": f"predicted peak {need / GIB:.1f} GiB; {available / GIB:.1f} GiB available ({source})"
            }
        else:
            report["variants"][v] = _child({"measure": v, "folder": folder, "steps": steps}, threads)
        print(f"  {v}: {json.dumps(report['variants'][v])}", file=sys.stderr)
        if v == "int4" and "error" not in report["variants"][v] and "skipped" not in report["variants"][v]:
            report["int4_reload"] = _child({"reload": folder.rstrip("/") + "-int4"}, threads)
    return report


def format_report(report: dict[str, Any]) -> str:
    lim = report["limits"]
    cfg = read_config(report["folder"])
    lines = [
        f"{report['folder']}, {report['threads']} threads; machine: {lim['cpu']}, memory read {lim['mem_bandwidth'] / 1e9:.1f} GB/s, "
        f"fp32 GEMM {lim['sgemm_flops'] / 1e9:.0f} GFLOP/s, bf16 GEMM {lim['bf16_gemm_flops'] / 1e9:.0f} GFLOP/s "
        f"(bf16 prompts take: {lim['bf16_prompts_take']})",
        f"{'variant':7s} {'load s':>7s} {'peak RSS':>9s} {'predicted':>9s} {'prefill512':>10s} {'limit%':>6s} "
        f"{'decode b1':>9s} {'limit%':>6s} {'decode b4':>9s} {'limit%':>6s}",
    ]
    # int4 / int8 prompts dequantize to bf16 and take F.linear's bf16 GEMM; bf16 Linear layers take
    # whichever GEMM bamba.linear measured faster here (bf16, or fp32 on tiles upcast)
    bf16_path = lim["bf16_gemm_flops"] if lim["bf16_prompts_take"] == "bf16 GEMM" else lim["sgemm_flops"]
    for v, r in report["variants"].items():
        gemm = bf16_path if v == "bf16" else lim["bf16_gemm_flops"]
        if "skipped" in r or "error" in r:
            lines.append(f"{v:7s} not run: {r.get('skipped') or r['error'][-300:]}")
            continue
        pre = r["prefill_512"] * _linear_flops_per_token(cfg, 512) / gemm
        dec = {b: r[f"decode_b{b}_after_128"] for b in (1, 4)}
        context = 128 + report["steps"] // 2
        frac = {
            b: dec[b] / b * (r["step_weight_bytes"] + _state_bytes(cfg, b, context)) / lim["mem_bandwidth"]
            for b in dec
        }
        lines.append(
            f"{v:7s} {r['load_s']:7.1f} {r['after_all']['VmHWM'] / GIB:7.2f}Gi {r['predicted_peak_rss'] / GIB:7.2f}Gi "
            f"{r['prefill_512']:10.2f} {100 * pre:5.0f}% {dec[1]:9.2f} {100 * frac[1]:5.0f}% {dec[4]:9.2f} {100 * frac[4]:5.0f}%"
        )
        lines.append(
            f"        peak RSS after load {r['after_load']['VmHWM'] / GIB:.2f} GiB, after decode b1 "
            f"{r['after_decode_b1']['VmHWM'] / GIB:.2f} GiB (predicted {r['predicted_peak_rss'] / GIB:.2f}); "
            f"weights {r['weight_bytes'] / GIB:.2f} GiB"
            + (f"; save_pretrained {r['save_s']:.1f} s" if "save_s" in r else "")
        )
    if "int4_reload" in report and "error" not in report["int4_reload"]:
        r = report["int4_reload"]
        lines.append(
            f"int4 folder reloaded: {r['load_s']:.1f} s, RSS {r['after_forward']['VmRSS'] / GIB:.2f} GiB after a forward "
            f"(peak {r['after_forward']['VmHWM'] / GIB:.2f}), {r['stored_bytes'] / GIB:.2f} GiB stored"
        )
    return "\n".join(lines)


def format_profile(r: dict[str, Any]) -> str:
    if "error" in r:
        return r["error"]
    lines = []
    for what, total in (("decode_b1", r["decode_b1_s"]), ("prefill_512", r["prefill_512_s"])):
        lines.append(
            f"{what}: {total:.3f} s (per step)" if what.startswith("decode") else f"{what}: {total:.2f} s"
        )
        for name, sec in sorted(r[f"{what}_by_module"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {name:32s} {sec:8.3f} s {100 * sec / total:5.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        spec = json.loads(argv[argv.index("--worker") + 1])
        tune_cpu_allocator()  # as the `bamba` command line does for itself
        threads = torch.get_num_threads()
        if spec.get("limits"):
            out = limits(threads)
        elif "profile" in spec:
            out = profile(spec["folder"], spec["profile"], threads, spec["steps"])
        elif "reload" in spec:
            out = measure_reload(spec["reload"], threads)
        else:
            out = measure(spec["folder"], spec["measure"], threads, spec["steps"])
        print(json.dumps(out))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shape", choices=sorted(SHAPES), default="bamba-9b", help="small: a few MB, for smoke runs"
    )
    p.add_argument("--folder", default=None, help="the checkpoint's folder (default .bench/SHAPE)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of int4, int8, bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=16, help="decode steps per batch size")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument(
        "--headroom",
        type=float,
        default=HEADROOM / GIB,
        help="GiB of MemAvailable left to others beside a variant's predicted peak (bf16's is mostly mapped "
        "file pages, which the kernel can drop: less is safe there)",
    )
    p.add_argument("--write-only", action="store_true", help="write the checkpoint and stop")
    p.add_argument("--profile", choices=VARIANTS, help="only: seconds per module class, decode and prefill")
    p.add_argument(
        "--layer", action="store_true", help="only the (de)quantizers on one layer, against references"
    )
    args = p.parse_args(argv)
    if args.layer:
        print(
            f"{'one 14336 x 4096 bf16 weight':28s} {'ours s':>7s} {'ref s':>7s} {'ours MB':>8s} {'ref MB':>8s}"
        )
        for row in layer_bench(args.threads):
            print(f"{row[0]:28s} {row[1]:7.3f} {row[2]:7.3f} {row[3]:8.0f} {row[4]:8.0f}")
        return 0
    folder = args.folder or os.path.join(".bench", args.shape)
    if args.write_only:
        write_checkpoint(folder, args.shape)
        return 0
    if args.profile:
        write_checkpoint(folder, args.shape)
        report = _child({"profile": args.profile, "folder": folder, "steps": args.steps}, args.threads)
        print(format_profile(report))
        return 0
    variants = tuple(v for v in args.variants.split(",") if v)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: {bad} not among {VARIANTS}")
    report = run(folder, variants, args.threads, args.steps, args.shape, int(args.headroom * GIB))
    if args.json:  # (first: the figures are kept whatever the formatting does)
        atomic_write(args.json, lambda f: json.dump(report, f, indent=2))
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
