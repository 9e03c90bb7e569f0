"""Hugging Face checkpoint folders: config.json + model.safetensors (or shards + index), local or hub.

Loading builds the model on the `meta` device, then assigns tensors that are views of the memory-mapped
safetensors files (no copy when the dtype is kept; one tensor at a time when it is converted), so peak
memory stays near the weights' size. Tensor names are the model's own `state_dict` keys: an identity map.
Saving writes every file atomically (temporary file + rename), in the layout `transformers` reads.
"""

from __future__ import annotations

import dataclasses
import fractions
import json
import mmap
import os
import re
import struct
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import BambaConfig
from .files import _write_staged, atomic_write, parse_json, read_json_file, remove_dead_staging
from .hub import HUB_KEYWORDS, CheckpointError, resolve_folder
from .linear import pack_for_cpu
from .memory import check_fits
from .quantize import METHODS, check_method, prepare_quantized

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
QUANT_CONFIG_FILE = "quantization_config.json"
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
GENERATION_CONFIG_FILE = "generation_config.json"
# Keys found in some checkpoints that are derived buffers, not weights.
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ----- locating files -------------------------------------------------------------------------------


# ----- reading safetensors ------------------------------------------------------------------------------
class SafetensorsFile:
    """A memory-mapped safetensors file; `tensor(name)` is a zero-copy, copy-on-write view.

    The header is checked as the `safetensors` library checks it before any byte of data is used: at
    most 100 MB of UTF-8 JSON, an object; every tensor's dtype, shape and data_offsets well formed; the
    tensors' bytes following each other from the start of the data to its end, with no gap and no
    overlap (so no tensor reads another's bytes, and no byte is left unowned)."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (length {n}, file {size} bytes, at most "
                    f"{MAX_HEADER_BYTES} allowed)"
                )
            header = _parse_header(path, f.read(n))
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.metadata = header.pop("__metadata__", None) or {}
        self.base = 8 + n
        self.entries = _header_entries(path, header, self.base, size - self.base)

    def keys(self) -> list[str]:
        return list(self.entries)

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, start, end = self.entries[name]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(
            self.mm, dtype=dtype, count=(end - start) // dtype.itemsize, offset=start
        ).view(shape)

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor that was copied out (keeps RSS near the weights' size)."""
        _, _, start, end = self.entries[name]
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, end // page * page
        if hi > lo and hasattr(self.mm, "madvise"):
            self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


MAX_HEADER_BYTES = 100_000_000  # as the safetensors library


def _parse_header(path: str, raw: bytes) -> dict[str, Any]:
    """A safetensors header's JSON object, with its __metadata__ checked (a map of strings, or absent)."""
    try:
        header = parse_json(raw, f"{path}: corrupt safetensors header", constants=False)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__})")
    if not raw.startswith(b"{"):  # (as the safetensors library requires)
        raise CheckpointError(f"{path}: corrupt safetensors header (it must start with '{{')")
    metadata = header.get("__metadata__")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointError(
            f"{path}: corrupt safetensors header (__metadata__ must map names to strings, found "
            f"{json.dumps(metadata)[:80]})"
        )
    return header


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _nbytes(shape: list[int], dtype: torch.dtype) -> int | None:
    """Bytes of a tensor, or None where the safetensors library's 64-bit count overflows on the way."""
    n = dtype.itemsize
    for d in shape:
        n *= d
        if n >= 2**64:
            return None
    return n


