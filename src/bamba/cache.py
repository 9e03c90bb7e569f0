"""The hybrid cache: keys/values for attention layers, conv window + SSM state for Mamba layers.

State lives here, not in the modules: the model reads and writes it, generation and serving own it.
Key/value buffers grow by doubling and are written in place, so a decode step copies one token, not
the whole history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import BambaConfig


class HybridMambaAttentionDynamicCache:
    """Per-layer decoding state of a Bamba model.

    - attention layer i: `key_cache[i]`, `value_cache[i]`: (b, kv_heads, t, head_dim) views of the
      filled part of a larger buffer;
    - Mamba layer i: `conv_states[i]`: (b, d_conv - 1, conv_dim), the last inputs of the causal conv
      (channels last), and `ssm_states[i]`: (b, heads, d_head, d_state), always fp32.

    Buffers are created lazily by the first forward (so batch size, dtype and device come from the
    input) or eagerly when `batch_size` is given.
    """

    def __init__(
        self,
        config: BambaConfig,
        batch_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config
        self.layers_block_type = config.layers_block_type
        self.reset()
        if batch_size is not None:
            for i, kind in enumerate(self.layers_block_type):
                if kind == "mamba":
                    self.init_mamba_layer(i, batch_size, dtype, device)

    # ----- Mamba layers -----------------------------------------------------------------------------
    def init_mamba_layer(
        self, i: int, batch_size: int, dtype: torch.dtype, device: torch.device | str | None
    ) -> None:
        c = self.config
        self.conv_states[i] = torch.zeros(
            batch_size, c.mamba_d_conv - 1, c.mamba_conv_dim, dtype=dtype, device=device
        )
        self.ssm_states[i] = torch.zeros(
            batch_size, c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state, dtype=torch.float32, device=device
        )

    def has_mamba_state(self, i: int) -> bool:
        return self.ssm_states[i] is not None

    def set_mamba_state(self, i: int, conv_state: Tensor, ssm_state: Tensor) -> None:
        if self.ssm_states[i] is None:
            self.conv_states[i], self.ssm_states[i] = conv_state.clone(), ssm_state.float().clone()
        else:
            self.conv_states[i].copy_(conv_state)
            self.ssm_states[i].copy_(ssm_state)

    # ----- attention layers ---------------------------------------------------------------------------
    @property
    def key_cache(self) -> list[Tensor | None]:
        return [None if k is None else k[:, :, : self._kv_lens[i]] for i, k in enumerate(self._keys)]

    @property
    def value_cache(self) -> list[Tensor | None]:
        return [None if v is None else v[:, :, : self._kv_lens[i]] for i, v in enumerate(self._values)]

    def update_kv(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (b, kv_heads, t, head_dim) to layer i; return all keys and values so far."""
        start, t = self._kv_lens[i], k.shape[2]
        buf_k, buf_v = self._keys[i], self._values[i]
        if buf_k is None or start + t > buf_k.shape[2]:
            capacity = max(2 * (start + t), 64)
            new_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            self._keys[i], self._values[i] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start : start + t] = k
        buf_v[:, :, start : start + t] = v
        self._kv_lens[i] = start + t
        return buf_k[:, :, : start + t], buf_v[:, :, : start + t]

    # ----- whole cache ------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of tokens the cache holds (the same for every layer, attention or Mamba)."""
        return self.seen_tokens

    def advance(self, n: int) -> None:
        """Count n more tokens as held: called once per forward, after every layer has written them."""
        self.seen_tokens += n

    def __len__(self) -> int:
        return self.config.num_hidden_layers

    @property
    def batch_size(self) -> int | None:
        for t in (*self.ssm_states, *self._keys):
            if t is not None:
                return t.shape[0]
        return None

    def _map(self, fn) -> None:
        for lst in (self._keys, self._values, self.conv_states, self.ssm_states):
            for i, t in enumerate(lst):
                if t is not None:
                    lst[i] = fn(t)

    def reset(self) -> None:
        """Empty the cache (as transformers' `reset`): the next forward starts a new sequence."""
        n = self.config.num_hidden_layers
        self._keys: list[Tensor | None] = [None] * n
        self._values: list[Tensor | None] = [None] * n
        self.conv_states: list[Tensor | None] = [None] * n
        self.ssm_states: list[Tensor | None] = [None] * n
        self._kv_lens = [0] * n  # filled length of each attention layer's buffers
        self.seen_tokens = 0  # tokens consumed so far (the cache's sequence length)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Reorder (or repeat) the batch rows, e.g. for beam search: row j becomes old row beam_idx[j]."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def select_batch(self, keep: Tensor) -> None:
        """Keep only some rows (indices or a boolean mask), e.g. to drop finished sequences."""
        if keep.dtype == torch.bool:
            keep = keep.nonzero().squeeze(-1)
        self.reorder_cache(keep)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def to(self, device: torch.device | str) -> HybridMambaAttentionDynamicCache:
        """Move every tensor to `device` (devices only: the SSM states stay fp32)."""
        if isinstance(device, torch.dtype):
            raise TypeError(
                f"cache.to({device}): the cache moves between devices only; its SSM states stay fp32"
            )
        self._map(lambda t: t.to(device=device))
        return self

    # ----- rows of different lengths (continuous batching) -----------------------------------------------
    # Rows are right-aligned: every row's last token sits in the last column, and a row shorter than the
    # batch has masked padding columns on its left (the attention mask marks them; Mamba layers keep no
    # time axis, so their per-row state is unaffected).
    def row_state(self, row: int, length: int) -> RowState:
        """A copy of one row's state; `length`: its real tokens (the last `length` columns)."""
        t = self.seen_tokens

        def copy(lst: list[Tensor | None], i: int) -> Tensor | None:
            return None if lst[i] is None else lst[i][row].clone()

        n = len(self.layers_block_type)
        return RowState(
            conv=[copy(self.conv_states, i) for i in range(n)],
            ssm=[copy(self.ssm_states, i) for i in range(n)],
            keys=[None if k is None else k[row, :, t - length : t].clone() for k in self._keys],
            values=[None if v is None else v[row, :, t - length : t].clone() for v in self._values],
            length=length,
        )

    @classmethod
    def from_row_state(cls, config: BambaConfig, state: RowState) -> HybridMambaAttentionDynamicCache:
        """A one-row cache holding a copy of `state` (the state itself stays unchanged)."""
        cache = cls(config)
        for i in range(len(cache.layers_block_type)):
            if state.ssm[i] is not None:
                cache.conv_states[i], cache.ssm_states[i] = (
                    state.conv[i][None].clone(),
                    state.ssm[i][None].clone(),
                )
            if state.keys[i] is not None:
                cache.update_kv(i, state.keys[i][None], state.values[i][None])  # (1, kvh, t, hd) copies
        cache.seen_tokens = state.length
        return cache

    def extend_batch(self, other: HybridMambaAttentionDynamicCache) -> None:
        """Append `other`'s rows after this cache's rows. The shorter side gets padding columns on its
        left (zeros, which the caller's attention mask must mark as padding)."""
        if self.batch_size is None:  # empty: adopt the other's buffers
            self._keys, self._values = list(other._keys), list(other._values)
            self.conv_states, self.ssm_states = list(other.conv_states), list(other.ssm_states)
            self._kv_lens, self.seen_tokens = list(other._kv_lens), other.seen_tokens
            return
        width = max(self.seen_tokens, other.seen_tokens)
        for i, kind in enumerate(self.layers_block_type):
            if kind == "mamba":
                self.conv_states[i] = torch.cat([self.conv_states[i], other.conv_states[i]])
                self.ssm_states[i] = torch.cat([self.ssm_states[i], other.ssm_states[i]])
            elif self._keys[i] is not None:
                keys = [_left_pad(c.key_cache[i], width) for c in (self, other)]  # (b_c, kvh, width, hd)
                values = [_left_pad(c.value_cache[i], width) for c in (self, other)]
                self._keys[i], self._values[i] = _with_room(torch.cat(keys)), _with_room(torch.cat(values))
                self._kv_lens[i] = width
        self.seen_tokens = width

    def drop_leading(self, n: int) -> None:
        """Remove the first `n` columns (padding of every row) from the attention layers."""
        if n <= 0:
            return
        for i, k in enumerate(self._keys):
            if k is not None:
                self._keys[i] = self._keys[i][:, :, n:]
                self._values[i] = self._values[i][:, :, n:]
                self._kv_lens[i] -= n
        self.seen_tokens -= n


@dataclass
class RowState:
    """What a prefix of tokens leaves in every layer of one row: conv window (d_conv - 1, conv_dim) and
    fp32 SSM state (h, p, n) for Mamba layers, keys/values (kvh, length, hd) for attention layers."""

    conv: list[Tensor | None]
    ssm: list[Tensor | None]
    keys: list[Tensor | None]
    values: list[Tensor | None]
    length: int

    @property
    def nbytes(self) -> int:
        tensors = [t for lst in (self.conv, self.ssm, self.keys, self.values) for t in lst if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def _left_pad(x: Tensor, width: int) -> Tensor:
    """x (b, kvh, t, hd) with zero columns on the left up to `width` columns."""
    return F.pad(x, (0, 0, width - x.shape[2], 0))


def _with_room(x: Tensor) -> Tensor:
    """A buffer (b, kvh, 2 * t + 64, hd) whose first t columns are x: decoding appends in place."""
    buf = x.new_empty(x.shape[0], x.shape[1], 2 * x.shape[2] + 64, x.shape[3])
    buf[:, :, : x.shape[2]] = x
    return buf
