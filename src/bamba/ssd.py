"""Mamba-2 state-space duality (SSD) ops in pure PyTorch, each fast path beside its plain reference.

Notation (the Mamba-2 paper's): b batch, l sequence, h heads, p head dim, g groups (h = g * r), n state
size, q chunk length. The recurrence, per head, with A < 0 a scalar:

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t B_t^T        # (p, n)
    y_t     = state_t C_t + D * x_t                                  # (p,)

`seq_idx` (b, l) marks packed sequences: where it changes, the state (and the conv window) restarts
from zero. Everything here computes in fp32 whatever the input dtype, and returns fp32.

- `ssd_chunked`: the chunked scan for prompts and training; loops over chunks so its extra memory is
  O(b * h * k * q * (q + p + n)) whatever the length (never a (q, q, h, p) tensor), for k chunks per
  loop step: 1 on CPUs, as many as fit in 512 MB on GPUs (where the loop's kernel launches dominate).
- `ssd_sequential`: the token-by-token reference of the same function, for tests.
- `ssd_step`: one token on a cached state (decoding); `ssd_step_inplace`: the same, updating the cached
  state in place with fewer passes over it (the decode fast path; `ssd_step` is its reference).
- `causal_conv1d` / `causal_conv1d_reference`: the depthwise causal convolution with a carried window;
  `causal_conv1d_step`: one token, the window updated in place (decode fast path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import linear

# exp() of arguments below this is clamped: exp(-60) ~ 1e-26 is negligible next to fp32's 1e-7 resolution,
# and it keeps results out of the denormal range, where CPU arithmetic is slow.
_MIN_LOG_DECAY = -60.0
READOUT_ONEDNN_MIN = 2**18  # state elements per (row, group) from which `state_readout` may take oneDNN


def _decay(log_decay: Tensor) -> Tensor:
    """exp of a log-decay (<= 0 wherever it is used; larger values, e.g. above a causal mask, give 1)."""
    return torch.exp(log_decay.clamp(_MIN_LOG_DECAY, 0.0))


def _pad_tokens(t: Tensor, pad: int) -> Tensor:
    """t (b, l, ...) with `pad` zero tokens appended along dim 1."""
    if pad == 0:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    chunks_per_step: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan.

    x: (b, l, h, p); dt: (b, l, h), already softplus'd and clamped; A: (h,); B, C: (b, l, g, n);
    D: (h,); initial_state: (b, h, p, n); seq_idx: (b, l) integer, non-decreasing along l.
    Returns y (b, l, h, p) and the final state (b, h, p, n), both fp32.

    chunks_per_step: how many chunks one step of the loop computes together (their states are then chained
    by a short loop over (b, h, p, n) tensors). Default: 1 on the CPU (memory stays flat and in cache); on
    other devices as many as keep a step's (b, h, k, q, q) decay matrix under 512 MB, since there the loop's
    many small kernel launches, not the arithmetic, bound a prompt.
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    q = chunk_size
    if chunks_per_step is None:
        chunks_per_step = 1 if x.device.type == "cpu" else max(1, 2**27 // (b * h * q * q))
    A = A.float().view(g, r, 1, 1)  # (g, r, 1, 1)
    if initial_state is None:
        state = x.new_zeros(b, g, r, p, n, dtype=torch.float32)
    else:
        state = initial_state.float().reshape(b, g, r, p, n).clone()
    prev_seq = seq_idx[:, :1] if seq_idx is not None else None  # (b, 1): the sequence the state belongs to
    out = x.new_empty(b, l, h, p, dtype=torch.float32)  # y, filled step by step
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, initial_state)
    )
    step = q * chunks_per_step
    for c0 in range(0, l, step):
        c1 = min(c0 + step, l)
        k = -(-(c1 - c0) // q)  # chunks in this step
        pad = k * q - (c1 - c0)  # the last chunk is padded with dt = 0 tokens: no decay, no input
        xc, dtc, Bc, Cc = _chunks(x[:, c0:c1], dt[:, c0:c1], B[:, c0:c1], C[:, c0:c1], k, q, pad)
        dA = dtc * A  # (b, g, r, k, q)
        dA_cs = dA.cumsum(-1)  # (b, g, r, k, q)
        xdt = xc * dtc[..., None]  # (b, g, r, k, q, p)

        # within each chunk
        scores = Cc @ Bc.transpose(-1, -2)  # (b, g, 1, k, q, q)
        causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()  # (i, j): j <= i
        scores.masked_fill_(~causal, 0.0)  # 0 above the diagonal
        if seq_idx is not None:
            s = seq_idx[:, c0:c1]
            s = torch.cat([s, s[:, -1:].expand(b, pad)], dim=1).view(b, k, q)  # padding: the last sequence
            scores.mul_((s[..., :, None] == s[..., None, :])[:, None, None])  # (b,1,1,k,q,q): same sequence
        seg = dA_cs[..., :, None] - dA_cs[..., None, :]  # (b, g, r, k, q, q); > 0 above the diagonal
        decay = seg.clamp_(_MIN_LOG_DECAY, 0.0).exp_()  # = _decay(seg), in place; 1 above the diagonal
        y = (decay * scores if grad else decay.mul_(scores)) @ xdt  # (b, g, r, k, q, p)

        # between chunks: the state entering each chunk, then its effect on the chunk's outputs
        decay_in = _decay(dA_cs)  # (b, g, r, k, q)
        decay_out = _decay(dA_cs[..., -1:] - dA_cs)  # (b, g, r, k, q)
        chunk_decay = _decay(dA_cs[..., -1])  # (b, g, r, k)
        if seq_idx is not None:
            prev = torch.cat([prev_seq[:, None], s[:, :-1, -1:]], dim=1)  # (b, k, 1): before each chunk
            decay_in = decay_in * (s == prev)[:, None, None]
            decay_out = decay_out * (s == s[..., -1:])[:, None, None]
            chunk_decay = chunk_decay * (s[..., -1] == prev[..., 0])[:, None, None]
            prev_seq = s[:, -1, -1:]
        contrib = (xdt * decay_out[..., None]).transpose(-1, -2) @ Bc  # (b,g,r,k,p,q) @ (b,g,1,k,q,n)
        states, state = _chain_states(state, chunk_decay, contrib)  # (b, g, r, k, p, n), (b, g, r, p, n)
        y += (Cc @ states.transpose(-1, -2)).mul_(decay_in[..., None])  # (b,g,1,k,q,n) @ (b,g,r,k,n,p)
        y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, k * q, h, p)  # (b, k*q, h, p)
        out[:, c0:c1] = y[:, : c1 - c0]

    if D is not None:
        out.addcmul_(x.float(), D.float()[:, None])  # (b, l, h, p) += x * D (h, 1)
    return out, state.reshape(b, h, p, n)


def _chunks(
    x: Tensor, dt: Tensor, B: Tensor, C: Tensor, k: int, q: int, pad: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One loop step's tokens (`pad` zero tokens appended) as k chunks of q, fp32, heads split into
    (groups, heads per group). x: (b, t, h, p); dt: (b, t, h); B, C: (b, t, g, n).
    Returns x (b, g, r, k, q, p), dt (b, g, r, k, q), B and C (b, g, 1, k, q, n)."""
    b, _, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    xc = _pad_tokens(x.float(), pad).view(b, k, q, g, r, p).permute(0, 3, 4, 1, 2, 5)  # (b, g, r, k, q, p)
    dtc = _pad_tokens(dt.float(), pad).view(b, k, q, g, r).permute(0, 3, 4, 1, 2)  # (b, g, r, k, q)
    Bc = _pad_tokens(B.float(), pad).view(b, k, q, g, n).permute(0, 3, 1, 2, 4)  # (b, g, k, q, n)
    Cc = _pad_tokens(C.float(), pad).view(b, k, q, g, n).permute(0, 3, 1, 2, 4)  # (b, g, k, q, n)
    return xc, dtc, Bc.unsqueeze(2), Cc.unsqueeze(2)  # B, C: (b, g, 1, k, q, n)