def _header_entries(
    path: str, header: dict[str, Any], base: int, data_size: int
) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """name -> (dtype, shape, start, end in the file) of every tensor of a safetensors header (less its
    __metadata__); raises a CheckpointError naming the file and tensor unless the entries are well formed
    and their bytes tile the `data_size` bytes of data exactly."""
    entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
    for name, e in header.items():
        dtype = (
            _ST_DTYPES.get(e.get("dtype"))
            if isinstance(e, dict) and isinstance(e.get("dtype"), str)
            else None
        )
        shape, offsets = (e.get("shape"), e.get("data_offsets")) if isinstance(e, dict) else (None, None)
        problem = None
        if dtype is None:
            problem = f"dtype must be one of {sorted(_ST_DTYPES)}"
        elif not (isinstance(shape, list) and all(map(_is_count, shape))):
            problem = "shape must be a list of integers >= 0"
        elif not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
            problem = "data_offsets must be [start, end], integers >= 0"
        elif offsets[1] - offsets[0] != _nbytes(shape, dtype):
            problem = f"shape {shape} of {e['dtype']} takes {_nbytes(shape, dtype) or 'over 2**64'} bytes"
        if problem:
            raise CheckpointError(
                f"{path}: corrupt header entry for tensor {name!r}: {problem}, found {json.dumps(e)[:120]}"
            )
        entries[name] = (dtype, shape, base + offsets[0], base + offsets[1])
    end = 0
    for name, (_, _, start, stop) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if start - base != end:
            raise CheckpointError(
                f"{path}: tensor {name!r} starts at byte {start - base} of the data, expected {end}: "
                "the tensors' bytes must follow each other with no gap and no overlap"
            )
        end = stop - base
    if end != data_size:
        raise CheckpointError(
            f"{path}: the tensors take {end} bytes of data, but the file holds {data_size} after its header "
            "(truncated or corrupt)"
        )
    return entries


