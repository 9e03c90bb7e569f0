"""BambaModel.forward's inputs, checked and prepared in one place: embeddings, the cache, padding, packed
sequences, positions, rotary angles and the attention layers' mask (`prepare_inputs` -> `ForwardInputs`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import HybridMambaAttentionDynamicCache as Cache
from .config import BambaConfig
from .linear import needs_grad


@dataclass
class AttentionMask:
    """How attention layers mask: `mask` (b|1, 1, q, k) bool (True = attend) or None with `is_causal`."""

    mask: Tensor | None
    is_causal: bool


@dataclass
class ForwardInputs:
    """What BambaModel.forward's layers take, derived from its arguments by `prepare_inputs`."""

    x: Tensor  # (b, l, d): the input embeddings
    cache: Cache | None  # read and filled by the layers; None: no cache
    past: int  # tokens the cache held before this input
    checkpointing: bool  # recompute each layer in the backward pass
    seq_idx: Tensor | None = None  # (b, l) packed sequence ids; None: each row is one sequence
    prefill_chunk: int | None = None  # set: x goes through the cache in pieces of this size (no masks below)
    rope: tuple[Tensor, Tensor] | None = None  # cos, sin (b|1, l, rotary_dim); None without attention layers
    attn_mask: AttentionMask | None = None  # None without attention layers
    pad_mask: Tensor | None = None  # (b, l) bool, False at padding, for the Mamba layers (prompts only)


def prepare_inputs(
    model: nn.Module,
    input_ids: Tensor | None,
    inputs_embeds: Tensor | None,
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    cache: Cache | None,
    use_cache: bool | None,
    seq_idx: Tensor | None,
    cu_seq_lens: tuple[Tensor | None, Tensor | None],
    prefill_chunk: int | None,
) -> ForwardInputs:
    """BambaModel.forward's arguments checked (each error names the argument, what was expected and what
    was found) and turned into its layers' inputs. `model` is the BambaModel (config, embeddings, training
    mode, checkpointing); `prefill_chunk`: a longer prompt that only fills the cache goes through it in
    pieces of this many tokens (None: never)."""
    cfg = model.config
    x = embed_inputs(model.embed_tokens, input_ids, inputs_embeds, cfg)  # (b, l, d)
    b, l, _ = x.shape
    position_ids = check_position_ids(position_ids, b, l, x.device)  # (b|1, l) or None
    checkpointing = model.gradient_checkpointing and model.training and torch.is_grad_enabled()
    implicit_cache = use_cache is None and cache is None  # (made here, by default)
    cache = choose_cache(cfg, cache, use_cache, checkpointing, model.training, b)
    past = cache.get_seq_length() if cache is not None else 0
    key_mask = padding_mask(attention_mask, b, l, past)  # (b, past + l) or None
    seq_idx = packed_seq_idx(
        b, l, x.device, seq_idx, same_cu_seq_lens(*cu_seq_lens), position_ids if key_mask is None else None
    )
    if seq_idx is not None:
        check_packed_cache(cache, past, implicit_cache)
        cache = None  # the default cache: none for packed input
    inp = ForwardInputs(x, cache, past, checkpointing, seq_idx)
    if (
        prefill_chunk
        and l > prefill_chunk
        and cache is not None
        and key_mask is None
        and position_ids is None
        and seq_idx is None
        and not needs_grad(x, *model.parameters())
    ):  # (a backward pass would need the states that each piece overwrites)
        inp.prefill_chunk = prefill_chunk
        return inp
    if position_ids is None:
        position_ids = default_positions(b, l, past, key_mask, seq_idx, x.device)
    if "attention" in cfg.layers_block_type:
        inp.rope = rotary_cos_sin(position_ids, cfg, x.dtype)
        inp.attn_mask = build_attention_mask(b, l, past, key_mask, seq_idx, x.device)
    inp.pad_mask = key_mask[:, -l:] if key_mask is not None and l > 1 else None
    return inp


