"""Model and generate outputs, with transformers 5's ModelOutput behaviour (index, key, iteration)."""

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


@dataclass
class GenerateOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)`: as transformers' GenerateDecoderOnlyOutput.

    sequences: (b * num_return_sequences, prompt + new) ids. scores (with output_scores=True) and logits
    (output_logits=True): one (b * num_return_sequences, vocab) fp32 tensor per generated token: the scores
    after the logits processors (penalties, bans, and when sampling temperature / top-k / top-p / min-p),
    and the model's raw logits. Beam search returns a `GenerateBeamOutput`.
    """

    sequences: Tensor
    scores: tuple[Tensor, ...] | None = None
    logits: tuple[Tensor, ...] | None = None


@dataclass
class GenerateBeamOutput(ModelOutput):
    """`generate(..., num_beams=k, return_dict_in_generate=True)`: as transformers'
    GenerateBeamDecoderOnlyOutput (same fields in the same order).

    sequences: (b * num_return_sequences, prompt + new) ids; sequences_scores (with output_scores=True):
    (b * num_return_sequences,) the hypotheses' length-penalized sums of log-probabilities; scores
    (output_scores=True) and logits (output_logits=True): one (b * k, vocab) fp32 tensor per step, the
    processed log-probabilities and the raw logits of every beam; beam_indices: (b * num_return_sequences,
    new) int32, the flat beam (prompt * k + beam) each token was chosen from.
    """

    sequences: Tensor
    sequences_scores: Tensor | None = None
    scores: tuple[Tensor, ...] | None = None
    logits: tuple[Tensor, ...] | None = None
    beam_indices: Tensor | None = None
