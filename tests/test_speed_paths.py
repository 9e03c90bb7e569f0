"""Each decode / prefill fast path against its plain reference, on random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from bamba import BambaConfig, BambaForCausalLM, HybridMambaAttentionDynamicCache, linear, ssd
from bamba.model import BambaRMSNorm, BambaRMSNormGated
from bamba.ssd import causal_conv1d, causal_conv1d_step, ssd_step, ssd_step_inplace, state_readout


@pytest.mark.parametrize("onednn_fast", [False, True])
@pytest.mark.parametrize("g", [1, 2])
def test_ssd_step_inplace_matches_ssd_step(g, onednn_fast, monkeypatch):
    """Whichever way the states are read out (oneDNN products per row and group, or torch.matmul)."""
    if onednn_fast and not linear.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN")
    monkeypatch.setattr(linear, "onednn_fp32_is_fast", lambda: onednn_fast)
    monkeypatch.setattr(ssd, "READOUT_ONEDNN_MIN", 0)  # the small states here take it too
    torch.manual_seed(0)
    b, h, p, n = 3, 4, 8, 16
    state = torch.randn(b, h, p, n)
    x, dt = torch.randn(b, h, p), F.softplus(torch.randn(b, h))
    A, D = -torch.rand(h) * 3, torch.randn(h)
    B, C = torch.randn(b, g, n), torch.randn(b, g, n)
    y_ref, s_ref = ssd_step(state, x, dt, A, B, C, D)
    s = state.clone()
    y = ssd_step_inplace(s, x, dt, A, B, C, D)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not linear.onednn_available(), reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("shape", [(3, 2, 40, 16), (1, 1, 40, 16), (2, 1, 512, 512)])
def test_state_readout_paths_match_matmul(monkeypatch, shape):
    """oneDNN products per (row, group) only for several pairs of large enough states, where oneDNN is
    fast; the same read-out either way."""
    torch.manual_seed(5)
    b, g, m, n = shape
    sg, C = torch.randn(b, g, m, n), torch.randn(b, g, n)
    ref = torch.matmul(sg, C[..., None])[..., 0]
    calls = []
    real = linear.onednn_linear
    monkeypatch.setattr(linear, "onednn_linear", lambda *a: calls.append(1) or real(*a))
    for fast in (False, True):
        monkeypatch.setattr(linear, "onednn_fp32_is_fast", lambda fast=fast: fast)
        calls.clear()
        torch.testing.assert_close(state_readout(sg, C), ref, atol=1e-4, rtol=1e-5)
        takes_onednn = fast and b * g > 1 and m * n >= ssd.READOUT_ONEDNN_MIN
        assert len(calls) == (b * g if takes_onednn else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_step_matches_causal_conv1d(dtype):
    torch.manual_seed(1)
    b, c, k = 2, 12, 4
    x, w, bias = torch.randn(b, 5, c, dtype=dtype), torch.randn(c, k), torch.randn(c)
    state = torch.randn(b, k - 1, c, dtype=dtype)
    ref, ref_state = causal_conv1d(x, w.to(dtype), bias.to(dtype), state)
    s = state.clone()
    out = torch.stack([causal_conv1d_step(x[:, t], s, w, bias) for t in range(5)], dim=1)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(s, ref_state)


def test_fused_rms_norms_match_the_formula():
    torch.manual_seed(2)
    x, z = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    norm = BambaRMSNorm(32, eps=1e-5)
    norm.weight.data.normal_()
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(norm(x), ref)
    gated = BambaRMSNormGated(32, group_size=16, eps=1e-5)
    gated.weight.data.normal_()
    y = (x * F.silu(z)).view(2, 5, 2, 16)
    ref = gated.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)).view(2, 5, 32)
    torch.testing.assert_close(gated(x, z), ref)


CFG = TINY


def test_decode_steps_match_one_full_forward():
    torch.manual_seed(4)
    model = BambaForCausalLM(BambaConfig(**CFG)).eval()
    ids = torch.randint(0, 97, (3, 20))
    mixers = [layer.mamba for layer in model.model.layers if layer.block_type == "mamba"]
    calls = []
    for mixer in mixers:  # count the calls of the in-place decode path
        mixer.step = lambda x, cache, step=mixer.step: calls.append(1) or step(x, cache)
    with torch.no_grad():
        ref = model(ids).logits
        cache = HybridMambaAttentionDynamicCache(model.config)
        steps = [model(ids[:, :12], past_key_values=cache, use_cache=True).logits]
        for t in range(12, 20):  # the in-place decode path (BambaMixer.step)
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert len(calls) == 8 * len(mixers)  # every decoded token went through BambaMixer.step
    torch.testing.assert_close(torch.cat(steps, dim=1), ref, atol=1e-4, rtol=1e-4)


def test_long_prompt_prefills_in_pieces_like_one_forward():
    torch.manual_seed(5)
    model = BambaForCausalLM(BambaConfig(**CFG)).eval()
    ids = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        model.model.prefill_chunk_size = None
        ref_cache = HybridMambaAttentionDynamicCache(model.config)
        ref = model(ids, past_key_values=ref_cache, use_cache=True).logits
        model.model.prefill_chunk_size = 16  # 50 tokens: pieces of 16, 16, 16, 2
        lengths = []

        def record(module, args, kwargs):  # the length of each BambaModel call's input
            x = kwargs.get("inputs_embeds")
            lengths.append((x if x is not None else kwargs["input_ids"]).shape[1])

        hook = model.model.register_forward_pre_hook(record, with_kwargs=True)
        cache = HybridMambaAttentionDynamicCache(model.config)
        out = model(ids, past_key_values=cache, use_cache=True).logits
        hook.remove()
        assert lengths == [50, 16, 16, 16, 2]  # the whole prompt, then its pieces through the cache
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        nxt = torch.randint(0, 97, (2, 1))
        torch.testing.assert_close(
            model(nxt, past_key_values=cache, use_cache=True).logits,
            model(nxt, past_key_values=ref_cache, use_cache=True).logits,
            atol=1e-4,
            rtol=1e-4,
        )


def test_grouped_decode_attention_matches_sdpa_with_gqa():
    import torch.nn.functional as F

    from bamba.model import grouped_decode_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 11, 16), torch.randn(3, 2, 11, 16)
    mask = torch.rand(3, 1, 1, 11) > 0.3
    mask[..., -1] = True
    for m in (None, mask):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        torch.testing.assert_close(grouped_decode_attention(q, k, v, m), expected, atol=1e-6, rtol=1e-5)


def test_decode_attention_matmul_matches_sdpa(monkeypatch):
    """The CPU fp32 path for long caches (DECODE_MATMUL_MIN_KEYS keys or more), on strided cache views,
    with and without a padding mask, a fully masked row included (SDPA gives zeros there)."""
    import torch.nn.functional as F

    import bamba.model
    from bamba.model import DECODE_MATMUL_MIN_KEYS, decode_attention_matmul, grouped_decode_attention

    routed = []
    monkeypatch.setattr(
        bamba.model, "decode_attention_matmul", lambda *a: routed.append(1) or decode_attention_matmul(*a)
    )

    torch.manual_seed(0)
    t = DECODE_MATMUL_MIN_KEYS + 7
    buf_k, buf_v = torch.randn(3, 2, 2 * t, 16), torch.randn(3, 2, 2 * t, 16)  # a cache with spare room
    k, v, q = buf_k[:, :, :t], buf_v[:, :, :t], torch.randn(3, 8, 1, 16)
    mask = torch.rand(3, 1, 1, t) > 0.3
    mask[1] = False
    for m in (None, mask):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        got = grouped_decode_attention(q, k, v, m)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        qg = q.reshape(3, 2, 4, 16)
        torch.testing.assert_close(decode_attention_matmul(qg, k, v, m).reshape(3, 8, 1, 16), expected)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert len(routed) == 2  # grouped_decode_attention took the matmul path for both calls
    grouped_decode_attention(
        q, k[:, :, : DECODE_MATMUL_MIN_KEYS - 1], v[:, :, : DECODE_MATMUL_MIN_KEYS - 1], None
    )
    grouped_decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert len(routed) == 2  # short caches and bf16 stay on SDPA
