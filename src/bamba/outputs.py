"""Model outputs: attribute access plus transformers 5's ModelOutput behaviour (index, key, iteration)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from .cache import HybridMambaAttentionDynamicCache as Cache


@dataclass
class ModelOutput:
    """The outputs' base: attributes, and transformers 5's ModelOutput behaviour (out[0], out["logits"],
    `in`, len, keys, get) over the fields that are set. transformers 5 keys the cache as "cache", with
    "past_key_values" as its other name: both names work here too (the field is `past_key_values`)."""

    _KEYS = {"past_key_values": "cache"}  # field name -> the key transformers 5 shows
    _FIELDS = {v: k for k, v in _KEYS.items()}  # and back

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            return getattr(self, self._FIELDS.get(key, key))
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def keys(self) -> list[str]:
        return [self._KEYS.get(f.name, f.name) for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return list(self.to_tuple())

    def items(self) -> list[tuple[str, Any]]:
        return list(zip(self.keys(), self.to_tuple()))

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._KEYS.get(key, key) in self.keys()

    @property
    def cache(self) -> Cache | None:  # transformers 5's name
        return getattr(self, "past_key_values", None)

    @cache.setter
    def cache(self, value: Cache | None) -> None:
        self.past_key_values = value


@dataclass
class BambaModelOutput(ModelOutput):
    last_hidden_state: Tensor
    past_key_values: Cache | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class CausalLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
