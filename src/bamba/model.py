"""The Bamba model: norms, MLP, attention, the Mamba-2 mixer, decoder blocks, BambaModel, BambaForCausalLM.

Module and parameter names are those of Hugging Face `transformers`, so a checkpoint's tensor names map
one to one onto `state_dict()` keys. Modules hold weights only; decoding state lives in the cache.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .cache import HybridMambaAttentionDynamicCache
from .checkpoint import load_pretrained, save_pretrained
from .config import BambaConfig
from .generation import generate
from .linear import Linear
from .masks import AttentionMask, keep_positions, prepare_inputs
from .outputs import BambaModelOutput, CausalLMOutput
from .ssd import causal_conv1d, causal_conv1d_step, ssd_chunked, ssd_step_inplace

Cache = HybridMambaAttentionDynamicCache


# ----- small modules -------------------------------------------------------------------------------------
class BambaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32 (one fused op), then scaled in the input's dtype
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.variance_epsilon).to(x.dtype)


class BambaRMSNormGated(nn.Module):
    """RMSNorm of y * silu(z), per group of `group_size` channels, in fp32."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        y = y.float() * F.silu(z.float())  # (b, l, d)
        yg = y.view(*y.shape[:-1], -1, self.group_size)  # (b, l, groups, group_size)
        yg = F.rms_norm(yg, (self.group_size,), eps=self.variance_epsilon)
        return self.weight.float() * yg.view_as(y)  # fp32


class BambaMLP(nn.Module):
    def __init__(self, config: BambaConfig) -> None:
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, f, bias=bias)
        self.up_proj = Linear(d, f, bias=bias)
        self.down_proj = Linear(f, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----- attention ---------------------------------------------------------------------------------------
def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (b, heads, l, head_dim); rotate the first cos.shape[-1] dims, pass the rest through."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # (b, 1, l, rd)
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([xr * cos + rotated * sin, xp], dim=-1)


class BambaAttention(nn.Module):
    def __init__(self, config: BambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, d, bias=bias)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: AttentionMask,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.num_heads, self.head_dim).transpose(1, 2)  # (b, h, l, hd)
        k = self.k_proj(x).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (b, kvh, l, hd)
        v = self.v_proj(x).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (b, kvh, l, hd)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update_kv(self.layer_idx, k, v)  # (b, kvh, t, hd)
        dropout = self.config.attention_dropout if self.training else 0.0
        weights = None
        if output_attentions:
            out, weights = self._eager(q, k, v, mask, dropout)
        elif l == 1 and self.num_kv_heads != self.num_heads:
            # Decoding: the query heads sharing a kv head become rows of one query block, so the cached
            # keys/values are read once per kv head (faster than SDPA's enable_gqa: benchmarks/README.md).
            # Reference: the enable_gqa call below (tests/test_speed_paths.py compares them).
            out = grouped_decode_attention(q, k, v, mask.mask)  # (b, h, 1, hd)
        else:
            out = sdpa(
                q,
                k,
                v,
                attn_mask=mask.mask,
                is_causal=mask.is_causal and mask.mask is None,
                dropout_p=dropout,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )  # (b, h, l, hd)
        out = out.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim)
        return self.o_proj(out), weights

    def _eager(
        self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout: float
    ) -> tuple[Tensor, Tensor]:
        """Plain attention that also returns its weights (b, h, q, k)."""
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (b, h, t, hd)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (b, h, l, t)
        m = mask.mask
        if m is None and mask.is_causal:
            m = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if m is not None:
            scores = scores.masked_fill(~m, float("-inf"))
        weights = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
        return F.dropout(weights, dropout, self.training) @ v, weights


