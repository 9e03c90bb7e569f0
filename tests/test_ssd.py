"""Fast paths against their plain references: chunked scan vs sequential, conv vs per-sequence conv."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bamba.ssd import (
    causal_conv1d,
    causal_conv1d_reference,
    ssd_chunked,
    ssd_sequential,
    ssd_step,
    ssd_step_inplace,
)


def random_inputs(seed, b, l, h, p, g, n, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen).to(dtype)
    dt = torch.rand(b, l, h, generator=gen) * 0.5
    A = -torch.rand(h, generator=gen) * 3
    B = torch.randn(b, l, g, n, generator=gen).to(dtype)
    C = torch.randn(b, l, g, n, generator=gen).to(dtype)
    D = torch.randn(h, generator=gen)
    s0 = torch.randn(b, h, p, n, generator=gen)
    return x, dt, A, B, C, D, s0


def random_seq_idx(seed, b, l):
    gen = torch.Generator().manual_seed(seed)
    starts = (torch.rand(b, l, generator=gen) < 0.15).long()
    starts[:, 0] = 0
    return starts.cumsum(-1)


def recurrence(x, dt, A, B, C, D, s0=None, seq_idx=None):
    """The SSM recurrence written out here, apart from bamba.ssd (whose `ssd_sequential` is built on its
    own `ssd_step`): one row, head and token at a time, in fp64. Head j reads group j // (h / g); the
    state restarts from zero where seq_idx changes.

        state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T  (p, n);   y_t = state_t C_t + D x_t  (p,)
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    y = torch.zeros(b, l, h, p, dtype=torch.float64)
    final = torch.zeros(b, h, p, n, dtype=torch.float64)
    for row in range(b):
        for j in range(h):
            grp = j // (h // g)
            state = torch.zeros(p, n, dtype=torch.float64) if s0 is None else s0[row, j].double()
            for t in range(l):
                if seq_idx is not None and t > 0 and seq_idx[row, t] != seq_idx[row, t - 1]:
                    state = torch.zeros(p, n, dtype=torch.float64)
                step = float(dt[row, t, j])
                xt, Bt, Ct = x[row, t, j].double(), B[row, t, grp].double(), C[row, t, grp].double()
                state = math.exp(step * float(A[j])) * state + step * torch.outer(xt, Bt)
                y[row, t, j] = state @ Ct + float(D[j]) * xt
            final[row, j] = state
    return y, final


@pytest.mark.parametrize(
    "case",
    [
        dict(seed=11, b=2, l=19, g=1, r=3, chunk=4, init=False, packed=False),
        dict(seed=12, b=2, l=23, g=2, r=2, chunk=8, init=True, packed=False),
        dict(seed=13, b=2, l=30, g=2, r=3, chunk=7, init=True, packed=True),
    ],
)
def test_scans_and_steps_equal_the_recurrence_written_out(case):
    """ssd_chunked, ssd_sequential and a chain of ssd_step_inplace against `recurrence` (measured: 1e-6
    at most, on outputs of absmax ~8; bound 1e-5 + 1e-5 relative)."""
    x, dt, A, B, C, D, s0 = random_inputs(
        case["seed"], case["b"], case["l"], case["g"] * case["r"], 3, case["g"], 5
    )
    s0 = s0 if case["init"] else None
    seq_idx = random_seq_idx(case["seed"], case["b"], case["l"]) if case["packed"] else None
    y_ref, state_ref = recurrence(x, dt, A, B, C, D, s0, seq_idx)
    tol = dict(atol=1e-5, rtol=1e-5)
    y, state = ssd_chunked(x, dt, A, B, C, case["chunk"], D, s0, seq_idx)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(state.double(), state_ref, **tol)
    y, state = ssd_sequential(x, dt, A, B, C, D, s0, seq_idx)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(state.double(), state_ref, **tol)
    if seq_idx is None:  # (the decode step knows no packed sequences)
        state = torch.zeros_like(state_ref, dtype=torch.float32) if s0 is None else s0.clone()
        ys = [ssd_step_inplace(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(case["l"])]
        torch.testing.assert_close(torch.stack(ys, 1).double(), y_ref, **tol)
        torch.testing.assert_close(state.double(), state_ref, **tol)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 2),
    l=st.integers(1, 40),
    g=st.sampled_from([1, 2]),
    r=st.integers(1, 3),
    chunk=st.sampled_from([1, 4, 7, 16, 64]),
    init=st.booleans(),
    packed=st.booleans(),
    per_step=st.sampled_from([1, 2, 3, 64]),
)
def test_chunked_scan_equals_sequential(seed, b, l, g, r, chunk, init, packed, per_step):
    """Any chunk size, and any number of chunks per loop step (1 on the CPU, many on GPUs)."""
    x, dt, A, B, C, D, s0 = random_inputs(seed, b, l, g * r, 3, g, 5)
    seq_idx = random_seq_idx(seed, b, l) if packed else None
    s0 = s0 if init else None
    y, state = ssd_chunked(x, dt, A, B, C, chunk, D, s0, seq_idx, chunks_per_step=per_step)
    y_ref, state_ref = ssd_sequential(x, dt, A, B, C, D, s0, seq_idx)
    assert y.dtype == state.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-4, rtol=1e-4)


