"""BambaConfig: one flat dataclass whose field names and defaults are those of Hugging Face's config.json.

Derived values (mamba intermediate size, resolved head dims, per-layer block types, rotary dims) are
computed in one place, `__post_init__`, and validated there. Unknown keys read from a config.json are kept
in `extra` and written back, so a round trip loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .files import read_json_file
from .hub import resolve_file

_INF = float("inf")


@dataclass
class BambaConfig:
    vocab_size: int = 128000
    tie_word_embeddings: bool = False
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    # Attention head size; None (the default, and what transformers' BambaConfig writes): hidden_size /
    # num_attention_heads. A config.json that sets it is honoured, as transformers' attention does.
    head_dim: int | None = None
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    num_logits_to_keep: int | None = 1
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    max_position_embeddings: int = 262144
    attention_dropout: float = 0.0
    attn_layer_indices: list[int] | None = None
    mamba_n_heads: int = 128
    mamba_d_head: int | str = "auto"
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_limit: tuple[float, float] | None = (0.0, _INF)
    z_loss_coefficient: float = 0.0
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    attention_bias: bool = False
    mlp_bias: bool = False
    # Keys of a config.json that this class does not model (kept verbatim for the round trip).
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    model_type = "bamba"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _check_types(self)
        if self.time_step_limit is not None:
            self.time_step_limit = tuple(float(v) for v in self.time_step_limit)
        if self.attn_layer_indices is not None:
            self.attn_layer_indices = sorted(self.attn_layer_indices)
        _check_positive(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "max_position_embeddings",
        )
        _check_positive(self, "num_attention_heads", "num_key_value_heads", "mamba_n_heads", "mamba_n_groups")
        _check_positive(self, "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_chunk_size")
        if self.mamba_d_head == "auto":
            self.mamba_d_head = self.mamba_intermediate_size // self.mamba_n_heads
        self.validate()

    # ----- derived values -------------------------------------------------------------------------
    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_conv_dim(self) -> int:
        """Channels of the causal conv: x plus B and C of every group."""
        return self.mamba_intermediate_size + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def mamba_in_proj_size(self) -> int:
        """in_proj output: [z (gate) | xBC | dt]."""
        return self.mamba_intermediate_size + self.mamba_conv_dim + self.mamba_n_heads

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.attention_head_dim * self.partial_rotary_factor)

    @property
    def layers_block_type(self) -> list[str]:
        attn = set(self.attn_layer_indices or ())
        return ["attention" if i in attn else "mamba" for i in range(self.num_hidden_layers)]

    # ----- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"BambaConfig.{name}={getattr(self, name)!r} is invalid: {rule}")

        if self.head_dim is not None and not 0 < self.head_dim <= MAX_SIZE:
            raise bad(
                "head_dim",
                f"must be a positive integer <= {MAX_SIZE} (or null: hidden_size / num_attention_heads)",
            )
        _check_numbers(self, bad)
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise bad(
                "num_attention_heads", f"must divide hidden_size ({self.hidden_size}) unless head_dim is set"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", f"must divide num_attention_heads ({self.num_attention_heads})")
        if self.mamba_intermediate_size % self.mamba_n_heads:
            raise bad(
                "mamba_n_heads", f"must divide mamba_expand * hidden_size ({self.mamba_intermediate_size})"
            )
        if (
            not _is_int(self.mamba_d_head)
            or self.mamba_d_head * self.mamba_n_heads != self.mamba_intermediate_size
        ):
            raise bad(
                "mamba_d_head",
                f"mamba_d_head * mamba_n_heads ({self.mamba_n_heads}) must equal mamba_expand * hidden_size "
                f"({self.mamba_intermediate_size})",
            )
        if self.mamba_n_heads % self.mamba_n_groups:
            raise bad("mamba_n_groups", f"must divide mamba_n_heads ({self.mamba_n_heads})")
        if self.mamba_intermediate_size % self.mamba_n_groups:
            raise bad(
                "mamba_n_groups", f"must divide mamba_expand * hidden_size ({self.mamba_intermediate_size})"
            )
        for i in self.attn_layer_indices or ():
            if not 0 <= i < self.num_hidden_layers:
                raise bad(
                    "attn_layer_indices",
                    f"index {i} is outside [0, num_hidden_layers={self.num_hidden_layers})",
                )
        if len(set(self.attn_layer_indices or ())) != len(self.attn_layer_indices or ()):
            raise bad("attn_layer_indices", "indices must be unique")
        # An odd rotary_dim rotates rotary_dim + 1 dims (its frequencies still over rotary_dim), as in
        # transformers: they must fit in the head.
        if (
            not 0.0 < self.partial_rotary_factor <= 1.0
            or self.rotary_dim + self.rotary_dim % 2 > self.attention_head_dim
        ):
            raise bad(
                "partial_rotary_factor",
                f"must be in (0, 1], with the rotated dims ({self.rotary_dim}, rounded up to even) within "
                f"the head ({self.attention_head_dim})",
            )
        if self.hidden_act != "silu":
            raise bad("hidden_act", "only 'silu' is supported (the activation of every released Bamba)")
        if self.time_step_limit is not None:
            lo, hi = self.time_step_limit
            if len(self.time_step_limit) != 2 or math.isnan(lo) or math.isnan(hi) or lo > hi or lo < 0:
                raise bad("time_step_limit", "must be (min, max) with 0 <= min <= max")

    # ----- config.json I/O --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config.json content, as transformers 5 writes it (rope as `rope_parameters`)."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_theta", "partial_rotary_factor"):
                continue
            if f.name == "head_dim" and self.head_dim is None:  # derived: written as transformers does
                continue
            out[f.name] = getattr(self, f.name)
        if self.time_step_limit is not None:  # inf is written as transformers writes it
            out["time_step_limit"] = [
                v if math.isfinite(v) else {"__float__": str(v).replace("inf", "Infinity")}
                for v in self.time_step_limit
            ]
        out["rope_parameters"] = {
            **dict(self.extra.get("rope_parameters") or {}),
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
        }
        out["model_type"] = self.model_type
        out.setdefault("architectures", ["BambaForCausalLM"])
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> BambaConfig:
        data = dict(data)
        model_type = data.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"{source}: model_type is {model_type!r}, expected 'bamba'")
        rope = data.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: rope_parameters={rope!r} is invalid: must be a JSON object or null")
        if rope.get("rope_type", "default") != "default":
            raise ValueError(
                f"{source}: rope_parameters.rope_type={rope['rope_type']!r}; only 'default' is supported"
            )
        if "rope_theta" in rope:
            data.setdefault("rope_theta", rope["rope_theta"])
        if "partial_rotary_factor" in rope:
            data.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        limit = data.get("time_step_limit")
        if isinstance(limit, (list, tuple)):
            data["time_step_limit"] = tuple(_decode_float(v) for v in limit)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "model_type"}
        try:
            return cls(**kwargs, extra=extra)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}") from None

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> BambaConfig:
        data = read_json_file(os.fspath(path))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> BambaConfig:
        return cls.from_json_file(resolve_file(path_or_repo_id, "config.json", **hub_kwargs))

    def replace(self, **changes: Any) -> BambaConfig:
        """A copy with some fields changed (derived values recomputed)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if {"hidden_size", "mamba_n_heads", "mamba_expand"} & changes.keys():
            values["mamba_d_head"] = "auto"  # re-derive unless given explicitly below
        values.update(changes)
        values["extra"] = dict(self.extra)
        return BambaConfig(**values)