def weight_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder (one file, or the shards its index names). A shard is
    a file name in the folder: a path that leaves it (absolute, or through "..") is refused."""
    single, index = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, INDEX_NAME)
    if os.path.isfile(index):
        try:
            weight_map = _read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError(f"weight_map must map tensor names to file names, found {weight_map!r:.80}")
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        shards = sorted(set(weight_map.values()))
        for s in shards:
            if not _is_file_name(s):
                raise CheckpointError(
                    f"{index}: shard {s!r} is not a file name in the checkpoint folder (shards are read "
                    "only from the folder itself)"
                )
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise FileNotFoundError(f"{folder}: missing shard file(s) {missing} named in {INDEX_NAME}")
        return [os.path.join(folder, s) for s in shards]
    if os.path.isfile(single):
        return [single]
    if any(f.endswith(".bin") for f in os.listdir(folder)):
        raise CheckpointError(f"{folder}: only PyTorch .bin weights found; convert them to safetensors first")
    raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} and no {INDEX_NAME}")


def _is_file_name(name: str) -> bool:
    """Is `name` a plain file name (no folder part, not "." or "..", no NUL)?"""
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and os.path.basename(name) == name
    )


def read_headers(folder: str) -> list[SafetensorsFile]:
    """Every safetensors file of the folder, its header read and checked (no tensor data is touched); a
    tensor named in two files is refused (which of the two would load?)."""
    files = [SafetensorsFile(path) for path in weight_files(folder)]
    where: dict[str, str] = {}
    for st in files:
        for name in st.keys():
            if name in where:
                raise CheckpointError(
                    f"{folder}: tensor {name!r} is in both {os.path.basename(where[name])} and "
                    f"{os.path.basename(st.path)}"
                )
            where[name] = st.path
    return files


_LAYER = re.compile(r"(?:model\.)?layers\.(\d{1,9})\.")


def check_config_against_headers(config: BambaConfig, files: list[SafetensorsFile], folder: str) -> None:
    """Compare config.json with the weights' headers before any module is built: the number of layers
    and the embedding's size (vocab_size x hidden_size). (A 3-layer checkpoint whose config asked for
    50,000 layers would otherwise build them all before a tensor was compared.) Other shapes are
    compared once the model is built, cheaply, on `meta`."""
    layers = {int(m.group(1)) for st in files for name in st.keys() if (m := _LAYER.match(name))}
    if layers and max(layers) + 1 != config.num_hidden_layers:
        raise CheckpointError(
            f"{folder}: config.json has num_hidden_layers={config.num_hidden_layers}, but the weights hold "
            f"layers 0..{max(layers)} ({max(layers) + 1} layers)"
        )
    if not layers and config.num_hidden_layers > 0:
        raise CheckpointError(
            f"{folder}: config.json has num_hidden_layers={config.num_hidden_layers}, but the weights hold "
            "no layer tensors (model.layers.<i>.*)"
        )
    want = [config.vocab_size, config.hidden_size]
    for st in files:
        for name in ("model.embed_tokens.weight", "embed_tokens.weight"):
            if name in st.entries and st.entries[name][1] != want:
                raise CheckpointError(
                    f"{folder}: {name} is {st.entries[name][1]} in {os.path.basename(st.path)}, but "
                    f"config.json has vocab_size x hidden_size = {want}"
                )


def _iter_tensors(files: list[SafetensorsFile]) -> Iterator[tuple[str, SafetensorsFile]]:
    for st in files:
        for name in st.keys():
            yield name, st


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    value = None
    if isinstance(dtype, torch.dtype):
        value = dtype
    elif isinstance(dtype, str):
        name = {
            "fp32": "float32",
            "fp16": "float16",
            "bf16": "bfloat16",
            "half": "float16",
            "float": "float32",
        }.get(dtype, dtype)
        value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype (float32, bfloat16, float16)")
    return value


# ----- loading ----------------------------------------------------------------------------------------------
def load_pretrained(
    cls: type,
    path_or_repo_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    quantization: str | None = None,
    config: BambaConfig | None = None,
    revision: str | None = None,
    pack: bool = False,
    group_size: int | None = None,
    check_memory: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Load `cls` (BambaForCausalLM or BambaModel) from a checkpoint folder or hub repo id.

    dtype: None or "auto" keeps the stored dtype (zero-copy); otherwise tensors are converted one at a
    time. quantization: "int8_weight_only" / "int4_weight_only" / "int8_dynamic_activation_int8_weight",
    applied after loading with `group_size` (int4; see bamba.quantize); a folder saved quantized loads
    quantized, and the same quantization given again changes nothing.
    pack: for CPU inference, store Linear weights in oneDNN's layout where that is measured to be faster
    (`bamba.linear.pack_for_cpu`; bf16 on CPUs with AVX512-BF16); the model can then not be trained.
    check_memory: on the CPU, refuse (InsufficientMemoryError) before reading any weight when the model
    would not fit in the memory available (`bamba.memory.check_fits`; BAMBA_MEMORY_CHECK=0 skips it too).
    Also taken, as transformers users pass them: `torch_dtype` (dtype's older name), `device_map` as one
    device ("cpu", "cuda:0", 0, "auto": the GPU when there is one, or a dict whose values all name one
    device), and huggingface_hub's download keywords (HUB_KEYWORDS: cache_dir, token, local_files_only,
    ...). A setting given both ways must agree; other keywords are refused.
    """
    dtype, device, hub_kwargs = _transformers_keywords(dtype, device, kwargs)
    check_method(quantization, group_size, "from_pretrained")  # before anything loads
    folder = resolve_folder(path_or_repo_id, revision=revision, **hub_kwargs)
    if config is None:
        config = read_config(folder)
    dtype = _parse_dtype(dtype)
    device = one_device(device, "from_pretrained: device") if device is not None else torch.device("cpu")
    files = read_headers(folder)  # every header checked; no tensor data read yet
    check_config_against_headers(config, files, folder)  # before any module is built
    with torch.device("meta"):
        model = cls(config, init=False)
    prefix = "model." if hasattr(model, "lm_head") else ""
    prepare_quantized_modules(model, folder, prefix)
    if check_memory and device.type == "cpu":  # before any weight is read
        stored = {e[0] for st in files for e in st.entries.values()}  # the stored dtypes
        check_fits(model, stored, dtype, quantization, group_size)
    expected = model.state_dict()
    found = _read_tensors(files, expected, prefix, dtype, device)
    config = _settle_tied_head(model, config, prefix, found.tensors, folder)
    _check_tensors(folder, config, prefix, expected, found)
    model.load_state_dict(found.tensors, strict=False, assign=True)
    model.tie_weights()
    model.eval()
    model.generation_config = read_generation_config(folder, config)
    if quantization is not None:
        from .quantize import quantize  # looked up at call time: tests/test_cli.py spies on it there

        quantize(model, quantization, group_size, on_quantized=found.release)
    if pack:
        pack_for_cpu(model, on_packed=found.release)
    return model


