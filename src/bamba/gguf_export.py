"""`bamba export-gguf`: a Bamba checkpoint as one GGUF file that llama.cpp runs with our logits.

llama.cpp (the one vendored by llama-cpp-python 0.3.36) reads Bamba as its `granitehybrid` architecture: a
layer whose `attention.head_count_kv` entry is 0 is a Mamba-2 layer, the others attention. Its rope for that
architecture is the "normal" one: adjacent pairs (2i, 2i+1) of the first `rope.dimension_count` dims of a
head turn by angle pos * base^(-2i / n_rot). Bamba (as transformers) turns the pairs (i, i + rd/2) of the
first rd = head_dim * partial_rotary_factor dims by pos * base^(-2i / rd) and leaves the rest alone. So the
file says n_rot = rd, and the rows of q_proj and k_proj are reordered within each head, row i -> 2i and row
i + rd/2 -> 2i + 1 (i < rd/2), rows rd.. unmoved: the same order on both sides keeps q . k as it was.
llama.cpp's own converter permutes over the whole head and leaves n_rot = head_dim, which rotates the dims
Bamba passes through (see tests/test_gguf.py and the README's "Use with llama.cpp").

Tensor names come from the `gguf` package's map of Hugging Face names; what llama.cpp wants beyond a name
(A as -exp(A_log), shapes with a trailing 1, the conv weight without its middle dim, the gated norm per
group) is one pair of functions, `_to_gguf` and `_from_gguf`, so `gguf_state_dict` reads a file back.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch

from . import BambaForCausalLM
from .config import BambaConfig
from .files import atomic_write
from .hub import resolve_folder
from .tokenizer import Tokenizer

_T = gguf.MODEL_TENSOR
ARCH = "granitehybrid"  # llama.cpp's name for Bamba and Granite 4.0-H (src/llama-arch.cpp)
# --type -> (the matrices' GGML type, general.file_type)
_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
TYPES = tuple(_TYPES)
# Checkpoint names that the gguf package's map spells differently (it knows Mamba-2's dt_proj.bias).
_HF_ALIASES = {".mamba.dt_bias": ".mamba.dt_proj.bias"}
# The pre-tokenizer splits that llama.cpp implements, by the regex of tokenizer.json (llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# split regex -> (llama.cpp's tokenizer.ggml.pre, the ignore_merges it implies)
_PRE_TOKENIZERS = {_GPT2_SPLIT: ("gpt-2", False), _LLAMA3_SPLIT: ("llama-bpe", True)}


# ----- the rope layout ----------------------------------------------------------------------------------
def rope_dims(config: BambaConfig) -> int:
    """The leading dims of each attention head that Bamba rotates (llama.cpp's n_rot)."""
    return config.rotary_dim


def rope_rows(head_dim: int, rotated: int) -> torch.Tensor:
    """Row order within one head for llama.cpp's adjacent-pair rope: new row r holds old row rows[r].
    (0, rd/2, 1, rd/2 + 1, ..., rd/2 - 1, rd - 1, rd, rd + 1, ..., head_dim - 1)."""
    half = torch.arange(rotated // 2)
    pairs = torch.stack([half, half + rotated // 2], dim=1).flatten()  # (rd,): i, i + rd/2 side by side
    return torch.cat([pairs, torch.arange(rotated, head_dim)])


def _permute_heads(t: torch.Tensor, n_heads: int, rows: torch.Tensor) -> torch.Tensor:
    """Reorder the rows of every head of a q/k weight (heads*hd, d) or bias (heads*hd,)."""
    hd = t.shape[0] // n_heads
    return t.reshape(n_heads, hd, *t.shape[1:])[:, rows].reshape(t.shape)  # (heads, hd, ...) -> back


# ----- one tensor each way ------------------------------------------------------------------------------
def _gguf_name(hf_name: str, tensor_map: Any) -> tuple[Any, str]:
    """(gguf.MODEL_TENSOR kind, GGUF name) of a checkpoint tensor."""
    name = hf_name
    for old, new in _HF_ALIASES.items():
        if name.endswith(old):
            name = name[: -len(old)] + new
    found = tensor_map.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ValueError(f"tensor {hf_name!r} has no GGUF name in the gguf package's map for {ARCH}")
    return found


def _to_gguf(kind: Any, t: torch.Tensor, config: BambaConfig) -> torch.Tensor:
    """A checkpoint tensor (fp32) as llama.cpp's granitehybrid graph reads it (numpy order: ggml's reversed)."""
    if kind in (_T.ATTN_Q, _T.ATTN_K):
        n = config.num_attention_heads if kind == _T.ATTN_Q else config.num_key_value_heads
        return _permute_heads(t, n, rope_rows(config.attention_head_dim, rope_dims(config)))
    if kind == _T.SSM_A:
        return -torch.exp(t).reshape(-1, 1)  # A = -exp(A_log), (h, 1): ggml {1, h}
    if kind == _T.SSM_D:
        return t.reshape(-1, 1)  # (h, 1)
    if kind == _T.SSM_CONV1D and t.dim() == 3:
        return t.reshape(t.shape[0], t.shape[2])  # (C, 1, K) -> (C, K): ggml {K, C}
    if kind == _T.SSM_NORM:
        return t.reshape(config.mamba_n_groups, -1)  # (groups, d_inner / groups): normed per group
    return t


def _from_gguf(kind: Any, t: torch.Tensor, config: BambaConfig, hf_shape: torch.Size) -> torch.Tensor:
    """The inverse of `_to_gguf` (A_log comes back as log(-A), equal up to rounding)."""
    if kind in (_T.ATTN_Q, _T.ATTN_K):
        n = config.num_attention_heads if kind == _T.ATTN_Q else config.num_key_value_heads
        rows = rope_rows(config.attention_head_dim, rope_dims(config))
        return _permute_heads(t.reshape(hf_shape), n, torch.argsort(rows))
    if kind == _T.SSM_A:
        return torch.log(-t).reshape(hf_shape)
    return t.reshape(hf_shape)


def _stays_f32(kind: Any, hf_shape: torch.Size) -> bool:
    """Vectors (biases, norms, A_log, D, dt_bias) and the conv weight: llama.cpp reads them as f32."""
    return len(hf_shape) <= 1 or kind == _T.SSM_CONV1D  # (ggml_ssm_conv and ggml_ssm_scan take f32 only)


# ----- the plan: every tensor's name, shape and type before any data ------------------------------------
@dataclass
class _Entry:
    hf_name: str
    kind: Any  # gguf.MODEL_TENSOR
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order
    qtype: Any  # gguf.GGMLQuantizationType


def _plan(state: dict[str, torch.Tensor], config: BambaConfig, qtype: Any) -> list[_Entry]:
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GRANITE_HYBRID, config.num_hidden_layers)
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    plan = []
    for hf_name, t in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads token_embd for the head when `output` is absent
        kind, name = _gguf_name(hf_name, tensor_map)
        shape = tuple(_to_gguf(kind, torch.empty(t.shape, device="meta"), config).shape)
        if _stays_f32(kind, t.shape):
            want = gguf.GGMLQuantizationType.F32
        elif shape[-1] % block:  # rows must hold whole blocks; as llama.cpp's converter, fall back to f16
            want = gguf.GGMLQuantizationType.F16
        else:
            want = qtype
        plan.append(_Entry(hf_name, kind, name, shape, want))
    if not config.mamba_conv_bias:  # the graph adds ssm_conv1d.bias unconditionally: zeros are exact
        for i, kind in enumerate(config.layers_block_type):
            if kind == "mamba":
                name = gguf.TENSOR_NAMES[_T.SSM_CONV1D].format(bid=i) + ".bias"
                f32 = gguf.GGMLQuantizationType.F32
                plan.append(_Entry("", _T.SSM_CONV1D, name, (config.mamba_conv_dim,), f32))
    return plan


def _encode(t: torch.Tensor, qtype: Any) -> np.ndarray:
    """fp32 values -> the bytes (or f32 / f16 array) the file stores for `qtype`."""
    a = t.detach().to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return a
    if qtype == gguf.GGMLQuantizationType.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)  # uint8 blocks: bf16, q8_0, q4_0


def _arrays(plan: list[_Entry], state: dict[str, torch.Tensor], config: BambaConfig) -> Iterator[np.ndarray]:
    """Each planned tensor's stored array, one at a time (peak memory: one tensor, not the model)."""
    for e in plan:
        if not e.hf_name:  # a zero conv bias (config.mamba_conv_bias is false)
            yield np.zeros(e.shape, dtype=np.float32)
            continue
        t = _to_gguf(e.kind, state[e.hf_name].float(), config)
        assert tuple(t.shape) == e.shape, (e.hf_name, t.shape, e.shape)
        yield _encode(t, e.qtype)


# ----- checks -------------------------------------------------------------------------------------------
def _check_config(config: BambaConfig, folder: str) -> None:
    """Refuse what llama.cpp's granitehybrid graph computes differently, naming the config field."""
    where = os.path.join(folder, "config.json")

    def refuse(field: str, why: str) -> ValueError:
        return ValueError(
            f"{where}: {field}={getattr(config, field)!r}: {why}; llama.cpp cannot run this model"
        )

    if config.mamba_expand != 2:
        raise refuse("mamba_expand", "llama.cpp's granitehybrid supports only 2 (it asserts d_inner = 2 * d)")
    if config.mamba_proj_bias:
        raise refuse("mamba_proj_bias", "llama.cpp's Mamba-2 layer has no in_proj / out_proj biases")
    if config.time_step_limit not in (None, (0.0, math.inf)):
        raise refuse("time_step_limit", "llama.cpp does not clamp dt (only (0, inf), a no-op, is exact)")
    if rope_dims(config) % 2 or rope_dims(config) == 0:
        raise refuse(
            "partial_rotary_factor", f"rotates {rope_dims(config)} dims; llama.cpp needs an even n_rot"
        )
    if not config.attn_layer_indices:
        raise refuse("attn_layer_indices", "no attention layer: llama.cpp reads such a file as another arch")


def _check_output(out: str, type: str, force: bool) -> None:
    if type not in TYPES:
        raise ValueError(f"export-gguf: unsupported type {type!r}; expected one of {', '.join(TYPES)}")
    if os.path.isdir(out):
        raise IsADirectoryError(f"{out}: is a folder; give the path of the .gguf file to write")
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out}: already exists; pass force=True (--force) to replace it")


def _check_folder(folder: str) -> None:
    if os.path.isfile(os.path.join(folder, "quantization_config.json")):
        raise ValueError(
            f"{folder}: a quantized checkpoint (quantization_config.json); export from the float checkpoint "
            "it was made from, and let --type q8_0 / q4_0 quantize (its integer weights are not re-read)"
        )
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise FileNotFoundError(
            f"{folder}: no tokenizer.json; a GGUF carries its tokenizer (copy the tokenizer files of the "
            "model's base into the folder)"
        )


# ----- metadata -----------------------------------------------------------------------------------------
def _add_model_metadata(writer: Any, config: BambaConfig, file_type: Any, name: str) -> None:
    attn = set(config.attn_layer_indices or ())
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)  # every norm, the Mamba gated one included
    writer.add_head_count(config.num_attention_heads)
    # 0 marks a Mamba-2 layer (llama.cpp: is_recr(il) <=> n_head_kv(il) == 0)
    writer.add_head_count_kv(
        [config.num_key_value_heads if i in attn else 0 for i in range(config.num_hidden_layers)]
    )
    writer.add_key_length(config.attention_head_dim)
    writer.add_value_length(config.attention_head_dim)
    writer.add_rope_dimension_count(rope_dims(config))
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_scaling_finetuned(True)  # granitehybrid's switch for rope in the attention layers
    writer.add_ssm_conv_kernel(config.mamba_d_conv)
    writer.add_ssm_inner_size(config.mamba_intermediate_size)
    writer.add_ssm_state_size(config.mamba_d_state)
    writer.add_ssm_time_step_rank(config.mamba_n_heads)  # llama.cpp's name for the number of SSM heads
    writer.add_ssm_group_count(config.mamba_n_groups)