# ----- the arguments, one at a time -------------------------------------------------------------------------
def embed_inputs(
    embed_tokens: nn.Embedding, input_ids: Tensor | None, inputs_embeds: Tensor | None, cfg: BambaConfig
) -> Tensor:
    """The input embeddings (b, l, d): input_ids looked up, or inputs_embeds checked."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        inputs_embeds = embed_tokens(check_token_ids(input_ids, cfg.vocab_size))
    x = inputs_embeds  # (b, l, d)
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != cfg.hidden_size:
        raise ValueError(
            f"inputs_embeds must be a (batch, length, hidden_size={cfg.hidden_size}) tensor, found "
            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    weight_dtype = embed_tokens.weight.dtype
    narrower = weight_dtype in (torch.float32, torch.float64) and x.itemsize < weight_dtype.itemsize
    if not x.is_floating_point() or not (x.dtype == weight_dtype or narrower):
        # (narrower floats into fp32 weights are fine: the norms compute in fp32, as in transformers)
        raise ValueError(
            f"inputs_embeds has dtype {x.dtype}; expected floating point no wider than the model's "
            f"weights ({weight_dtype})"
        )
    if x.shape[1] == 0:
        raise ValueError("input has sequence length 0")
    return x


def check_token_ids(input_ids: Tensor, vocab_size: int) -> Tensor:
    """input_ids checked (an integer tensor (b, l) of ids in the vocabulary), as int64 or int32 (the types
    the embedding takes; narrower integer types are widened)."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch tensor (batch, length), found {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"input_ids must be an integer tensor, found dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, length), found shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        input_ids = input_ids.long()
    if input_ids.numel() == 0:
        return input_ids
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids contain token id {bad}, outside the vocabulary [0, {vocab_size})")
    return input_ids


def check_position_ids(position_ids: Tensor | None, b: int, l: int, device: torch.device) -> Tensor | None:
    """position_ids (b or 1, l), or (l,), as a (b|1, l) tensor on `device`; None stays None."""
    if position_ids is None:
        return None
    position_ids = torch.as_tensor(position_ids, device=device)
    rows_ok = position_ids.dim() == 1 or (position_ids.dim() == 2 and position_ids.shape[0] in (1, b))
    if not rows_ok or position_ids.shape[-1] != l:
        raise ValueError(
            f"position_ids must be (batch={b} or 1, length={l}), found shape {tuple(position_ids.shape)}"
        )
    return position_ids.view(-1, l)  # (b|1, l)


def choose_cache(
    cfg: BambaConfig, cache: Cache | None, use_cache: bool | None, checkpointing: bool, training: bool, b: int
) -> Cache | None:
    """The cache this forward reads and fills: the one given, else a new one when `use_cache` (by default:
    config.use_cache outside training and gradient checkpointing), else None."""
    if checkpointing and cache is not None:
        raise ValueError(
            "gradient checkpointing recomputes the layers, which would write past_key_values twice: "
            "train without a cache, or turn checkpointing off (gradient_checkpointing_disable)"
        )
    if checkpointing:  # as transformers: no cache when checkpointing
        use_cache = False
    elif use_cache is None:
        use_cache = cfg.use_cache and not training
    if use_cache and cache is None:
        cache = Cache(cfg)
    if cache is not None and cache.batch_size not in (None, b):
        raise ValueError(f"past_key_values holds {cache.batch_size} rows; the input has batch size {b}")
    return cache


def padding_mask(attention_mask: Tensor | None, b: int, l: int, past: int) -> Tensor | None:
    """The 2-D attention_mask (b, l) or (b, past + l), 1 for tokens and 0 for padding, as a bool mask over
    past + current tokens (b, past + l); None when nothing is padding."""
    if attention_mask is None:
        return None
    if (
        attention_mask.dim() != 2
        or attention_mask.shape[0] != b
        or attention_mask.shape[1] not in (l, past + l)
    ):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch={b}, past+current="
            f"{past + l}) (2-D, 1 for tokens, 0 for padding)"
        )
    mask = attention_mask.bool()
    if mask.shape[1] == l and past > 0:  # only the new tokens given: the past was real
        mask = torch.cat([mask.new_ones(b, past), mask], dim=1)
    return None if bool(mask.all()) else mask


# ----- packed sequences ----------------------------------------------------------------------------------
def same_cu_seq_lens(cu_seq_lens_q: Tensor | None, cu_seq_lens_k: Tensor | None) -> Tensor | None:
    """The packed boundaries given as cu_seq_lens_q and/or cu_seq_lens_k (self-attention: one and the same)."""
    if (
        cu_seq_lens_q is not None
        and cu_seq_lens_k is not None
        and not torch.equal(cu_seq_lens_q, cu_seq_lens_k)
    ):
        raise ValueError(
            "cu_seq_lens_q and cu_seq_lens_k differ; self-attention over packed input needs them equal"
        )
    return cu_seq_lens_q if cu_seq_lens_q is not None else cu_seq_lens_k