def prepare_quantized_modules(model: nn.Module, folder: str, prefix: str) -> None:
    """Swap in the quantized Linear layers of a folder saved quantized, so its tensors fit the model."""
    quant_meta = read_quantization_config(folder)
    if quant_meta is None:
        return
    # module names as saved (a BambaForCausalLM's) -> this class's, as for the tensors
    keys = [_map_key(name + ".weight", prefix) for name in quant_meta["modules"]]
    modules = [k.removesuffix(".weight") for k in keys if k is not None]
    try:
        prepare_quantized(model, {**quant_meta, "modules": modules})
    except ValueError as e:
        raise CheckpointError(f"{os.path.join(folder, QUANT_CONFIG_FILE)}: {e}") from None


@dataclasses.dataclass
class _FoundTensors:
    """What a checkpoint's files held, against the model's state_dict."""

    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # by state_dict key
    # zero-copy tensors: where their pages are
    mapped: dict[str, tuple[SafetensorsFile, str]] = dataclasses.field(default_factory=dict)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    wrong: list[str] = dataclasses.field(default_factory=list)  # wrong shapes or dtypes, described
    mismatched: set[str] = dataclasses.field(default_factory=set)  # their keys (not also "missing")

    def release(self, module_name: str) -> None:
        """Drop the mapped pages of a module's weight that a quantized or packed copy replaced."""
        st, name = self.mapped.get(module_name + ".weight", (None, ""))
        if st is not None:
            st.release(name)


def _read_tensors(
    files: list[SafetensorsFile],
    expected: dict[str, torch.Tensor],
    prefix: str,
    dtype: torch.dtype | None,
    device: torch.device,
) -> _FoundTensors:
    """Every tensor of the folder's files as `expected` wants it: views of the mapped file when dtype
    and device are kept, else converted copies (one at a time, the mapped pages dropped)."""
    found = _FoundTensors()
    for name, st in _iter_tensors(files):
        key = _map_key(name, prefix)
        if key is None or _IGNORED_KEYS.match(name):
            continue
        if key not in expected:
            found.unexpected.append(name)
            continue
        want = expected[key]
        t = st.tensor(name)
        if list(t.shape) != list(want.shape):
            found.wrong.append(
                f"{name}: expected {list(want.shape)}, found {list(t.shape)} in {os.path.basename(st.path)}"
            )
            found.mismatched.add(key)
            continue
        if t.is_floating_point() != want.is_floating_point() or (
            not want.is_floating_point() and t.dtype != want.dtype
        ):  # (floats convert; quantized integers must come as they were saved)
            found.wrong.append(
                f"{name}: expected {'floating point' if want.is_floating_point() else want.dtype}, found "
                f"{t.dtype} in {os.path.basename(st.path)}"
            )
            found.mismatched.add(key)
            continue
        target = want.dtype if not want.is_floating_point() else (dtype or t.dtype)
        if t.dtype != target or device.type != "cpu":
            t = t.to(device=device, dtype=target, copy=True)
            st.release(name)
        else:
            found.mapped[key] = (st, name)
        found.tensors[key] = t
    return found


def _settle_tied_head(
    model: nn.Module, config: BambaConfig, prefix: str, loaded: dict[str, torch.Tensor], folder: str
) -> BambaConfig:
    """A checkpoint whose config ties the lm_head to the embeddings, read as transformers reads it: a
    stored head that differs stays untied (warned; the returned config, which every module of `model`
    now holds, says so, so that saving keeps the head); a head stored alone becomes the embeddings."""
    if prefix and config.tie_word_embeddings and _stored_head_differs(loaded):
        warnings.warn(
            f"{folder}: config.json has tie_word_embeddings=true, but the checkpoint's lm_head.weight "
            "differs from model.embed_tokens.weight; it is loaded untied, as transformers does, and "
            "the model's config now has tie_word_embeddings=False",
            stacklevel=4,  # the caller of from_pretrained
        )
        old, config = config, dataclasses.replace(config, tie_word_embeddings=False)
        for module in model.modules():  # every holder of the config (the layers keep it too)
            if getattr(module, "config", None) is old:
                module.config = config
    embed = prefix + "embed_tokens.weight"
    if prefix and config.tie_word_embeddings and embed not in loaded and "lm_head.weight" in loaded:
        loaded[embed] = loaded.pop("lm_head.weight")  # a tied checkpoint that kept the head's copy only
    return config