def test_packed_scan_equals_separate_sequences():
    x, dt, A, B, C, D, _ = random_inputs(1, 1, 30, 4, 3, 2, 5)
    seq_idx = torch.tensor([[0] * 9 + [1] * 1 + [2] * 20])
    y, _ = ssd_chunked(x, dt, A, B, C, 8, D, seq_idx=seq_idx)
    for lo, hi in [(0, 9), (9, 10), (10, 30)]:
        y_alone, _ = ssd_chunked(x[:, lo:hi], dt[:, lo:hi], A, B[:, lo:hi], C[:, lo:hi], 8, D)
        torch.testing.assert_close(y[:, lo:hi], y_alone, atol=1e-5, rtol=1e-5)


def test_scan_runs_in_fp32_for_bf16_inputs():
    x, dt, A, B, C, D, _ = random_inputs(2, 1, 19, 2, 4, 1, 6, dtype=torch.bfloat16)
    y, state = ssd_chunked(x, dt, A, B, C, 8, D)
    y_ref, _ = ssd_sequential(x.float(), dt, A, B.float(), C.float(), D)
    assert y.dtype == state.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)


def test_step_continues_chunked_state():
    x, dt, A, B, C, D, s0 = random_inputs(3, 2, 12, 4, 3, 2, 5)
    y_all, s_all = ssd_chunked(x, dt, A, B, C, 4, D, s0)
    _, s_11 = ssd_chunked(x[:, :11], dt[:, :11], A, B[:, :11], C[:, :11], 4, D, s0)
    y_last, s_last = ssd_step(s_11, x[:, 11], dt[:, 11], A, B[:, 11], C[:, 11], D)
    torch.testing.assert_close(y_last, y_all[:, 11], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_last, s_all, atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    l=st.integers(1, 25),
    k=st.integers(2, 4),
    packed=st.booleans(),
    bias=st.booleans(),
)
def test_causal_conv_equals_reference(seed, l, k, packed, bias):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, l, 6, generator=gen)
    w = torch.randn(6, k, generator=gen)
    bb = torch.randn(6, generator=gen) if bias else None
    seq_idx = random_seq_idx(seed, 2, l) if packed else None
    out, state = causal_conv1d(x, w, bb, seq_idx=seq_idx)
    torch.testing.assert_close(out, causal_conv1d_reference(x, w, bb, seq_idx), atol=1e-5, rtol=1e-5)
    # the returned state is the last k-1 inputs (zero-padded on the left for short inputs)
    padded = torch.cat([torch.zeros(2, k - 1, 6), x], dim=1)
    assert torch.equal(state, padded[:, -(k - 1) :])


def test_causal_conv_carries_state():
    x = torch.randn(1, 10, 3)
    w, bb = torch.randn(3, 4), torch.randn(3)
    full, _ = causal_conv1d(x, w, bb)
    first, state = causal_conv1d(x[:, :6], w, bb)
    rest = [causal_conv1d(x[:, t : t + 1], w, bb, state)[0] for t in range(6, 7)]
    second, _ = causal_conv1d(x[:, 6:], w, bb, state)
    torch.testing.assert_close(torch.cat([first, second], 1), full)
    torch.testing.assert_close(rest[0], full[:, 6:7])


def test_several_chunks_per_step_give_the_same_gradients():
    x, dt, A, B, C, D, s0 = random_inputs(4, 2, 37, 6, 3, 2, 5)
    seq_idx = random_seq_idx(4, 2, 37)
    grads = []
    for per_step in (1, 3):
        leaves = [t.clone().requires_grad_() for t in (x, dt, B, C, s0)]
        xx, dd, bb, cc, ss = leaves
        y, state = ssd_chunked(xx, dd, A, bb, cc, 4, D, ss, seq_idx, chunks_per_step=per_step)
        (y.square().sum() + state.square().sum()).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