# cuDNN's attention builds a plan for every new key length, so each decoding step would pay for one; the
# other backends do not (figures: benchmarks/README.md).
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
    """F.scaled_dot_product_attention, without the cuDNN backend on CUDA (see above)."""
    if q.is_cuda:
        with sdpa_kernel(_CUDA_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def grouped_decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Attention of one new token per row. q: (b, h, 1, hd); k, v: (b, kvh, t, hd); mask: (b|1, 1, 1, t)
    bool or None. Query head i uses kv head i // (h / kvh), as in transformers' repeat_kv."""
    b, h, _, hd = q.shape
    kvh = k.shape[1]
    qg = q.reshape(b, kvh, h // kvh, hd)  # (b, kvh, rep, hd)
    if q.device.type == "cpu" and q.dtype == torch.float32 and k.shape[2] >= DECODE_MATMUL_MIN_KEYS:
        out = decode_attention_matmul(qg, k, v, mask)
    else:
        out = sdpa(qg, k, v, attn_mask=mask)  # (b, kvh, rep, hd)
    return out.reshape(b, h, 1, hd)


# From this many keys, fp32 CPU decoding takes `decode_attention_matmul`: CPU SDPA reads a long cache slowly
# when a few query rows share each kv head (figures: benchmarks/README.md). bf16 stays on SDPA.
DECODE_MATMUL_MIN_KEYS = 512


def decode_attention_matmul(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(hd)) v as two batched products, for a few query rows per kv head.
    q: (b, kvh, r, hd); k, v: (b, kvh, t, hd), any strides; mask: (b|1, 1, 1, t) bool or None.
    Returns (b, kvh, r, hd). The keys are the scores' GEMM rows (k @ q^T: the keys are read once, in
    order), and rows with no visible key give zeros, as CPU SDPA does. Reference: `sdpa`."""
    scores = torch.matmul(k, q.mul(q.shape[-1] ** -0.5).transpose(-1, -2))  # (b, kvh, t, r)
    scores = scores.transpose(-1, -2)  # (b, kvh, r, t), a view
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)  # (b, kvh, r, t), contiguous
    if mask is not None:
        # rows with every key masked; not in place: autograd keeps probs
        probs = torch.nan_to_num(probs, 0.0)
    return torch.matmul(probs, v)  # (b, kvh, r, hd)


# ----- the Mamba-2 mixer ---------------------------------------------------------------------------------
class BambaMixer(nn.Module):
    """Mamba-2: in_proj -> [z | xBC | dt]; causal conv on xBC; SSD scan; gated RMSNorm; out_proj."""

    def __init__(self, config: BambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.mamba_n_heads
        self.head_dim = config.mamba_d_head
        self.n_groups = config.mamba_n_groups
        self.d_state = config.mamba_d_state
        self.intermediate_size = config.mamba_intermediate_size
        self.conv_dim = config.mamba_conv_dim
        self.chunk_size = config.mamba_chunk_size
        self.time_step_limit = config.time_step_limit
        self.in_proj = Linear(config.hidden_size, config.mamba_in_proj_size, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=config.mamba_d_conv,
            groups=self.conv_dim,
            padding=config.mamba_d_conv - 1,
            bias=config.mamba_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = BambaRMSNormGated(
            self.intermediate_size,
            group_size=self.intermediate_size // self.n_groups,
            eps=config.rms_norm_eps,
        )
        self.out_proj = Linear(self.intermediate_size, config.hidden_size, bias=config.mamba_proj_bias)

    def forward(
        self,
        x: Tensor,
        cache: Cache | None = None,
        pad_mask: Tensor | None = None,
        seq_idx: Tensor | None = None,
    ) -> Tensor:
        """x: (b, l, d); pad_mask: (b, l) bool, False at padding; seq_idx: (b, l) packed sequence ids."""
        b, l, _ = x.shape
        if cache is not None and l == 1 and cache.has_mamba_state(self.layer_idx):
            return self.step(x, cache)
        dtype = x.dtype
        m = pad_mask[..., None].to(dtype) if pad_mask is not None else None  # (b, l, 1)
        if m is not None:
            x = x * m
        zxbcdt = self.in_proj(x)  # (b, l, in_proj)
        z, xBC, dt = zxbcdt.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        if m is not None:
            xBC = xBC * m  # padding never enters the conv window

        conv_state = cache.conv_states[self.layer_idx] if cache is not None else None
        ssm_state = cache.ssm_states[self.layer_idx] if cache is not None else None
        xBC, new_conv_state = causal_conv1d(
            xBC, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state, seq_idx
        )
        xBC = F.silu(xBC)
        if m is not None:
            xBC = xBC * m
        xs, B, C = xBC.split(
            [self.intermediate_size, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1
        )
        dt = self._dt(dt)  # (b, l, h) fp32
        if pad_mask is not None:
            dt = dt * pad_mask[..., None]  # dt = 0: a pad token leaves the state exactly as it was
        y, new_ssm_state = ssd_chunked(
            xs.view(b, l, self.num_heads, self.head_dim),
            dt,
            self._A(),
            B.view(b, l, self.n_groups, self.d_state),
            C.view(b, l, self.n_groups, self.d_state),
            self.chunk_size,
            D=self.D,
            initial_state=ssm_state,
            seq_idx=seq_idx,
        )  # (b, l, h, p)
        if cache is not None:
            cache.set_mamba_state(self.layer_idx, new_conv_state, new_ssm_state)
        y = self.norm(y.reshape(b, l, self.intermediate_size), z)  # fp32
        return self.out_proj(y.to(dtype))

    def step(self, x: Tensor, cache: Cache) -> Tensor:
        """One decode token (b, 1, d) on a filled cache, whose conv window and SSM state are updated in
        place (`causal_conv1d_step`, `ssd_step_inplace`; references: `causal_conv1d`, `ssd_step`)."""
        b = x.shape[0]
        zxbcdt = self.in_proj(x[:, 0])  # (b, in_proj)
        z, xBC, dt = zxbcdt.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        xBC = F.silu(
            causal_conv1d_step(
                xBC, cache.conv_states[self.layer_idx], self.conv1d.weight[:, 0], self.conv1d.bias
            )
        )  # (b, conv_dim)
        xs, B, C = xBC.split(
            [self.intermediate_size, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1
        )
        y = ssd_step_inplace(
            cache.ssm_states[self.layer_idx],
            xs.view(b, self.num_heads, self.head_dim),
            self._dt(dt),
            self._A(),
            B.view(b, self.n_groups, self.d_state),
            C.view(b, self.n_groups, self.d_state),
            self.D,
        )  # (b, h, p) fp32
        y = self.norm(y.view(b, 1, self.intermediate_size), z[:, None])  # fp32
        return self.out_proj(y.to(x.dtype))

    def _A(self) -> Tensor:
        """A = -exp(A_log) (h,), fp32: each head's (negative) decay rate."""
        return -torch.exp(self.A_log.float())

    def _dt(self, dt: Tensor) -> Tensor:
        """softplus(dt + dt_bias), clamped to time_step_limit; fp32."""
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.time_step_limit is not None and self.time_step_limit != (0.0, math.inf):
            dt = dt.clamp(*self.time_step_limit)
        return dt


# ----- blocks and models ---------------------------------------------------------------------------------
class BambaDecoderLayer(nn.Module):
    def __init__(self, config: BambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.block_type = config.layers_block_type[layer_idx]
        self.input_layernorm = BambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_ff_layernorm = BambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.feed_forward = BambaMLP(config)
        if self.block_type == "mamba":
            self.mamba = BambaMixer(config, layer_idx)
        else:
            self.self_attn = BambaAttention(config, layer_idx)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        attn_mask: AttentionMask | None,
        pad_mask: Tensor | None,
        seq_idx: Tensor | None,
        cache: Cache | None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        h = self.input_layernorm(x)
        weights = None
        if self.block_type == "mamba":
            h = self.mamba(h, cache, pad_mask, seq_idx)
        else:
            h, weights = self.self_attn(h, rope, attn_mask, cache, output_attentions)
        x = x + h
        x = x + self.feed_forward(self.pre_ff_layernorm(x))
        return x, weights


class BambaPreTrainedModel(nn.Module):
    """Shared: initialization as transformers does it, and the checkpoint I/O entry points."""

    config: BambaConfig
    # generation_config.json of the folder the model was loaded from (its eos_token_id may list several
    # stop tokens); `generate` takes its defaults from it, else from the config.
    generation_config: dict[str, Any] | None = None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each layer in the backward pass instead of keeping its activations (training only;
        the cache is then off). `gradient_checkpointing_kwargs` other than use_reentrant=False are refused:
        layers are checkpointed non-reentrantly."""
        extra = {
            k: v
            for k, v in (gradient_checkpointing_kwargs or {}).items()
            if (k, v) != ("use_reentrant", False)
        }
        if extra:
            raise ValueError(f"gradient_checkpointing_kwargs={extra}: only use_reentrant=False is supported")
        self._base_model().gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self._base_model().gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._base_model().gradient_checkpointing

    def _base_model(self) -> BambaModel:
        return self if isinstance(self, BambaModel) else self.model

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.initializer_range
        self.tie_weights()
        tied = (
            {id(self.lm_head.weight)}
            if self.config.tie_word_embeddings and hasattr(self, "lm_head")
            else set()
        )
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)) and id(module.weight) not in tied:
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, (BambaRMSNorm, BambaRMSNormGated)):
                module.weight.fill_(1.0)
            elif isinstance(module, BambaMixer):
                module.dt_bias.fill_(1.0)
                module.A_log.copy_(torch.log(torch.arange(1, module.num_heads + 1, dtype=torch.float32)))
                module.D.fill_(1.0)

    def tie_weights(self) -> None:
        pass

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, **kwargs: Any) -> BambaPreTrainedModel:
        """Load a Hugging Face checkpoint folder or hub repo id. See `bamba.checkpoint.load_pretrained`."""
        return load_pretrained(cls, path_or_repo_id, **kwargs)

    def save_pretrained(self, folder: str, max_shard_size: int | str = "5GB", **kwargs: Any) -> None:
        """Write config.json and (sharded) safetensors that transformers loads. See `bamba.checkpoint`."""
        save_pretrained(self, folder, max_shard_size=max_shard_size, **kwargs)


def _build(module: BambaPreTrainedModel, init: bool) -> None:
    if init and next(module.parameters()).device.type != "meta":
        module.init_weights()


class BambaModel(BambaPreTrainedModel):
    def __init__(self, config: BambaConfig, init: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(BambaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = BambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        # Prompts longer than this run through the cache in pieces of this many tokens (None: never).
        self.prefill_chunk_size: int | None = 2048
        _build(self, init)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        seq_idx: Tensor | None = None,
        cu_seq_lens_q: Tensor | None = None,
        cu_seq_lens_k: Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        cache: Cache | None = None,
        return_dict: bool = True,
        **unused: Any,
    ) -> BambaModelOutput | tuple:
        per_layer = output_hidden_states or output_attentions
        inp = prepare_inputs(
            self,
            input_ids,
            inputs_embeds,
            attention_mask,
            position_ids,
            past_key_values if past_key_values is not None else cache,
            use_cache,
            seq_idx,
            (cu_seq_lens_q, cu_seq_lens_k),
            prefill_chunk=None if per_layer or self.training else self.prefill_chunk_size,
        )
        if inp.prefill_chunk:
            out = self._prefill_in_chunks(inp.x, inp.cache, inp.prefill_chunk)
            return out if return_dict else out.to_tuple()

        x = inp.x  # (b, l, d)
        hidden, attentions = [], []
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(x)
            args = (x, inp.rope, inp.attn_mask, inp.pad_mask, inp.seq_idx, inp.cache, output_attentions)
            x, w = checkpoint(layer, *args, use_reentrant=False) if inp.checkpointing else layer(*args)
            if w is not None:
                attentions.append(w)
        x = self.final_layernorm(x)
        if output_hidden_states:
            hidden.append(x)  # (embeddings, layer 0 .. n-2 outputs, final normed), as transformers
        if inp.cache is not None:
            inp.cache.advance(x.shape[1])
        out = BambaModelOutput(
            last_hidden_state=x,
            past_key_values=inp.cache,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()

    def _prefill_in_chunks(self, x: Tensor, cache: Cache, chunk: int) -> BambaModelOutput:
        """x (b, l, d) through the cache in pieces of `chunk` tokens: activations stay O(chunk), not O(l)."""
        pieces = [
            self(inputs_embeds=x[:, i : i + chunk], past_key_values=cache, use_cache=True).last_hidden_state
            for i in range(0, x.shape[1], chunk)
        ]
        return BambaModelOutput(last_hidden_state=torch.cat(pieces, dim=1), past_key_values=cache)


class BambaForCausalLM(BambaPreTrainedModel):
    def __init__(self, config: BambaConfig, init: bool = True) -> None:
        super().__init__()
        self.config = config
        self.model = BambaModel(config, init=False)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        _build(self, init)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        logits_to_keep: int | Tensor = 0,
        num_items_in_batch: int | Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> CausalLMOutput | tuple:
        """Logits (b, kept, vocab) in the weights' dtype; loss (fp32): shifted cross-entropy, -100 ignored,
        plus z_loss_coefficient * mean(logsumexp(logits)^2) when the coefficient is > 0."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            **kwargs,
        )
        logits = self.lm_head(keep_positions(out.last_hidden_state, logits_to_keep))  # (b, kept, vocab)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch, self.config.z_loss_coefficient)
        result = CausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return result if return_dict else result.to_tuple()

    def generate(self, *args: Any, **kwargs: Any) -> Tensor:
        """Generate continuations; see `bamba.generation.generate`."""
        return generate(self, *args, **kwargs)


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    num_items_in_batch: int | Tensor | None = None,
    z_loss_coefficient: float = 0.0,
) -> Tensor:
    """Cross-entropy of logits[t] against labels[t + 1] (fp32, -100 ignored), as transformers computes it.

    With `num_items_in_batch` the sum is divided by it (gradient accumulation); else the mean.
    z-loss (mean over every position of logsumexp(logits)^2) is added times `z_loss_coefficient`.
    """
    if (
        not isinstance(labels, Tensor)
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
    ):
        found = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of token ids (-100: ignored), found {found}")
    labels = labels.long()
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)}, logits {tuple(logits.shape)}: expected labels (b, l)"
        )
    vocab = logits.shape[-1]
    outside = (labels != -100) & ((labels < 0) | (labels >= vocab))
    if bool(outside.any()):
        raise ValueError(
            f"labels contain {labels[outside][0].item()}, outside the vocabulary [0, {vocab}) (-100: ignored)"
        )
    lf = logits.float()
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]  # (b, l): target of position t is labels[t + 1]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(
        lf.reshape(-1, lf.shape[-1]),
        shifted.reshape(-1).to(lf.device),
        ignore_index=-100,
        reduction=reduction,
    )
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    if z_loss_coefficient > 0:
        loss = loss + z_loss_coefficient * logits.logsumexp(dim=-1).to(loss.dtype).pow(2).mean()
    return loss