def _pre_tokenizer(spec: dict[str, Any], path: str) -> str:
    """llama.cpp's name for tokenizer.json's byte-level BPE split (gpt-2 or llama-bpe), else an error."""
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    regex = None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        regex = _GPT2_SPLIT
    elif pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (
            len(parts) == 2
            and parts[0].get("type") == "Split"
            and parts[0].get("behavior") == "Isolated"
            and not parts[0].get("invert", False)
            and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)
        ):
            regex = (parts[0].get("pattern") or {}).get("Regex")
    if model.get("type") != "BPE" or regex not in _PRE_TOKENIZERS or spec.get("normalizer") is not None:
        raise ValueError(
            f"{path}: a {model.get('type')} model with pre_tokenizer {json.dumps(pre)[:200]} and normalizer "
            f"{json.dumps(spec.get('normalizer'))[:80]}; export-gguf writes byte-level BPE tokenizers with "
            "GPT-2's or Llama 3's split and no normalizer, the ones llama.cpp implements"
        )
    if any(p.get("add_prefix_space") for p in [pre, *(pre.get("pretokenizers") or [])]):
        raise ValueError(f"{path}: pre_tokenizer adds a prefix space, which llama.cpp's BPE does not")
    name, ignore_merges = _PRE_TOKENIZERS[regex]
    if bool(model.get("ignore_merges", False)) != ignore_merges:
        raise ValueError(
            f"{path}: model.ignore_merges={model.get('ignore_merges', False)} with the {name} split; "
            f"llama.cpp's {name} has ignore_merges={ignore_merges}"
        )
    return name