_BOOL_FIELDS = (
    "tie_word_embeddings",
    "use_cache",
    "mamba_conv_bias",
    "mamba_proj_bias",
    "attention_bias",
    "mlp_bias",
)
_FLOAT_FIELDS = (
    "initializer_range",
    "rms_norm_eps",
    "attention_dropout",
    "time_step_min",
    "time_step_max",
    "z_loss_coefficient",
    "rope_theta",
    "partial_rotary_factor",
)
_OPTIONAL_INT_FIELDS = ("pad_token_id", "bos_token_id", "num_logits_to_keep", "head_dim")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_token_ids(value: Any) -> bool:
    """Is `value` what an eos_token_id field may hold: an integer, a list of integers, or None?"""
    return value is None or _is_int(value) or (isinstance(value, (list, tuple)) and all(map(_is_int, value)))


def _check_types(cfg: BambaConfig) -> None:
    """JSON types of the fields (a string "false" would otherwise count as true)."""

    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"BambaConfig.{name}={getattr(cfg, name)!r} is invalid: must be {expected}")

    for name in _BOOL_FIELDS:
        if not isinstance(getattr(cfg, name), bool):
            raise bad(name, "true or false")
    for name in _FLOAT_FIELDS:
        value = getattr(cfg, name)
        if not (_is_int(value) or isinstance(value, float)):
            raise bad(name, "a number")
        setattr(cfg, name, float(value))  # written as a float: transformers rejects 0 where 0.0 is due
    for name in _OPTIONAL_INT_FIELDS:
        value = getattr(cfg, name)
        if value is not None and not _is_int(value):
            raise bad(name, "an integer or null")
    if not is_token_ids(cfg.eos_token_id):
        raise bad("eos_token_id", "an integer, a list of integers, or null")
    indices = cfg.attn_layer_indices
    if indices is not None and not (isinstance(indices, (list, tuple)) and all(map(_is_int, indices))):
        raise bad("attn_layer_indices", "a list of integers or null")
    limit = cfg.time_step_limit
    if limit is not None and not (
        isinstance(limit, (list, tuple))
        and len(limit) == 2
        and all(_is_int(v) or isinstance(v, float) for v in limit)
    ):
        raise bad("time_step_limit", "[min, max] (two numbers) or null")