def check_packed_cache(cache: Cache | None, past: int, implicit_cache: bool) -> None:
    """Packed input takes no cache: refuse one that is given (only the one made by default is dropped)."""
    if past > 0:
        raise ValueError(
            "packed input (seq_idx / cu_seq_lens / restarting position_ids) cannot continue a cache"
        )
    if cache is not None and not implicit_cache:
        raise ValueError(
            "packed input (seq_idx / cu_seq_lens / restarting position_ids) cannot fill a cache: it "
            "would hold every packed sequence's keys and a conv window across them; pass "
            "use_cache=False"
        )


def packed_seq_idx(
    b: int,
    l: int,
    device: torch.device,
    seq_idx: Tensor | None,
    cu_seq_lens: Tensor | None,
    position_ids: Tensor | None,
) -> Tensor | None:
    """Sequence ids (b, l) of packed input, or None when every row is one sequence.

    From `cu_seq_lens` (cumulative lengths over the flattened b*l tokens), else `seq_idx`, else from
    `position_ids`: a new sequence starts wherever the position does not follow its predecessor.
    """
    if seq_idx is not None:
        seq_idx = check_seq_idx(seq_idx, b, l, device)
    if cu_seq_lens is not None:
        from_cu = seq_idx_from_cu_seq_lens(cu_seq_lens, b, l, device)
        if seq_idx is not None and not torch.equal(_changes(seq_idx), _changes(from_cu)):
            raise ValueError("seq_idx and cu_seq_lens give different sequence boundaries; pass one of them")
        seq_idx = from_cu
    breaks = None  # (b, l-1): where the positions do not follow on from their predecessor
    if position_ids is not None and l > 1:
        pos = position_ids.to(device).expand(b, l)
        breaks = pos[:, 1:] != pos[:, :-1] + 1
    if seq_idx is not None:
        jumps = breaks & ~_changes(seq_idx) if breaks is not None else None  # inside one sequence
        if jumps is not None and bool(jumps.any()):
            r, i = (int(v) for v in jumps.nonzero()[0])
            raise ValueError(
                f"position_ids jump from {int(pos[r, i])} to {int(pos[r, i + 1])} at row {r}, token {i + 1}, "
                "inside a sequence that seq_idx / cu_seq_lens mark as one; they must agree on where sequences "
                "start (or pass only one of them)"
            )
    elif breaks is None or not bool(breaks.any()):
        return None
    else:
        seq_idx = F.pad(breaks.long(), (1, 0)).cumsum(-1)  # (b, l)
    if not bool(_changes(seq_idx).any()):
        return None
    return seq_idx


def check_seq_idx(seq_idx: Tensor, b: int, l: int, device: torch.device) -> Tensor:
    """seq_idx checked: integer (b, l), non-decreasing along each row."""
    seq_idx = torch.as_tensor(seq_idx, device=device)
    if seq_idx.shape != (b, l) or seq_idx.is_floating_point() or seq_idx.is_complex():
        raise ValueError(
            f"seq_idx must be an integer tensor of shape {(b, l)}, found {seq_idx.dtype} {tuple(seq_idx.shape)}"
        )
    if bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError(
            "seq_idx must be non-decreasing along each row (one id per packed sequence, in order); "
            "an id that comes back would join two sequences"
        )
    return seq_idx


def seq_idx_from_cu_seq_lens(cu_seq_lens: Tensor, b: int, l: int, device: torch.device) -> Tensor:
    """Sequence ids (b, l) from cumulative lengths over the flattened b*l tokens, each row starting one."""
    cu = torch.as_tensor(cu_seq_lens, device=device).to(torch.long).flatten()
    if cu.numel() < 2 or cu[0] != 0 or cu[-1] != b * l or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"cu_seq_lens must rise from 0 to batch*length={b * l}, found {cu.tolist()[:8]}"
            + (f"...{cu[-1].item()}" if cu.numel() > 8 else "")
        )
    rows_cut = ~torch.isin(torch.arange(1, b, device=device) * l, cu)
    if bool(rows_cut.any()):
        raise ValueError(
            f"cu_seq_lens {cu.tolist()[:8]} has a sequence running across rows of length {l}; each row "
            "must start a sequence (pack each row on its own)"
        )
    starts = torch.zeros(b * l, dtype=torch.long, device=device)
    starts[cu[1:-1]] = 1
    return starts.cumsum(0).view(b, l)  # (b*l,) -> (b, l)