def _add_tokenizer_metadata(writer: Any, tok: Tokenizer, config: BambaConfig, folder: str) -> None:
    """BPE vocab (padded to the embedding's rows), merges, special ids and chat templates."""
    path = os.path.join(folder, "tokenizer.json")
    spec = json.loads(tok.backend.to_str())
    pre = _pre_tokenizer(spec, path)
    vocab = tok.backend.get_vocab(with_added_tokens=True)  # token -> id
    if max(vocab.values()) >= config.vocab_size:
        raise ValueError(
            f"{path}: token id {max(vocab.values())} does not fit the model's vocab_size {config.vocab_size}"
        )
    added = tok.backend.get_added_tokens_decoder()  # id -> AddedToken
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]  # ids no token has: embedding rows only
    types = [gguf.TokenType.UNUSED] * config.vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        if i in added:  # llama.cpp matches these as raw text, before the BPE
            types[i] = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        else:
            types[i] = gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    ids = {
        writer.add_bos_token_id: tok.bos_token_id if tok.bos_token_id is not None else config.bos_token_id,
        writer.add_eos_token_id: tok.eos_token_id if tok.eos_token_id is not None else eos,
        writer.add_pad_token_id: tok.pad_token_id if tok.pad_token_id is not None else config.pad_token_id,
        writer.add_unk_token_id: tok.token_to_id(tok.unk_token),
    }
    for add, token_id in ids.items():
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tok.add_bos_token)
    eos_id = tok.eos_token_id
    writer.add_add_eos_token(eos_id is not None and tok.backend.encode("a").ids[-1:] == [eos_id])
    if tok.named_chat_templates:  # the default one as "default", the others as tokenizer.chat_template.NAME
        default = {"default": tok.chat_template} if tok.chat_template is not None else {}
        templates = {**default, **tok.named_chat_templates}
        writer.add_chat_template([{"name": k, "template": v} for k, v in templates.items()])
    elif tok.chat_template is not None:
        writer.add_chat_template(tok.chat_template)