def _chain_states(state: Tensor, chunk_decay: Tensor, contrib: Tensor) -> tuple[Tensor, Tensor]:
    """The state entering each of k chunks, from the one entering the first. state: (b, g, r, p, n);
    chunk_decay: (b, g, r, k), each chunk's total decay; contrib: (b, g, r, k, p, n), each chunk's own
    input. Returns the entering states (b, g, r, k, p, n) and the state after the last chunk."""
    entering = []
    for j in range(chunk_decay.shape[-1]):  # (b, g, r, p, n) each
        entering.append(state)
        state = state * chunk_decay[..., j, None, None] + contrib[..., j, :, :]
    return torch.stack(entering, dim=3), state


def ssd_step(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One recurrent step. state: (b, h, p, n) fp32; x: (b, h, p); dt: (b, h); A: (h,); B, C: (b, g, n).

    Returns y (b, h, p) and the new state (b, h, p, n), both fp32.
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    r = h // g
    dt = dt.float()
    x = x.float()
    dA = torch.exp(dt * A.float())  # (b, h)
    Bh = B.float()[:, :, None, :].expand(b, g, r, n).reshape(b, h, n)  # (b, h, n)
    Ch = C.float()[:, :, None, :].expand(b, g, r, n).reshape(b, h, n)  # (b, h, n)
    dBx = (x * dt[..., None])[..., None] * Bh[:, :, None, :]  # (b, h, p, n)
    state = state.float() * dA[..., None, None] + dBx
    y = (state @ Ch[..., None]).squeeze(-1)  # (b, h, p)
    if D is not None:
        y = y + x * D.float()[:, None]
    return y, state


def ssd_step_inplace(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None
) -> Tensor:
    """`ssd_step` writing the new state into `state` (b, h, p, n), which must be contiguous fp32.

    Three passes over the state (decay, rank-1 update, read-out) and no state-sized temporaries: at
    batch 8 the states of a 9B-shaped model are ~270 MB, so every pass counts. Returns y (b, h, p) fp32.
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    r = h // g
    dt = dt.float()
    xdt = x.float() * dt[..., None]  # (b, h, p)
    state.mul_(torch.exp(dt * A.float())[..., None, None])  # decay: (b, h, p, n) * (b, h, 1, 1)
    sg = state.view(b, g, r * p, n)  # (b, g, r*p, n): heads of a group share B and C
    sg.addcmul_(xdt.view(b, g, r * p, 1), B.float().view(b, g, 1, n))  # += (x dt) B^T
    y = state_readout(sg, C.float()).view(b, h, p)  # (b, g, r*p) -> (b, h, p)
    if D is not None:
        y = y.addcmul_(x.float(), D.float()[:, None])
    return y


def state_readout(sg: Tensor, C: Tensor) -> Tensor:
    """y[b, g, m] = sum_n sg[b, g, m, n] C[b, g, n]: the states (b, g, m, n) read out by C (b, g, n), fp32.

    Several (row, group) pairs of states of at least `READOUT_ONEDNN_MIN` elements each, on CPUs where
    oneDNN's fp32 matmul beats MKL's (`bamba.linear.onednn_fp32_is_fast`): one oneDNN matrix-vector
    product per pair, where MKL's batched form reads the states slowly (figures: benchmarks/README.md).
    Elsewhere, and as the reference: torch.matmul."""
    b, g, m, n = sg.shape
    if (
        b * g == 1
        or m * n < READOUT_ONEDNN_MIN
        or not linear.onednn_can_take(sg, C)
        or linear.needs_grad(sg, C)
        or not linear.onednn_fp32_is_fast()
    ):
        return torch.matmul(sg, C.view(b, g, n, 1)).view(b, g, m)
    y = sg.new_empty(b, g, m)
    for i in range(b):
        for j in range(g):
            y[i, j] = linear.onednn_linear(C[i, j, None], sg[i, j])[0]  # (1, n) @ (m, n)^T -> (m,)
    return y


def ssd_sequential(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference: the recurrence one token at a time. Same arguments and results as `ssd_chunked`."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    state = x.new_zeros(b, h, p, n, dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).float()  # (b,)
            state = state * keep[:, None, None, None]
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    conv_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv along l, channels last (no activation), summed in fp32.

    x: (b, l, c); weight: (c, k) ; bias: (c,); conv_state: (b, k-1, c), the inputs before x (zeros when
    None). With `seq_idx` (b, l), a window never reaches across a sequence boundary.
    Returns the output (b, l, c) in x's dtype and the new state (b, k-1, c): the last k-1 inputs.

    The k taps are shifted multiply-adds over the channels-last input: no transposes (F.conv1d wants
    channels first; transposing there and back was slower, see benchmarks/README.md), and the output
    stays contiguous for the ops that follow. Reference: `causal_conv1d_reference`.
    """
    b, l, c = x.shape
    k = weight.shape[-1]
    if conv_state is None:
        conv_state = x.new_zeros(b, k - 1, c)
    xp = torch.cat([conv_state.to(x.dtype), x], dim=1)  # (b, k-1+l, c)
    xf, w = xp.float(), weight.float()  # (b, k-1+l, c), (c, k)
    if seq_idx is not None:
        sp = torch.cat([seq_idx[:, :1].expand(b, k - 1), seq_idx], dim=1)  # (b, k-1+l)
    out = xf[:, k - 1 :] * w[:, k - 1]  # (b, l, c): the current token's tap
    for j in range(k - 1):  # tap j looks back k-1-j steps
        if seq_idx is None:
            out.addcmul_(xf[:, j : j + l], w[:, j])
        else:
            same = (sp[:, j : j + l] == seq_idx)[..., None]  # (b, l, 1): the same sequence
            out.addcmul_(xf[:, j : j + l] * same, w[:, j])
    if bias is not None:
        out += bias.float()
    out = out.to(x.dtype)
    return out, xp[:, l:]  # the last k-1 inputs


def causal_conv1d_step(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """One token of `causal_conv1d`: x (b, c); conv_state (b, k-1, c) is shifted in place.

    Returns the output (b, c) in x's dtype (the window is summed in fp32).
    """
    window = torch.cat([conv_state, x[:, None].to(conv_state.dtype)], dim=1)  # (b, k, c)
    out = (window.float() * weight.float().t()).sum(1)  # (b, k, c) * (k, c) -> (b, c)
    if bias is not None:
        out = out + bias.float()
    conv_state.copy_(window[:, 1:])
    return out.to(x.dtype)


def causal_conv1d_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, seq_idx: Tensor | None = None
) -> Tensor:
    """Reference: a zero-padded conv per sequence, one (row, sequence) at a time. x: (b, l, c)."""
    b, l, c = x.shape
    k = weight.shape[-1]
    out = torch.empty_like(x)
    for row in range(b):
        ids = seq_idx[row] if seq_idx is not None else torch.zeros(l, dtype=torch.long)
        for sid in torch.unique(ids):
            pos = (ids == sid).nonzero().squeeze(-1)
            seg = x[row, pos].T[None]  # (1, c, len)
            y = F.conv1d(seg, weight[:, None, :], bias, padding=k - 1, groups=c)[..., : len(pos)]
            out[row, pos] = y[0].T
    return out
