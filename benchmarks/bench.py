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
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from bamba import kernels
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
    out: dict[str, Any] = {"cpu": cpu_name(), "cpu_flags": cpu_flags(), **_sgemm_flops(a, b)}
    out |= _fp32_matmul_paths()
    return {**out, "int8_gemm_ops": _int8_gemm_ops(a, b), **_read_bandwidth(threads)}


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


def _read_bandwidth(threads: int) -> dict[str, Any]:
    """Memory read bandwidth (bytes/s) as a ceiling: the best of several ways to read a buffer far larger
    than any last-level cache (PyTorch's sum, BLAS's GEMV over it as a matrix, the C++ kernels' widest
    loads) on 1 thread and on `threads`, best of five passes each; every figure kept, by name."""
    buf = torch.ones(384 * 2**20)  # 1.5 GiB
    mat, ones = buf.view(-1, 4096), torch.ones(4096)
    reads = {"sum": buf.sum, "gemv": lambda: torch.mv(mat, ones)}
    figures = {}
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        for name, read in reads.items():
            read()
            figures[f"{name}, {t} threads"] = buf.numel() * 4 / min(_timed(read) for _ in range(5))
        figures[f"kernels, {t} threads"] = kernels.read_bandwidth(threads=t)  # 0.0 without kernels
    torch.set_num_threads(threads)
    best = max(figures, key=figures.get)
    return {"mem_bandwidth": figures[best], "mem_bandwidth_by": best, "mem_bandwidth_reads": figures}


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


SIMD_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16")
SIMD_FLAGS += ("avx512_fp16", "amx_bf16", "amx_int8", "neon", "asimd", "sve")