# ----- the command --------------------------------------------------------------------------------------
def export_gguf(
    folder: str | os.PathLike, out: str | os.PathLike, type: str = "f32", force: bool = False
) -> str:
    """Write the checkpoint `folder` (or hub repo id) as the GGUF file `out` for llama.cpp; returns `out`.

    type: f32, f16, bf16, q8_0 or q4_0 for the matrices; biases, norms, A, D and the conv weights stay f32
    (llama.cpp's kernels read them so), and a matrix whose rows are not whole blocks of 32 falls back to f16
    in q8_0 / q4_0. The tokenizer goes in too, so the file runs alone. The file is staged beside `out` and
    renamed into place, so a failed export leaves nothing behind; an existing `out` is kept unless `force`.
    A quantized checkpoint (quantization_config.json) is refused: export the float one it came from.
    """
    out = os.fspath(out)
    _check_output(out, type, force)  # before anything is fetched or read
    local = resolve_folder(folder)
    _check_folder(local)
    qtype, file_type = _TYPES[type]
    _check_config(BambaConfig.from_pretrained(local), local)
    tok = Tokenizer.from_pretrained(local)
    # as stored: memory-mapped views, the names and shapes checked against the config
    model = BambaForCausalLM.from_pretrained(local)
    config = model.config  # (a tied config whose stored head differs comes back untied)
    state = model.state_dict()

    writer = gguf.GGUFWriter(None, ARCH)
    _add_model_metadata(writer, config, file_type, os.path.basename(os.path.normpath(os.fspath(folder))))
    _add_tokenizer_metadata(writer, tok, config, local)
    plan = _plan(state, config, qtype)
    for e in plan:
        nbytes = _stored_nbytes(e.shape, e.qtype)
        writer.add_tensor_info(e.name, e.shape, np.dtype(np.float32), nbytes, raw_dtype=e.qtype)

    def write(f: Any) -> None:
        # GGUFWriter opens what it is given (a path, or here a file descriptor) and closes it when done: it
        # gets a duplicate of the staged file's descriptor; atomic_write then syncs and renames the file.
        writer.open_output_file(os.dup(f.fileno()))
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for array in _arrays(plan, state, config):
                writer.write_tensor_data(array)
        finally:
            writer.close()

    atomic_write(out, write, mode="wb")
    return out


def _stored_nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * type_size


# ----- reading back -------------------------------------------------------------------------------------
def gguf_state_dict(path: str | os.PathLike, config: BambaConfig) -> dict[str, torch.Tensor]:
    """The tensors of a file written by `export_gguf`, dequantized to fp32, under their checkpoint names
    (Q/K rows back in Bamba's order, A_log = log(-A)); the tied head is absent as in the checkpoint's
    own state. `config` gives the shapes; a zero conv bias added for llama.cpp is dropped."""
    reader = gguf.GGUFReader(os.fspath(path))
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GRANITE_HYBRID, config.num_hidden_layers)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in BambaForCausalLM(config, init=False).state_dict().items()}
    by_gguf_name = {}
    for hf_name, shape in shapes.items():
        kind, name = _gguf_name(hf_name, tensor_map)
        by_gguf_name[name] = (hf_name, kind, shape)
    out = {}
    for rt in reader.tensors:
        if rt.name not in by_gguf_name:
            continue
        hf_name, kind, shape = by_gguf_name[rt.name]
        values = torch.from_numpy(np.array(gguf.quants.dequantize(rt.data, rt.tensor_type), dtype=np.float32))
        out[hf_name] = _from_gguf(kind, values, config, shape)
    return out