def _changes(seq_idx: Tensor) -> Tensor:
    """Where a new sequence starts within each row: (b, l) -> (b, l-1) bool."""
    return seq_idx[:, 1:] != seq_idx[:, :-1]


# ----- positions and masks ---------------------------------------------------------------------------------
def default_positions(
    b: int, l: int, past: int, key_mask: Tensor | None, seq_idx: Tensor | None, device: torch.device
) -> Tensor:
    """Positions (b|1, l) when none are given: counted over real tokens (left padding), restarting at each
    packed sequence, or past .. past + l - 1."""
    if key_mask is not None:
        return (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -l:]  # (b, l)
    if seq_idx is not None:
        return positions_from_seq_idx(seq_idx)
    return torch.arange(past, past + l, device=device)[None].expand(b, l)


def positions_from_seq_idx(seq_idx: Tensor) -> Tensor:
    """Positions restarting at 0 at each new sequence. (b, l) -> (b, l)"""
    b, l = seq_idx.shape
    idx = torch.arange(l, device=seq_idx.device).expand(b, l)
    starts = F.pad(_changes(seq_idx), (1, 0), value=True)  # (b, l)
    start_pos = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
    return idx - start_pos


def rotary_cos_sin(position_ids: Tensor, config: BambaConfig, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (b, l, rotary_dim) for the half-split rotation of the first `rotary_dim` dims."""
    rd = config.rotary_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.float32, device=position_ids.device) / rd)
    )
    freqs = position_ids[..., None].float() * inv_freq  # (b, l, rd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (b, l, rd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def build_attention_mask(
    b: int, l: int, past: int, key_mask: Tensor | None, seq_idx: Tensor | None, device: torch.device
) -> AttentionMask:
    """The attention layers' mask for l new tokens after `past` cached ones.

    key_mask: (b, past + l) bool, False at padding; seq_idx: (b, l) packed ids (then past == 0).
    A query always sees itself, so no row is fully masked (padded queries would otherwise give NaN).
    """
    if key_mask is None and seq_idx is None:
        if l == 1 or past == 0:
            return AttentionMask(None, is_causal=l > 1)
    q_pos = torch.arange(past, past + l, device=device)[:, None]  # (l, 1)
    k_pos = torch.arange(past + l, device=device)[None, :]  # (1, past+l)
    mask = (k_pos <= q_pos)[None]  # (1, l, past+l)
    if seq_idx is not None:
        mask = mask & (seq_idx[:, :, None] == seq_idx[:, None, :])  # (b, l, l)
    if key_mask is not None:
        mask = (mask & key_mask[:, None, :]) | (k_pos == q_pos)[None]  # (b, l, past+l)
    return AttentionMask(mask[:, None], is_causal=False)  # (b|1, 1, l, past+l)


# ----- the positions whose logits are wanted -------------------------------------------------------------------
def keep_positions(h: Tensor, logits_to_keep: int | Tensor) -> Tensor:
    """The positions of h (b, l, d) whose logits are wanted, as transformers reads `logits_to_keep`:
    an int keeps the last n (0: all); a 1-D tensor, those positions of every row -> (b, n, d); a 2-D
    integer tensor (b, n), each row's own positions -> (b, n, d); a 2-D bool mask (b, l), the True
    positions flattened -> (n_true, d)."""
    if isinstance(logits_to_keep, int):
        if logits_to_keep < 0:  # (transformers slices h[:, -n:], i.e. drops the first |n| positions)
            raise ValueError(
                f"logits_to_keep={logits_to_keep}: an int must be >= 0 (the last n positions; 0: all)"
            )
        return h[:, -logits_to_keep:] if logits_to_keep > 0 else h
    if not isinstance(logits_to_keep, Tensor) or logits_to_keep.dim() not in (1, 2):
        raise ValueError(
            f"logits_to_keep must be an int, a 1-D tensor of positions, or a 2-D tensor (positions per row, "
            f"or a bool mask (batch, length)); found {logits_to_keep!r}"
        )
    if logits_to_keep.dim() == 1:
        return h[:, logits_to_keep]
    if logits_to_keep.dtype == torch.bool:
        return h[logits_to_keep]  # (n_true, d)
    return torch.take_along_dim(h, logits_to_keep[..., None], dim=1)  # (b, n, d)