def _check_tensors(
    folder: str, config: BambaConfig, prefix: str, expected: dict[str, torch.Tensor], found: _FoundTensors
) -> None:
    """Raise one CheckpointError listing every missing, unexpected and misshapen tensor."""
    tied = {"lm_head.weight"} if config.tie_word_embeddings and prefix else set()
    missing = [k for k in expected if k not in found.tensors and k not in tied and k not in found.mismatched]
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if found.unexpected:
        problems.append(f"unexpected tensors: {found.unexpected}")
    if found.wrong:
        problems.append("wrong shapes or dtypes: " + "; ".join(found.wrong))
    if problems:
        raise CheckpointError(f"{folder}: checkpoint does not match the config:\n  " + "\n  ".join(problems))


def _transformers_keywords(
    dtype: Any, device: Any, kwargs: dict[str, Any]
) -> tuple[Any, Any, dict[str, Any]]:
    """(dtype, device, hub keywords) from `load_pretrained`'s extra keywords; see its doc."""
    kwargs = dict(kwargs)
    torch_dtype = kwargs.pop("torch_dtype", None)
    if torch_dtype is not None:
        if dtype is not None and _parse_dtype(dtype) != _parse_dtype(torch_dtype):
            raise TypeError(
                f"from_pretrained: dtype={dtype!r} and torch_dtype={torch_dtype!r} differ; pass dtype"
            )
        dtype = torch_dtype
    device_map = kwargs.pop("device_map", None)
    if device_map is not None:
        if isinstance(device_map, dict):  # {"": 0}: every module on one device
            devices = {_device_key(one_device(v, "from_pretrained: device_map")) for v in device_map.values()}
            if len(devices) != 1:
                raise TypeError(
                    f"from_pretrained: device_map={device_map!r} spreads the model over several devices, "
                    "which is not supported; it loads on one device (device= or device_map='cuda:0')"
                )
            device_map = next(iter(device_map.values()))
        if device_map == "auto":
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        mapped = one_device(device_map, "from_pretrained: device_map")
        if device is not None and _device_key(one_device(device, "from_pretrained: device")) != _device_key(
            mapped
        ):
            raise TypeError(f"from_pretrained: device={device!r} and device_map={device_map!r} differ")
        device = mapped
    unknown = sorted(set(kwargs) - HUB_KEYWORDS)
    if unknown:
        raise TypeError(
            f"from_pretrained: unknown keyword argument(s) {unknown}; it takes dtype (torch_dtype), device "
            f"(device_map), quantization, group_size, config, revision, pack, check_memory, and the hub's "
            f"{sorted(HUB_KEYWORDS)}"
        )
    return dtype, device, kwargs


def one_device(value: Any, name: str) -> torch.device:
    """`value` (a name, a torch.device or a GPU index) as a torch.device that this machine has; errors
    name the argument as `name` ("from_pretrained: device", "--device", ...)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"cuda:{value}"  # a GPU index, as transformers reads it
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"{name}={value!r} is not one device (cpu, cuda, cuda:1, mps, a GPU index, or for device_map "
            "'auto')"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={value!r}, but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={value!r}, but MPS (Apple GPUs) is not available on this machine")
    return dev


def _device_key(dev: torch.device) -> tuple[str, int]:
    return dev.type, dev.index or 0  # "cuda" is "cuda:0" here, as torch places tensors


def _stored_head_differs(loaded: dict[str, torch.Tensor]) -> bool:
    """Does the checkpoint hold an lm_head.weight unequal to the embeddings (a head a tied config would
    drop)?"""
    head, embed = loaded.get("lm_head.weight"), loaded.get("model.embed_tokens.weight")
    return head is not None and embed is not None and not torch.equal(head, embed.to(head.dtype))


def _map_key(name: str, prefix: str) -> str | None:
    """Checkpoint name -> our state_dict key. Loading a base model from a causal-LM checkpoint drops
    `model.` and the lm_head; loading a causal LM from a base-model checkpoint adds `model.`."""
    if prefix:  # BambaForCausalLM
        if name.startswith(("model.", "lm_head.")):
            return name
        return prefix + name
    if name.startswith("lm_head."):
        return None
    return name.removeprefix("model.")


def read_config(folder: str) -> BambaConfig:
    """The folder's config.json."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder}: missing config.json (not a checkpoint folder, or a save that did not finish)"
        )
    return BambaConfig.from_json_file(path)