# Upper bounds of the sizes: far above any real model's, low enough that no weight's element count can
# overflow int64 (the largest, hidden_size x in_proj, stays below 2**62).
MAX_SIZE = 2**20
_MAX_SIZES = {"vocab_size": 2**31 - 1, "max_position_embeddings": 2**31 - 1, "mamba_expand": 2**8}


# float fields: what each must be (every one finite)
_FLOAT_RULES = {
    "rms_norm_eps": (lambda v: v >= 0, ">= 0"),
    "initializer_range": (lambda v: v >= 0, ">= 0"),
    "attention_dropout": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "time_step_min": (lambda v: v >= 0, ">= 0"),
    "time_step_max": (lambda v: v >= 0, ">= 0"),
    "z_loss_coefficient": (lambda v: v >= 0, ">= 0"),
    "rope_theta": (lambda v: v > 0, "> 0"),
}


def _check_numbers(cfg: BambaConfig, bad: Any) -> None:
    """Finite floats in their ranges, and token ids an embedding of vocab_size rows takes."""
    for name, (ok, rule) in _FLOAT_RULES.items():
        value = getattr(cfg, name)
        if not (math.isfinite(value) and ok(value)):
            raise bad(name, f"must be a finite number {rule}")
    if cfg.time_step_min > cfg.time_step_max:
        raise bad("time_step_min", f"must be <= time_step_max ({cfg.time_step_max})")
    pad = cfg.pad_token_id
    if pad is not None and not -cfg.vocab_size <= pad < cfg.vocab_size:
        raise bad("pad_token_id", f"must be a token id in [0, vocab_size={cfg.vocab_size}) (or null)")
    if cfg.num_logits_to_keep is not None and cfg.num_logits_to_keep < 0:
        raise bad("num_logits_to_keep", "must be >= 0 (or null)")


def _check_positive(cfg: BambaConfig, *names: str) -> None:
    for name in names:
        value, most = getattr(cfg, name), _MAX_SIZES.get(name, MAX_SIZE)
        if not _is_int(value) or not 0 < value <= most:
            raise ValueError(
                f"BambaConfig.{name}={value!r} is invalid: must be a positive integer (<= {most})"
            )


def _decode_float(value: Any) -> Any:
    """transformers writes inf as {"__float__": "Infinity"} (older writers use the bare Infinity token);
    anything else is returned as it is, for the type check to name."""
    if isinstance(value, dict) and isinstance(value.get("__float__"), str):
        try:
            return float(value["__float__"])
        except ValueError:
            return value
    return value


# ----- presets (plain data) ---------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # The exact shapes of ibm-ai-platform/Bamba-9B.
    "bamba-9b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        attn_layer_indices=[9, 18, 27],
        mamba_n_heads=128,
        mamba_d_head=64,
        mamba_n_groups=1,
        mamba_d_state=128,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=256,
    ),
    # Bamba-shaped, scaled down for CPU benchmarks (about 337M parameters).
    "bench-small": dict(
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        attn_layer_indices=[4, 9, 13],
        mamba_n_heads=32,
        mamba_d_head=64,
        mamba_n_groups=1,
        mamba_d_state=128,
        mamba_expand=2,
        mamba_chunk_size=256,
    ),
    # The embedded demo model's shape.
    "demo": dict(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_indices=[3],
        mamba_n_heads=8,
        mamba_d_head=64,
        mamba_n_groups=1,
        mamba_d_state=32,
        mamba_expand=2,
        mamba_chunk_size=64,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    ),
}


def preset(name: str, **overrides: Any) -> BambaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return BambaConfig(**{**PRESETS[name], **overrides})
