"""The memory guard: before a checkpoint's weights are read, will the model fit in this machine's memory?

    needs = load_needs(model_on_meta, stored=torch.bfloat16, dtype=None, quantization="int4")
    available, source = available_memory()   # MemAvailable, or the cgroup's room when that is lower
    check_fits(model_on_meta, ...)             # raises InsufficientMemoryError naming both figures

`from_pretrained` calls `check_fits` on the CPU before any weight is materialized, so a model that cannot
fit stops with an error that names what it needs, what is available, and a quantization that would fit,
instead of being killed by the OOM killer halfway through. `BAMBA_MEMORY_CHECK=0` in the environment (or
`from_pretrained(..., check_memory=False)`) skips it.

What a load holds (bamba.checkpoint): a tensor kept in its stored dtype is a view of the memory-mapped
file (its pages become resident as they are read; an untied input embedding only for the rows looked
up); a converted tensor is a copy, and every copy is held until the load returns; quantizing at load
holds one layer's float pages at a time (released once it is quantized) beside the quantized layers.
The estimate follows that, tensor by tensor, from the model built on `meta`; `predicted_peak_rss` adds
what the process itself holds (`RUNTIME_BYTES`), for `bamba info` and the benchmark.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .quantize import INT4_BLOCK_N, QUANTIZE_BLOCK, check_method, quantized_names

ENV_SWITCH = "BAMBA_MEMORY_CHECK"  # "0" (or "off", "false", "no"): from_pretrained does not check
# Python, torch and this package imported, and the scratch of torch's CPU libraries once they have run;
# measured 0.30 GiB after the imports, and beyond the model's tensors a 337M-parameter model loaded and
# run held 0.4-0.5 GiB (benchmarks/README.md, issue 19).
RUNTIME_BYTES = 450 << 20
# Beside the tensors while loading or running: what the C heap keeps of freed blocks (glibc raises its mmap
# threshold to the largest block freed) and the CPU libraries' scratch; up to 55 MB measured at CI size.
SCRATCH_BYTES = 64 << 20
GIB = 2**30


class InsufficientMemoryError(MemoryError):
    """Loading would need more memory than the machine has available (see `check_fits`)."""


@dataclasses.dataclass(frozen=True)
class Needs:
    """Bytes a load needs beyond what the process already holds."""

    resident: int  # the model's tensors as held once loaded (mapped pages that a forward reads included)
    loading: int  # the most held beside them while loading (float pages of a layer being quantized, ...)
    running: int  # the most held beside them while generating at batch 1 (cache, logits)

    @property
    def total(self) -> int:
        return self.resident + max(self.loading, self.running)


# ----- what a load needs ------------------------------------------------------------------------------------
def load_needs(
    model: nn.Module,
    stored: torch.dtype | Iterable[torch.dtype],
    dtype: torch.dtype | None = None,
    quantization: str | None = None,
    group_size: int | None = None,
) -> Needs:
    """What loading `model` (built on `meta`, the layers of a folder saved quantized already swapped in)
    from a checkpoint whose floats are stored as `stored` (a dtype, or the dtypes its files hold) needs: floats held in `dtype` (None: as
    stored, memory-mapped), the Linear layers quantized with `quantization` (short names allowed)."""
    method = check_method(quantization, group_size, "load_needs")
    stored = float_dtype_of(stored)
    if getattr(model, "quantization_config", None) is not None:
        method = None  # a folder saved quantized: its tensors are held as stored
    float_dtype = dtype or stored
    mapped = float_dtype == stored  # zero-copy views of the file; otherwise converted copies
    targets = set(quantized_names(model, method, group_size or 128)) if method else set()
    uses = _uses(model)
    resident = largest = converted = 0
    for name, module in model.named_modules():
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if uses[id(t)] == 0:
                continue  # counted already (a tied weight)
            held = t.numel() * (float_dtype.itemsize if t.is_floating_point() else t.element_size())
            largest = max(
                largest, t.numel() * (stored.itemsize if t.is_floating_point() else t.element_size())
            )
            if name in targets and t is module.weight:
                resident += quantized_bytes(tuple(t.shape), method, group_size or 128)
                converted += 0 if mapped else held  # the float copy, held until the load returns
            elif not (mapped and isinstance(module, nn.Embedding) and uses[id(t)] == 1):
                resident += held  # (an untied embedding, mapped, is read only where looked up)
            uses[id(t)] = 0
    # mapped: one tensor's pages at a time beside the quantized ones (plus the quantizer's fp32 block);
    # converted: every converted copy of a quantized layer, and one tensor's pages while it is copied
    loading = largest + (4 * QUANTIZE_BLOCK if targets else 0) + converted + SCRATCH_BYTES
    return Needs(resident, loading, _running_bytes(model.config) + SCRATCH_BYTES)


def float_dtype_of(stored: torch.dtype | Iterable[torch.dtype]) -> torch.dtype:
    """The widest floating-point dtype among `stored` (a checkpoint's dtypes; fp32 when it has none)."""
    dtypes = [stored] if isinstance(stored, torch.dtype) else list(stored)
    floats = [d for d in dtypes if d.is_floating_point]
    return max(floats, key=lambda d: d.itemsize, default=torch.float32)


def _uses(model: nn.Module) -> dict[int, int]:
    """id(tensor) -> how many modules hold it (2 for an lm_head tied to the embeddings)."""
    uses: dict[int, int] = {}
    for module in model.modules():
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            uses[id(t)] = uses.get(id(t), 0) + 1
    return uses


def quantized_bytes(shape: tuple[int, ...], method: str, group_size: int = 128) -> int:
    """Bytes of a Linear weight of `shape` (out, in) once quantized with `method` (bamba.quantize's
    formats: int8 per channel + bf16 scales; int4 packed, out padded to 64, bf16 scale and zero per group)."""
    out, inp = shape
    if method == "int4_weight_only":
        rows = out + (-out % INT4_BLOCK_N)
        return rows * inp // 2 + (inp // group_size) * rows * 2 * 2
    return out * inp + out * 2


def _running_bytes(config: Any) -> int:
    """What generating at batch 1 holds beside the weights: the cache (fp32 SSM state and conv window of
    every Mamba layer; a short context's keys and values are small) and a few rows of fp32 logits."""
    c = config
    n_mamba = sum(kind == "mamba" for kind in c.layers_block_type)
    state = (
        c.mamba_n_heads * c.mamba_d_head * c.mamba_d_state * 4 + (c.mamba_d_conv - 1) * c.mamba_conv_dim * 4
    )
    return n_mamba * state + 4 * c.vocab_size * 4


def predicted_peak_rss(needs: Needs) -> int:
    """The peak RSS of a process that loads the model and generates a short text at batch 1."""
    return RUNTIME_BYTES + needs.total


# ----- what the machine has ---------------------------------------------------------------------------------
# cgroup version -> (limit, usage, the reclaimable file cache's field in memory.stat)
_CGROUP_FILES = {
    2: ("memory.max", "memory.current", "inactive_file"),
    1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}
_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


def available_memory(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> tuple[int, str]:
    """(bytes, where the figure comes from): the kernel's MemAvailable, or the room left under a memory
    cgroup limit of this process (v1 or v2: limit - usage + its inactive file cache) where lower."""
    meminfo = os.path.join(proc, "meminfo")
    best = (_read_fields(meminfo)["MemAvailable"] * 1024, f"MemAvailable in {meminfo}")
    for folder, version in _cgroup_folders(proc, cgroup_root):
        limit_file, usage_file, cache_field = _CGROUP_FILES[version]
        try:
            with open(os.path.join(folder, limit_file)) as f:
                text = f.read().strip()
            if text == "max" or int(text) >= _NO_LIMIT:
                continue
            with open(os.path.join(folder, usage_file)) as f:
                usage = int(f.read())
            cache = _read_fields(os.path.join(folder, "memory.stat")).get(cache_field, 0)
        except (OSError, ValueError):
            continue  # not this cgroup's files, or unreadable: MemAvailable stands
        room = max(0, int(text) - usage + cache)
        if room < best[0]:
            best = (room, f"the memory limit of cgroup {folder} ({int(text) / GIB:.1f} GiB)")
    return best


def _cgroup_folders(proc: str, root: str) -> list[tuple[str, int]]:
    """(folder, version) of each memory cgroup over this process, from /proc/self/cgroup: its own and
    its ancestors' (a container may see only the root of its hierarchy, mounted at `root`)."""
    try:
        with open(os.path.join(proc, "self", "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    folders = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            version, base = 2, root
        elif "memory" in controllers.split(","):
            version, base = 1, os.path.join(root, "memory")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        folders += [(os.path.join(base, *parts[:i]), version) for i in range(len(parts), -1, -1)]
    return [(folder, version) for folder, version in folders if os.path.isdir(folder)]


def _read_fields(path: str) -> dict[str, int]:
    """The "name value" (or "name: value kB") lines of /proc/meminfo or a cgroup's memory.stat."""
    fields = {}
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if value.split():
                    fields[name.rstrip(":")] = int(value.split()[0])
    except OSError:
        pass
    return fields


# ----- the guard --------------------------------------------------------------------------------------------
def check_fits(
    model: nn.Module,
    stored: torch.dtype | Iterable[torch.dtype],
    dtype: torch.dtype | None = None,
    quantization: str | None = None,
    group_size: int | None = None,
    where: str = "from_pretrained",
) -> None:
    """Raise InsufficientMemoryError when loading `model` (on `meta`) as `load_needs` describes needs
    more than `available_memory()`; the message names both figures and the lightest setting among
    dtype=bfloat16, int8 and int4 weight-only quantization that would fit. Nothing is checked when
    the environment has BAMBA_MEMORY_CHECK=0 (or off, false, no)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no"):
        return
    needs = load_needs(model, stored, dtype, quantization, group_size)
    available, source = available_memory()
    if needs.total <= available:
        return
    advice = ""
    if getattr(model, "quantization_config", None) is None:  # (a folder saved quantized: as it is)
        options = {  # lighter settings, in the order they are offered
            "dtype=torch.bfloat16": (torch.bfloat16, None),
            "quantization='int8_weight_only'": (dtype, "int8_weight_only"),
            "quantization='int4_weight_only'": (dtype, "int4_weight_only"),
        }
        sizes = {k: load_needs(model, stored, *v).total for k, v in options.items()}
        sizes = {k: n for k, n in sizes.items() if n < needs.total}
        fits = [k for k, n in sizes.items() if n <= available]
        if fits:
            advice = f"; {fits[0]} needs about {_size(sizes[fits[0]])}"
        elif sizes:
            lightest = min(sizes, key=sizes.__getitem__)
            advice = f"; even {lightest} needs about {_size(sizes[lightest])}"
    held = "as stored" if dtype is None else str(dtype).removeprefix("torch.")
    setting = held + (f", quantization={quantization!r}" if quantization else "")
    raise InsufficientMemoryError(
        f"{where}: loading this model ({setting}) needs about {_size(needs.total)} of memory (weights "
        f"{_size(needs.resident)} + {_size(max(needs.loading, needs.running))} while loading or running), "
        f"but {_size(available)} is available ({source}){advice}. "
        f"{ENV_SWITCH}=0 (or check_memory=False) loads it anyway"
    )


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"