def read_json(path: str) -> Any:
    """The JSON value in `path`; a file that does not parse is named in the error."""
    try:
        return read_json_file(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _read_json_object(path: str) -> dict[str, Any]:
    value = read_json(path)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a JSON {type(value).__name__}")
    return value


def _read_json_file(folder: str, name: str) -> Any:
    """The JSON value of folder/name, or None when the file is absent."""
    path = os.path.join(folder, name)
    return read_json(path) if os.path.isfile(path) else None


def read_generation_config(folder: str, config: BambaConfig | None = None) -> dict | None:
    """The folder's generation_config.json as a dict, or None. Its token ids (what generation reads of it)
    are checked: integers (eos: or a list of them) in [0, config.vocab_size)."""
    gen = _read_json_file(folder, GENERATION_CONFIG_FILE)
    if gen is None:
        return None
    path = os.path.join(folder, GENERATION_CONFIG_FILE)
    if not isinstance(gen, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a JSON {type(gen).__name__}")
    vocab = config.vocab_size if config is not None else None
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = gen.get(key)
        ids = value if isinstance(value, list) and key == "eos_token_id" else [value]
        if value is not None and not all(type(i) is int and 0 <= i < (vocab or i + 1) for i in ids):
            raise CheckpointError(
                f"{path}: {key}={json.dumps(value)[:80]} is invalid: expected a token id (an integer in "
                f"[0, {vocab or 'vocab_size'}))" + (" or a list of them" if key == "eos_token_id" else "")
            )
    return gen


def read_quantization_config(folder: str) -> dict | None:
    """The folder's quantization_config.json (written when a quantized model is saved), or None; checked:
    quant_method "bamba", a known format, an int4 group size PyTorch's kernel takes, module names."""
    meta = _read_json_file(folder, QUANT_CONFIG_FILE)
    if meta is None:
        return None
    path = os.path.join(folder, QUANT_CONFIG_FILE)
    modules = meta.get("modules") if isinstance(meta, dict) else None
    if not (isinstance(modules, list) and all(isinstance(m, str) and m for m in modules)):
        raise CheckpointError(f"{path}: expected a JSON object with a 'modules' list of module names")
    if len(set(modules)) != len(modules):
        raise CheckpointError(f"{path}: a module is named twice in 'modules'")
    group_size = meta.get("group_size")
    if meta.get("quant_method") != "bamba" or meta.get("format") not in METHODS:
        raise CheckpointError(
            f"{path}: expected quant_method 'bamba' and format one of {METHODS}, found "
            f"{meta.get('quant_method')!r} and {meta.get('format')!r}"
        )
    if meta["format"] == "int4_weight_only" and group_size is not None:
        try:
            check_method(meta["format"], group_size, path)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    elif group_size is not None and meta["format"] != "int4_weight_only":
        raise CheckpointError(
            f"{path}: group_size={group_size!r} is set, but format {meta['format']} has none"
        )
    return meta


# ----- saving -----------------------------------------------------------------------------------------------
_SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_SIZE_UNITS |= {k + "I": 2 ** (10 * i) for i, k in enumerate("KMGT", 1)}  # KiB, MiB, GiB, TiB


def parse_size(size: int | str) -> int:
    """max_shard_size in bytes: an int, or a string like "5GB", "500MB", "1.5GiB", "2TB" (decimal units
    K, M, G, T; binary Ki, Mi, Gi, Ti; after K, M, G or T a lowercase b, as in "5Gb", means bits, as in
    transformers; a bare number or "B" / "b" is bytes)."""
    expected = "expected a byte count (an int) or a size like '5GB' or '500MB'"
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise ValueError(f"max_shard_size={size!r}: {expected}, found {type(size).__name__}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size={size}: must be > 0")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B?)\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: {expected}")
    unit = m.group(2).upper().rstrip("B")
    value = int(fractions.Fraction(m.group(1)) * _SIZE_UNITS[unit])  # (exact: no float rounding)
    if m.group(2).endswith("b") and unit in ("K", "M", "G", "T"):  # "5Gb": bits, as transformers reads it
        value //= 8
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r}: must be > 0")
    return value


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file (atomically), streaming tensor by tensor."""
    atomic_write(path, _safetensors_writer(tensors, metadata), mode="wb")


def _safetensors_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Any:
    """A function that writes `tensors` as a safetensors file to an open binary file."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 64)  # tensor data starts 64-byte aligned (packed kernels want it)

    def write(f: Any) -> None:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            data = t.detach().to("cpu").contiguous()
            if data.numel():
                f.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))

    return write


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
) -> None:
    """Write config.json, generation_config.json and model.safetensors (or shards + index) to `folder`.

    transformers' BambaForCausalLM.from_pretrained reads the result. The tied lm_head is not stored (as
    transformers does). Stale shards of an earlier save in the same folder are removed, and so are the
    staged files of a save on this machine that was killed (.tmp-<host>-<pid>-*, its process gone).
    """
    dtype = _parse_dtype(dtype)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    state = _state_to_save(model, dtype)
    shards = _shard(state, parse_size(max_shard_size))
    texts = _json_texts(model, state)
    # Every new file is written to a temporary name first; an earlier save in the folder stays whole
    # until all of them are on disk, then the files are renamed into place, config.json last.
    old_files = [f for f in os.listdir(folder) if _WEIGHT_FILE.fullmatch(f)]
    staged: list[tuple[str, str]] = []  # (temporary, final path), in publishing order
    try:
        _stage_files(folder, shards, texts, staged)
        _publish(folder, staged, shards, texts, old_files)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    remove_dead_staging(folder)  # what a killed save of this machine left (up to a checkpoint's size)


