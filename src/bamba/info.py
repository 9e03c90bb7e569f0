"""`bamba info MODEL`: parameters, layer layout and memory needs of a checkpoint, without loading weights."""

from __future__ import annotations

from typing import Any

import torch

from .checkpoint import (
    check_config_against_headers,
    prepare_quantized_modules,
    read_config,
    read_headers,
    read_quantization_config,
)
from .demo import demo_path
from .hub import resolve_folder
from .memory import float_dtype_of, load_needs, predicted_peak_rss
from .model import BambaForCausalLM


def model_info(model: str | None = None) -> dict[str, Any]:
    """Read config.json and the safetensors headers only (built on `meta`: no weights in memory)."""
    folder = resolve_folder(model) if model is not None else demo_path()
    config = read_config(folder)
    files = read_headers(folder)
    check_config_against_headers(config, files, folder)  # (before a module is built)
    with torch.device("meta"):
        lm = BambaForCausalLM(config, init=False)
    n_params = lm.num_parameters()
    quantization = read_quantization_config(folder)
    stored = 0
    dtypes = set()
    for st in files:
        for name in st.keys():
            dtype, shape, start, end = st.entries[name]
            stored += end - start
            dtypes.add(dtype)
    c = config
    state_per_row = sum(
        (c.mamba_d_conv - 1) * c.mamba_conv_dim * 4 + c.mamba_n_heads * c.mamba_d_head * c.mamba_d_state * 4
        for kind in c.layers_block_type
        if kind == "mamba"
    )
    kv_per_token = (
        2 * c.num_key_value_heads * c.attention_head_dim * 4 * c.layers_block_type.count("attention")
    )
    return {
        "folder": folder,
        "parameters": n_params,
        "stored_bytes": stored,
        "stored_dtypes": sorted(str(d).removeprefix("torch.") for d in dtypes),
        "layers": c.num_hidden_layers,
        "layout": "".join("A" if k == "attention" else "M" for k in c.layers_block_type),
        "attention_layers": c.attn_layer_indices or [],
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "mamba": f"{c.mamba_n_heads} heads x {c.mamba_d_head}, d_state {c.mamba_d_state}, {c.mamba_n_groups} group(s)",
        "attention": f"{c.num_attention_heads} heads / {c.num_key_value_heads} kv heads x {c.attention_head_dim}",
        "weights_fp32_bytes": n_params * 4,
        "weights_bf16_bytes": n_params * 2,
        "mamba_state_bytes_per_sequence_fp32": state_per_row,
        "kv_cache_bytes_per_token_fp32": kv_per_token,
        "max_position_embeddings": c.max_position_embeddings,
        "quantization": quantization,  # that of a model saved quantized, or None
        "predicted_peak_rss": _predicted_peak_rss(lm, folder, quantization, float_dtype_of(dtypes)),
    }


def _predicted_peak_rss(
    lm: BambaForCausalLM, folder: str, quantization: dict | None, stored: torch.dtype
) -> dict[str, int]:
    """`bamba.memory`'s peak RSS of loading (`from_pretrained(folder, quantization=...)`, floats as stored)
    and generating at batch 1: as stored, and quantized to int8 / int4 while loading (not for a folder
    saved quantized, which loads as it is)."""
    if quantization is not None:
        prepare_quantized_modules(lm, folder, "model.")  # as from_pretrained: errors name the file
        return {"as stored": predicted_peak_rss(load_needs(lm, stored))}
    settings = {"as stored": None, "int8": "int8_weight_only", "int4": "int4_weight_only"}
    return {name: predicted_peak_rss(load_needs(lm, stored, None, q)) for name, q in settings.items()}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def format_info(info: dict[str, Any]) -> str:
    """`model_info`'s figures as the lines `bamba info` prints."""
    dtypes = ", ".join(info["stored_dtypes"])
    lines = [
        f"model        {info['folder']}",
        f"parameters   {info['parameters']:,} ({dtypes} on disk: {_gib(info['stored_bytes'])})",
        f"layers       {info['layers']}: {info['layout']}  (M = Mamba-2, A = attention at "
        f"{info['attention_layers']})",
        f"hidden       {info['hidden_size']}, vocab {info['vocab_size']}, context "
        f"{info['max_position_embeddings']}",
        f"mamba        {info['mamba']}",
        f"attention    {info['attention']}",
        f"weights      {_gib(info['weights_fp32_bytes'])} fp32, {_gib(info['weights_bf16_bytes'])} bf16",
    ]
    if quant := info["quantization"]:
        group = f", group {quant['group_size']}" if quant.get("group_size") else ""
        n = len(quant.get("modules", []))
        lines.append(f"quantized    {quant.get('format')}{group}: {n} Linear layers")
    lines.append(
        f"cache        {_gib(info['mamba_state_bytes_per_sequence_fp32'])} Mamba state per sequence + "
        f"{info['kv_cache_bytes_per_token_fp32'] / 1024:.1f} KiB KV per token (fp32)"
    )
    peaks = ", ".join(f"{_gib(n)} {name}" for name, n in info["predicted_peak_rss"].items())
    lines.append(f"memory       peak RSS to load and generate (batch 1): {peaks}")
    return "\n".join(lines)