def cpu_flags() -> list[str]:
    """The CPU's vector-instruction flags that kernels choose between (Linux: /proc/cpuinfo), [] elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in SIMD_FLAGS if flag in present]
    except OSError:
        pass
    return []


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ----- llama.cpp beside ours (`--llama-cpp PATH`) ----------------------------------------------------------
# our variant -> the GGUF type llama.cpp runs for it, written by our exporter (bamba.gguf_export)
LLAMA_TYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0", "int8dq": "q8_0"}
LLAMA_TOOLS = {"bench": "llama-bench", "batched": "llama-batched-bench"}
LLAMA_B1_TOKENS = 64  # llama-bench -n: the tokens it decodes at batch 1 per repetition
LLAMA_REPS = 3  # llama-bench -r


def llama_cpp_tools(path: str) -> dict[str, str]:
    """llama-bench and llama-batched-bench of the llama.cpp build at `path`: its bin folder, the build
    folder above it, or the llama-bench binary (llama-batched-bench beside it); or "python": the
    llama-cpp-python bindings (llama_cpp_python_case)."""
    if path == "python":  # llama-cpp-python's bindings, in a child of ours (llama_cpp_python_case)
        if importlib.util.find_spec("llama_cpp") is None:
            raise ValueError(
                "llama_cpp='python': the llama_cpp module (pip install llama-cpp-python) is missing"
            )
        return {"python": "llama_cpp"}
    folder = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else path
    if os.path.isdir(os.path.join(folder, "bin")):
        folder = os.path.join(folder, "bin")
    tools = {key: os.path.join(folder, name) for key, name in LLAMA_TOOLS.items()}
    if os.path.isfile(path):
        tools["bench"] = os.path.abspath(path)
    missing = [p for p in tools.values() if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if missing:
        raise ValueError(
            f"llama_cpp={path!r}: expected a llama.cpp build (its bin folder, or its llama-bench binary) "
            f"with {' and '.join(LLAMA_TOOLS.values())} in one folder; not found or not executable: "
            + ", ".join(missing)
        )
    return tools


def ensure_gguf(folder: str, gguf_type: str) -> str:
    """`folder` exported by `bamba export-gguf --type gguf_type` into `<folder>-gguf/`, once, and reused.
    A checkpoint whose tokenizer the exporter refuses (bench-small's is a word-level one) is exported with
    the demo model's byte-level BPE tokenizer in its place: the benchmark feeds token ids, and the
    exporter pads the vocabulary to the embedding's rows."""
    from bamba.gguf_export import export_gguf  # (needs the gguf package)

    out = os.path.join(f"{folder.rstrip('/')}-gguf", f"{gguf_type}.gguf")
    if os.path.isfile(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    print(f"creating {out} ...", file=sys.stderr)
    try:
        export_gguf(folder, out, type=gguf_type)
    except ValueError as e:
        if "tokenizer.json" not in str(e):
            raise
        export_gguf(_with_demo_tokenizer(folder, os.path.dirname(out)), out, type=gguf_type)
    return out


def _with_demo_tokenizer(folder: str, parent: str) -> str:
    """A folder in `parent` with `folder`'s files (links) but the demo model's tokenizer files."""
    import bamba.demo

    demo = os.path.dirname(os.path.abspath(bamba.demo.__file__))
    staged = os.path.join(parent, "checkpoint-with-demo-tokenizer")
    os.makedirs(staged, exist_ok=True)
    for name in os.listdir(folder):
        link = os.path.join(staged, name)
        if not name.startswith(("tokenizer", "special_tokens")) and not os.path.lexists(link):
            os.symlink(os.path.abspath(os.path.join(folder, name)), link)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(os.path.join(demo, name), os.path.join(staged, name))
    return staged


def gguf_weight_bytes(path: str) -> tuple[int, int]:
    """(bytes of every tensor in the GGUF file at `path`, bytes a decode step reads): a step reads all but
    the token embedding table, of which it takes one row per token (unless the file has no output.weight,
    and the table is the lm_head too)."""
    import gguf

    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    total = sum(sizes.values())
    return total, total - (sizes.get("token_embd.weight", 0) if "output.weight" in sizes else 0)


def parse_llama_bench(text: str) -> dict[str, Any]:
    """Figures from `llama-bench -o json`: prefill_{n} for a prompt-only test of n tokens (its best
    repetition, as ours is the best of its repetitions) and decode_b1_after_{d} for a generation-only test
    after d tokens (`-d`; the mean over repetitions, as ours is over its steps); and llama.cpp's commit."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"llama-bench output: expected a JSON list (-o json), found {text[:200]!r}") from e
    out: dict[str, Any] = {}
    for rec in records:
        n_prompt, n_gen, depth = rec["n_prompt"], rec["n_gen"], rec.get("n_depth", 0)
        if n_gen == 0 and depth == 0:
            out[f"prefill_{n_prompt}"] = max(rec["samples_ts"])
        elif n_prompt == 0:
            out[f"decode_b1_after_{depth}"] = rec["avg_ts"]
        out["llama_cpp_build"] = f"{rec.get('build_commit', '?')} ({rec.get('build_number', '?')})"
    if not any(k != "llama_cpp_build" for k in out):
        raise ValueError(f"llama-bench output: no prompt-only or generation-only test in {text[:200]!r}")
    return out


def parse_batched_bench(text: str) -> dict[str, float]:
    """decode_b{pl}_after_{pp}: the generation speed (speed_tg, tokens/s of all pl rows) of each result line
    of `llama-batched-bench --output-format jsonl`; the lines around them are its log."""
    out = {}
    for line in text.splitlines():
        if line.startswith("{") and '"speed_tg"' in line:
            rec = json.loads(line)
            out[f"decode_b{rec['pl']}_after_{rec['pp']}"] = rec["speed_tg"]
    if not out:
        raise ValueError(
            f"llama-batched-bench output: no jsonl result line (with speed_tg) in {text[-500:]!r}"
        )
    return out


def _run_tool(argv: list[str]) -> tuple[str, int]:
    """Run argv; its stdout and stderr (one after the other) and its own peak RSS in bytes (wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, log = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit status {proc.returncode}):\n{log[-3000:]}")
    return text + "\n" + log, usage.ru_maxrss * 1024  # (KiB on Linux)


def run_llama_cpp(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Measure the configuration `spec` (as run_case's, plus `gguf` and the `llama_cpp` tools) with
    llama.cpp's own tools on `threads` threads: prefill with llama-bench -p, decoding at batch 1 with
    llama-bench -n LLAMA_B1_TOKENS -d (after each prompt), at larger batches with llama-batched-bench (the
    prompt prefilled once and its cache copied to every row, as ours; spec's steps per row)."""
    tools, model = spec["llama_cpp"], spec["gguf"]
    if "python" in tools:
        return _child({**spec, "threads": threads}, threads)
    common = ["-m", model, "-t", str(threads)]
    bench_args = [tools["bench"], *common, "-r", str(LLAMA_REPS), "-o", "json"]
    result: dict[str, Any] = {"impl": "llama.cpp", "variant": spec["variant"], "kind": spec["kind"]}
    result["weight_bytes"], result["step_weight_bytes"] = gguf_weight_bytes(model)
    rss = []
    if spec["kind"] == "prefill":
        text, peak = _run_tool([*bench_args, "-p", _csv(spec["lengths"]), "-n", "0"])
        result |= parse_llama_bench(text[: text.rindex("]") + 1])
        rss.append(peak)
    else:
        prompts, wide = spec["prompts"], [b for b in spec["batches"] if b > 1]
        if 1 in spec["batches"]:
            argv = [*bench_args, "-p", "0", "-n", str(LLAMA_B1_TOKENS), "-d", _csv(prompts)]
            text, peak = _run_tool(argv)
            result |= parse_llama_bench(text[: text.rindex("]") + 1])
            rss.append(peak)
        if wide:  # a context of its own per row (as ours), room for the prompt, the steps and one token
            ctx = max(wide) * (max(prompts) + spec["steps"] + 16)
            # each row prefills its own prompt: with -pps (one prompt, its cache copied to every row)
            # llama-batched-bench fails on Bamba's recurrent memory ("inconsistent sequence positions")
            argv = [tools["batched"], *common, "-tb", str(threads), "-c", str(ctx)]
            argv += ["-npp", _csv(prompts), "-ntg", str(spec["steps"]), "-npl", _csv(wide)]
            text, peak = _run_tool([*argv, "--output-format", "jsonl"])
            result |= parse_batched_bench(text)
            rss.append(peak)
    result["peak_rss"] = max(rss)
    return result


def llama_cpp_python_case(spec: dict[str, Any]) -> dict[str, Any]:
    """run_llama_cpp's measures through llama-cpp-python's bindings (`--llama-cpp python`), for where no
    llama.cpp build with its tools is at hand: the same library and C API that llama-bench and
    llama-batched-bench call (one llama_decode per step, random tokens, a context per row), timed the same
    way (prefill: best of LLAMA_REPS; batch 1: LLAMA_B1_TOKENS steps after the prompt, the mean over
    repetitions; batch b: the prompt once, its cache copied to every row, `steps` steps)."""
    import llama_cpp as lc

    lc.llama_backend_init()
    model_params = lc.llama_model_default_params()
    # With its extra buffer types (AMX tiles, repacked weights) llama-cpp-python 0.3.36's library crashed
    # (SIGSEGV) in its first llama_decode of bench-small's q4_0 on an AMX Xeon; f32 ran. Without them.
    model_params.use_extra_bufts = False
    model = lc.llama_model_load_from_file(spec["gguf"].encode(), model_params)
    vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    rows = max(spec.get("batches", (1,)))
    longest = max((*spec.get("lengths", ()), *spec.get("prompts", ())))
    params = lc.llama_context_default_params()
    params.n_ctx = rows * (longest + max(spec.get("steps", 0), LLAMA_B1_TOKENS) + 16)
    params.n_batch, params.n_ubatch, params.n_seq_max = 2048, 512, rows
    params.n_threads = params.n_threads_batch = spec["threads"]
    ctx = lc.llama_init_from_model(model, params)
    mem, batch, rng = lc.llama_get_memory(ctx), lc.llama_batch_init(2048, 0, 1), random.Random(0)

    def run(entries: list[tuple[int, int]]) -> None:  # (position, row) per token; logits of the last
        for start in range(0, len(entries), 2048):
            part = entries[start : start + 2048]
            for i, (pos, row) in enumerate(part):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = rng.randrange(vocab), pos, 1
                batch.seq_id[i][0], batch.logits[i] = row, i == len(part) - 1
            batch.n_tokens = len(part)
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed on {len(part)} tokens of {spec['gguf']}")
        lc.llama_synchronize(ctx)

    def timed(entries: list[tuple[int, int]], steps: int = 1) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            run(entries)
            entries = [(pos + 1, row) for pos, row in entries]
        return time.perf_counter() - t

    result: dict[str, Any] = {"impl": "llama.cpp", "variant": spec["variant"], "kind": spec["kind"]}
    result["weight_bytes"], result["step_weight_bytes"] = gguf_weight_bytes(spec["gguf"])
    try:
        result["llama_cpp_build"] = f"llama-cpp-python {importlib.metadata.version('llama_cpp_python')}"
    except importlib.metadata.PackageNotFoundError:
        result["llama_cpp_build"] = "llama-cpp-python (version unknown)"
    run([(i, 0) for i in range(16)])  # warm-up
    for n in spec.get("lengths", ()):
        best = float("inf")
        for _ in range(LLAMA_REPS):
            lc.llama_memory_clear(mem, False)
            best = min(best, timed([(i, 0) for i in range(n)]))
        result[f"prefill_{n}"] = n / best
    for p in spec.get("prompts", ()):
        for b in spec["batches"]:
            steps, speeds = (LLAMA_B1_TOKENS, LLAMA_REPS) if b == 1 else (spec["steps"], 1)
            rates = []
            for _ in range(speeds):
                lc.llama_memory_clear(mem, False)
                run([(i, 0) for i in range(p)])
                for row in range(1, b):
                    lc.llama_memory_seq_cp(mem, 0, row, -1, -1)
                rates.append(b * steps / timed([(p, row) for row in range(b)], steps))
            result[f"decode_b{b}_after_{p}"] = statistics.mean(rates)
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    result["peak_rss"] = peak_rss()
    return result


def _csv(values: Any) -> str:
    return ",".join(str(v) for v in values)


def with_llama_cpp(groups: list[list[dict]], folder: str, tools: dict[str, str]) -> list[list[dict]]:
    """`groups` with llama.cpp measuring what ours measures beside each of our configurations, with the
    GGUF type of LLAMA_TYPES written by our exporter (a chunked long prefill has no llama.cpp match)."""
    out = []
    for group in groups:
        ours = next(s for s in group if s["impl"] == "bamba")
        extra = []
        if ours["variant"] in LLAMA_TYPES and "chunk" not in ours:
            gguf_type = LLAMA_TYPES[ours["variant"]]
            spec = {**ours, "impl": "llama.cpp", "gguf_type": gguf_type}
            extra = [{**spec, "gguf": ensure_gguf(folder, gguf_type), "llama_cpp": tools}]
        out.append(group + extra)
    return out


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
    allocator: str = "tuned",
    rounds: int = 1,
    llama_cpp: str | None = None,
) -> dict[str, Any]:
    """Run the side-by-side benchmark; print a table and return (and optionally write) the JSON report.

    allocator: "tuned" (both implementations' workers call `bamba.runtime.tune_cpu_allocator`, as the
    `bamba` command line does for itself: transformers at its best too) or "default" (glibc as it comes).
    rounds: how many times the whole plan runs. Each figure is then the median over the rounds, with its
    range (`*_range`: min, max), and a ratio is the median of the rounds' ratios, each taken from a pair
    measured back to back (the pair's order alternates).
    llama_cpp: a llama.cpp build (see `llama_cpp_tools`); its llama-bench and llama-batched-bench then
    measure the checkpoint exported to GGUF (LLAMA_TYPES) beside each of our configurations."""
    _check_arguments(checkpoint, threads, variants, transformers, json_path, allocator, rounds)
    tools = llama_cpp_tools(llama_cpp) if llama_cpp else None
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
    if tools:
        groups = with_llama_cpp(groups, folder, tools)
        base["llama_cpp"] = llama_cpp
    runs = _run_rounds(groups, base, json_path)
    rows = _rows(runs, cfg, limits)
    _apply_ceiling(rows, limits)
    report = {**base, "rows": rows, "runs": runs}
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
                    if spec["impl"] == "llama.cpp":
                        r = run_llama_cpp(spec, threads)
                    else:
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
    "llama_cpp",
    "llama_ratio",
    "bamba_bytes_s",
    "llama_cpp_bytes_s",
    "llama_cpp_extra_cost",
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
        for key in ("bamba_peak_rss", "transformers_peak_rss", "llama_cpp_peak_rss"):
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
            row = _row(r, key, _transformers_run(runs, s, key), cfg, limits)
            rows.append(_add_llama_cpp(row, r, _llama_cpp_run(runs, s, key), cfg))
    return rows


def _transformers_run(runs: list[dict], spec: dict, key: str) -> dict | None:
    """transformers' fp32 run of the same kind (and prompts) as `spec` that measured `key`."""
    for r in runs:
        s = r["spec"]
        if s["impl"] == "transformers" and s["variant"] == "fp32" and key in r:
            if (s["kind"], s.get("prompts")) == (spec["kind"], spec.get("prompts")):
                return r
    return None


def _llama_cpp_run(runs: list[dict], spec: dict, key: str) -> dict | None:
    """llama.cpp's run of the same variant, kind (and prompts) as `spec` that measured `key`."""
    for r in runs:
        s = r["spec"]
        if s["impl"] == "llama.cpp" and key in r:
            if (s["variant"], s["kind"], s.get("prompts")) == (
                spec["variant"],
                spec["kind"],
                spec.get("prompts"),
            ):
                return r
    return None


def _add_llama_cpp(row: dict[str, Any], r: dict, ll: dict | None, cfg: Any) -> dict[str, Any]:
    """`row` (our run `r`'s figure `row["key"]`) with llama.cpp's figure of the same run (None without),
    the ratio ours / llama.cpp, and for decoding the bytes/s each moves (weights a step reads, by each
    one's own count, and the cache's bytes as ours keeps it)."""
    key = row.pop("key")
    row["llama_cpp"] = ll[key] if ll else None
    row["llama_cpp_type"] = ll["spec"]["gguf_type"] if ll else None
    row["llama_cpp_peak_rss"] = ll["peak_rss"] if ll else None
    row["llama_ratio"] = row["bamba"] / ll[key] if ll else None
    if r["spec"]["kind"] == "decode":
        b, prompt = _decode_key(key)
        state = _state_bytes(cfg, b, prompt + r["spec"]["steps"] // 2)
        row["bamba_bytes_s"] = r[key] / b * (r["step_weight_bytes"] + state)
        row["llama_cpp_bytes_s"] = ll[key] / b * (ll["step_weight_bytes"] + state) if ll else None
        short = f"decode_b{b}_after_{min(r['spec']['prompts'])}"
        if short != key and ll and short in ll:  # the same run's figures after the shortest prompt
            row["llama_cpp_extra_cost"] = ll[short] / ll[key] - 1
    else:
        row["bamba_bytes_s"] = row["llama_cpp_bytes_s"] = None
    return row


def _apply_ceiling(rows: list[dict], limits: dict[str, Any]) -> None:
    """The memory's ceiling: the read kernels' best, or more where a decoder (ours or llama.cpp) was seen
    to move more bytes/s in this run (`mem_bandwidth_ceiling`); decode rows' limit fractions are of it."""
    seen = [r[k] for r in rows for k in ("bamba_bytes_s", "llama_cpp_bytes_s") if r.get(k) is not None]
    ceiling = max([limits["mem_bandwidth"], *seen])
    limits["mem_bandwidth_ceiling"] = ceiling
    scale = limits["mem_bandwidth"] / ceiling
    for r in rows:
        if r.get("bamba_bytes_s") is not None:
            r["limit_fraction"] *= scale
            if "limit_fraction_range" in r:
                r["limit_fraction_range"] = [v * scale for v in r["limit_fraction_range"]]


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
        "key": key,
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
        f"memory read {lim['mem_bandwidth'] / 1e9:.1f} GB/s{_bandwidth_note(lim)}",
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
            if r.get("llama_cpp_extra_cost") is not None:
                line += f"; llama.cpp {100 * r['llama_cpp_extra_cost']:+.1f}%"
            lines.append(line)
    if any(r.get("llama_cpp") is not None for r in report["rows"]):
        lines += _llama_cpp_table(report)
    return "\n".join(lines)


def _bandwidth_note(lim: dict[str, Any]) -> str:
    """How the memory's figure was found, and the ceiling where a decoder moved more in this run."""
    note = (
        f" ({lim['mem_bandwidth_by']}, the best of {len(lim['mem_bandwidth_reads'])} reads)"
        if "mem_bandwidth_by" in lim
        else ""
    )
    ceiling = lim.get("mem_bandwidth_ceiling", 0)
    if ceiling > lim["mem_bandwidth"]:
        note += f"; a decoder moved {ceiling / 1e9:.1f} GB/s in this run, the ceiling of limit%"
    flags = lim.get("cpu_flags")
    return note + (f"; CPU flags: {' '.join(flags)}" if flags else "")


def _llama_cpp_table(report: dict) -> list[str]:
    """The rows that llama.cpp measured too: tokens/s of both, ours / llama.cpp (and its range over the
    rounds), and the bytes/s of weights and cache that each decode step moves."""
    lines = [
        f"llama.cpp {report.get('llama_cpp', '')}, build {_llama_cpp_build(report)}, same run:",
        f"{'variant':7s} {'measure':10s} {'prompt':>6s} {'gguf':>5s} {'bamba':>9s} {'llama.cpp':>9s} "
        f"{'ratio':>6s} {'range':>11s} {'GB/s':>6s} {'l.GB/s':>6s} {'RSS l.cpp':>10s}",
    ]
    for r in report["rows"]:
        if r.get("llama_cpp") is None:
            continue
        span = "{:.2f}-{:.2f}x".format(*r["llama_ratio_range"]) if "llama_ratio_range" in r else None
        gb = [None if r[k] is None else r[k] / 1e9 for k in ("bamba_bytes_s", "llama_cpp_bytes_s")]
        lines.append(
            f"{r['variant']:7s} {r['measure']:10s} {_fmt(r.get('prompt'), '', width=6)} "
            f"{r['llama_cpp_type']:>5s} {_fmt(r['bamba'], '9.1f')} {_fmt(r['llama_cpp'], '9.1f')} "
            f"{_fmt(r['llama_ratio'], '5.2f', 'x', 6)} {_fmt(span, '', width=11)} {_fmt(gb[0], '6.1f', width=6)} "
            f"{_fmt(gb[1], '6.1f', width=6)} {_fmt(r['llama_cpp_peak_rss'] / 2**30, '8.2f', 'Gi', 10)}"
        )
    return lines


def _llama_cpp_build(report: dict) -> str:
    """llama.cpp's commit (build number) as its llama-bench reported it in this run."""
    builds = {r["llama_cpp_build"] for r in report.get("runs", []) if "llama_cpp_build" in r}
    return ", ".join(sorted(builds)) or "?"


# ----- as a script: `python benchmarks/bench.py [options of bamba bench]`, and the children --------------
def _worker_main(spec_json: str) -> None:
    """A child: measure the configuration `spec_json` (or the machine's limits), print it as JSON."""
    spec = json.loads(spec_json)
    if spec.pop("allocator", "default") == "tuned":  # the same process setting for both implementations
        tune_cpu_allocator()
    if spec.pop("limits", False):
        out = machine_limits(spec["threads"])
    elif spec["impl"] == "llama.cpp":
        out = llama_cpp_python_case(spec)
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