def _state_to_save(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The model's tensors as saved: without a tied lm_head, floats in `dtype` if given."""
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def _shard(state: dict[str, torch.Tensor], limit: int) -> dict[str, dict[str, torch.Tensor]]:
    """File name -> its tensors: model.safetensors, or shards of at most `limit` bytes (a tensor larger
    than that gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    if len(shards) == 1:
        return {WEIGHTS_NAME: shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}


def _json_texts(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, str | None]:
    """File name -> text of the JSON files beside the weights, in publishing order (config.json last);
    None for a quantization_config.json that a model not quantized does not have."""
    config: BambaConfig = model.config
    any_float = next((t for t in state.values() if t.is_floating_point()), None)
    cfg = json.loads(config.to_json_string())
    if any_float is not None:
        cfg["dtype"] = str(any_float.dtype).removeprefix("torch.")
    gen = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    gen.update(getattr(model, "generation_config", None) or {})  # as loaded: kept on a round trip
    quant = getattr(model, "quantization_config", None)
    return {
        QUANT_CONFIG_FILE: None if quant is None else json.dumps(quant, indent=2),
        GENERATION_CONFIG_FILE: json.dumps(gen, indent=2) + "\n",
        CONFIG_NAME: json.dumps(cfg, indent=2) + "\n",
    }


def _stage_files(
    folder: str,
    shards: dict[str, dict[str, torch.Tensor]],
    texts: dict[str, str | None],
    staged: list[tuple[str, str]],
) -> None:
    """Write every new file to a temporary beside its place; (temporary, final path) pairs are appended
    to `staged` as they are written (so a failure can remove them), in publishing order."""
    for name, shard in shards.items():
        path = os.path.join(folder, name)
        staged.append((_write_staged(path, _safetensors_writer(shard), "wb"), path))
    if len(shards) > 1:
        weight_map = {k: name for name, shard in shards.items() for k in shard}
        total = sum(t.numel() * t.element_size() for shard in shards.values() for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        path = os.path.join(folder, INDEX_NAME)
        staged.append((_write_staged(path, lambda f: json.dump(index, f, indent=2)), path))
    for name, text in texts.items():
        if text is not None:
            path = os.path.join(folder, name)
            staged.append((_write_staged(path, lambda f, text=text: f.write(text)), path))


def _publish(
    folder: str,
    staged: list[tuple[str, str]],
    shards: dict[str, dict[str, torch.Tensor]],
    texts: dict[str, str | None],
    old_files: list[str],
) -> None:
    """Rename the staged files into place, removing what the earlier save had and this one has not.

    A new config (or quantization layout) read beside the earlier weights, or the reverse, would load as
    neither save: then the old config.json goes first, and until the new one is renamed in (last) the
    folder fails to load. With the same config, loading prefers an index over model.safetensors, so until
    the new index (or, going to one file, the removal of the old index) the folder still loads the
    earlier save whole. Where new shards take the names of old ones, the index first points at the staged
    shards (see `_publish_over_same_names`); on a file system without hard links the old index is removed
    first instead, so a crash in between fails instead of mixing saves."""
    config_path = os.path.join(folder, CONFIG_NAME)
    quant_path = os.path.join(folder, QUANT_CONFIG_FILE)
    new_files = set(shards) | ({INDEX_NAME} if len(shards) > 1 else set())
    if _read_text(config_path) != texts[CONFIG_NAME] or _read_text(quant_path) != texts[QUANT_CONFIG_FILE]:
        if os.path.exists(config_path):
            os.remove(config_path)
    if any(f in shards and f != WEIGHTS_NAME for f in old_files) and INDEX_NAME in old_files:
        rest = _publish_over_same_names(folder, staged, shards)
        if rest is None:
            os.remove(os.path.join(folder, INDEX_NAME))
        staged = rest or staged
    for tmp, path in staged:
        if path == config_path:
            stale = [f for f in old_files if f not in new_files and os.path.exists(os.path.join(folder, f))]
            for old in sorted(stale, key=lambda f: f != INDEX_NAME):  # the old index before its shards
                os.remove(os.path.join(folder, old))
            if texts[QUANT_CONFIG_FILE] is None and os.path.exists(
                quant_path
            ):  # an earlier save was quantized
                os.remove(quant_path)
        os.replace(tmp, path)


def _publish_over_same_names(
    folder: str, staged: list[tuple[str, str]], shards: dict[str, dict[str, torch.Tensor]]
) -> list[tuple[str, str]] | None:
    """Publish new shards over old ones of the same names with the folder loading one save or the other
    at every moment: an index naming the staged shards replaces the old one (the new save loads from
    them), the shards take their names through hard links (the staged names stay valid), then the final
    index goes in. Returns the staged files left to publish, or None where hard links are refused."""
    pairs = [(tmp, path) for tmp, path in staged if os.path.basename(path) in shards]
    links: list[str] = []
    try:
        for tmp, _ in pairs:
            links.append(tmp + ".link")
            os.link(tmp, links[-1])
    except OSError:
        for link in links:
            if os.path.exists(link):
                os.remove(link)
        return None
    index_path = os.path.join(folder, INDEX_NAME)
    staged_index = next(tmp for tmp, path in staged if path == index_path)
    with open(staged_index) as f:
        index = json.load(f)
    names = {os.path.basename(path): os.path.basename(tmp) for tmp, path in pairs}
    index["weight_map"] = {k: names[v] for k, v in index["weight_map"].items()}
    pointed = final = False
    try:
        atomic_write(index_path, lambda f: json.dump(index, f, indent=2))  # loads the new save (staged names)
        pointed = True
        for link, (_, path) in zip(links, pairs):
            os.replace(link, path)
        os.replace(staged_index, index_path)  # (the final names)
        final = True
    except BaseException:  # (an exception, not a kill: the staged files go, so the index that names them)
        for link in links:
            if os.path.exists(link):
                os.remove(link)
        if pointed and not final:
            os.remove(index_path)
        raise
    for tmp, _ in pairs:
        os.remove(tmp)
    return [(tmp, path) for tmp, path in staged if (tmp, path) not in pairs and tmp != staged_index]


def _read_text(path: str) -> str | None:
    """The text of a small file, or None when it is absent."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()
