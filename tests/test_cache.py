"""Cached decoding, chunked prefill, padding and the cache's row operations, against transformers' full
forward (no cache, each row alone) of the same random checkpoint, biases perturbed (conftest.hf_model).

Why not against transformers' own cached or padded runs: in transformers 5.24 (measured on these tiny
models) a cached forward without position_ids restarts the rotary positions at 0 (its `generate` passes
them); a cache of a model without attention layers raises in `get_seq_length`; a decode step ignores
`time_step_limit` (6e-3 off its full forward with (0.05, 0.7)); and in a left-padded batch with
`mamba_proj_bias` the pad tokens' in_proj bias enters the conv window of the first real tokens (4e-3 off
the row alone). Its full forward of an unpadded row has none of these, and it is not our code.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, hf_model

from bamba import BambaConfig, BambaForCausalLM, HybridMambaAttentionDynamicCache

VARIANTS = {
    "base": dict(),
    "proj_bias_groups2": dict(mamba_proj_bias=True, mamba_n_groups=2, attn_layer_indices=[0, 2]),
    "no_attention_dt_limit": dict(attn_layer_indices=None, time_step_limit=(0.05, 0.7)),
    "dt_limit_conv_nobias": dict(time_step_limit=(0.05, 0.7), mamba_conv_bias=False),
    # dt_bias is 0.74-1.63 here, so softplus(dt + dt_bias) ~1.1-1.8: both bounds clamp (0.05 never does)
    "dt_limit_both_bounds": dict(time_step_limit=(1.2, 1.6)),
}
# ours against transformers here: measured at most 2.1e-7 (logits' absmax ~0.5); a 10x margin
TOL = dict(atol=2e-6, rtol=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Factory: variant -> (transformers' model, ours loaded from the folder transformers saved)."""
    made = {}

    def get(variant: str) -> tuple:
        if variant not in made:
            ref = hf_model(0, **VARIANTS[variant])
            folder = tmp_path_factory.mktemp(variant)
            ref.save_pretrained(folder)
            made[variant] = ref, BambaForCausalLM.from_pretrained(str(folder))
        return made[variant]

    return get


def expected(ref, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits of `ids` (b, l): a full forward, no cache, no padding."""
    with torch.no_grad():
        return ref(ids, use_cache=False).logits


def tiny(seed: int = 0, **overrides) -> BambaForCausalLM:
    torch.manual_seed(seed)
    model = BambaForCausalLM(BambaConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # make the SSM parameters non-trivial
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", "D", "bias")) or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_token_by_token_decoding_equals_transformers_full_forward(models, variant, one_thread):
    ref, model = models(variant)
    ids = torch.randint(1, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = HybridMambaAttentionDynamicCache(model.config)
        steps = [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(ids.shape[1])]
    assert cache.get_seq_length() == 21
    torch.testing.assert_close(torch.cat(steps, dim=1), expected(ref, ids), **TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("split", [[7, 14], [1, 12, 3, 5], [20, 1]])
def test_chunked_prefill_equals_transformers_full_forward(models, variant, split, one_thread):
    ref, model = models(variant)
    ids = torch.randint(1, 97, (2, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(ids[:, : split[0]], use_cache=True)
        cache, parts, start = out.past_key_values, [out.logits], split[0]
        for n in split[1:]:
            parts.append(model(ids[:, start : start + n], past_key_values=cache).logits)
            start += n
    torch.testing.assert_close(torch.cat(parts, dim=1), expected(ref, ids), **TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_left_padded_batch_equals_transformers_rows_alone(models, variant, one_thread):
    ref, model = models(variant)
    gen = torch.Generator().manual_seed(3)
    lengths = [13, 5, 1, 9]
    rows = [torch.randint(1, 97, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, use_cache=True)
        # then three decode steps on the padded batch
        nxt = torch.randint(1, 97, (len(rows), 3), generator=gen)
        cache, m, steps = batch.past_key_values, mask, []
        for t in range(3):
            m = torch.cat([m, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
            steps.append(model(nxt[:, t : t + 1], attention_mask=m, past_key_values=cache).logits)
    for i, r in enumerate(rows):
        alone = expected(ref, torch.cat([r, nxt[i]])[None])[0]
        torch.testing.assert_close(batch.logits[i, width - len(r) :], alone[: len(r)], **TOL)
        torch.testing.assert_close(torch.cat([s[i] for s in steps]), alone[len(r) :], **TOL)


def test_left_padded_batch_of_one(models, one_thread):
    ref, model = models("proj_bias_groups2")  # the pads' in_proj bias must stay out of the conv window
    r = torch.randint(1, 97, (6,), generator=torch.Generator().manual_seed(4))
    ids = torch.cat([torch.zeros(4, dtype=torch.long), r])[None]
    mask = torch.cat([torch.zeros(4), torch.ones(6)]).long()[None]
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits[0, 4:]
    torch.testing.assert_close(padded, expected(ref, r[None])[0], **TOL)


def test_position_ids_continue_from_cache_without_being_given(models, one_thread):
    """(transformers' own cached forward restarts them at 0 here: see the module doc)."""
    ref, model = models("base")
    ids = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(ids[:, :6], use_cache=True)
        rest = model(ids[:, 6:], past_key_values=out.past_key_values).logits
    torch.testing.assert_close(rest, expected(ref, ids)[:, 6:], **TOL)


def test_cache_reorder_and_select_rows(models, one_thread):
    """reorder_cache and select_batch keep the rows asked for, in that order: each row's next token then
    gives that row's own logits."""
    ref, model = models("base")
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 97, (3, 8), generator=gen)
    nxt = torch.randint(1, 97, (3, 2), generator=gen)
    full = expected(ref, torch.cat([ids, nxt], dim=1))  # (3, 10, V)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        cache.reorder_cache(torch.tensor([2, 0]))
        step = model(nxt[[2, 0], :1], past_key_values=cache).logits
        torch.testing.assert_close(step, full[[2, 0], 8:9], **TOL)
        cache.select_batch(torch.tensor([False, True]))  # keeps old row 0
        assert cache.batch_size == 1 and cache.key_cache[1].shape == (1, 2, 9, 8)
        step = model(nxt[[0], 1:], past_key_values=cache).logits
        torch.testing.assert_close(step, full[[0], 9:], **TOL)
        cache.select_batch(torch.tensor([0]))  # indices too
        assert cache.batch_size == 1


def test_cache_repeat_interleave_and_move(models, one_thread):
    """batch_repeat_interleave (as for num_return_sequences) gives each copy its row's state, and
    cache.to(device) keeps the states (and their dtypes) where decoding goes on."""
    ref, model = models("base")
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 97, (2, 6), generator=gen)
    nxt = torch.randint(1, 97, (4, 1), generator=gen)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
        assert cache.batch_size == 4
        moved = cache.to("cpu")
        assert moved is cache and cache.ssm_states[0].dtype == torch.float32
        step = model(nxt, past_key_values=cache).logits
    rows = torch.cat([ids[[0, 0, 1, 1]], nxt], dim=1)
    torch.testing.assert_close(step, expected(ref, rows)[:, -1:], **TOL)


def test_cache_without_attention_layers_tracks_length():
    model = tiny(attn_layer_indices=None)
    cache = HybridMambaAttentionDynamicCache(model.config, batch_size=2)
    assert cache.ssm_states[0].shape == (2, 4, 16, 8) and cache.ssm_states[0].dtype == torch.float32
    with torch.no_grad():
        model(torch.randint(1, 97, (2, 5)), past_key_values=cache)
    assert cache.get_seq_length() == 5 and all(k is None for k in cache.key_cache)


def test_cache_to_moves_devices_only():
    """cache.to(device) moves every state (keys, values, conv windows, SSM states) and keeps its dtype; a
    dtype is refused. (The meta device shows a move on a machine without a GPU.)"""
    model = tiny()
    cache = HybridMambaAttentionDynamicCache(model.config)
    with pytest.raises(TypeError, match="moves between devices only; its SSM states stay fp32"):
        cache.to(torch.bfloat16)
    assert cache.to("cpu") is cache
    with torch.no_grad():
        model(torch.randint(1, 97, (2, 5)), past_key_values=cache)

    def states() -> list[torch.Tensor | None]:
        return [*cache.key_cache, *cache.value_cache, *cache.conv_states, *cache.ssm_states]

    dtypes = [None if t is None else t.dtype for t in states()]
    assert cache.to("meta") is cache and cache.batch_size == 2 and cache.get_seq_length() == 5
    assert [None if t is None else t.dtype for t in states()] == dtypes
    moved = [t for t in states() if t is not None]
    assert len(moved) == 2 + 2 * 2  # one attention layer (K, V), two Mamba layers (conv, SSM)
    assert all(t.device.type == "meta" for t in moved)


def test_gradients_through_a_long_prompt_in_eval_mode_and_with_checkpointing():
    """In eval mode a prompt longer than prefill_chunk_size went through the cache in pieces even with
    gradients on, and backward failed on the overwritten states; now it runs whole there. With gradient
    checkpointing, use_cache=True is turned off as transformers does (the recomputation wrote the cache
    twice)."""
    model = tiny()
    model.model.prefill_chunk_size = 4
    ids = torch.randint(1, 97, (2, 13))
    model.zero_grad()
    model(ids, labels=ids).loss.backward()  # eval mode: use_cache defaults to True
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(ids, labels=ids, use_cache=False).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)

    model.train()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.model.gradient_checkpointing
    model.zero_grad()
    calls = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    out = model(ids, labels=ids, use_cache=True)
    out.loss.backward()
    hook.remove()
    assert len(calls) == 2  # the layer ran again in the backward pass: checkpointed
    assert out.past_key_values is None
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)
    with pytest.raises(ValueError, match="gradient checkpointing recomputes the layers"):
        model(ids, past_key_values=HybridMambaAttentionDynamicCache(model.config))
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_review_regressions_of_this_stop():
    """Found in review: backward through a long masked decode step (the in-place nan_to_num broke
    autograd); generate with gradient checkpointing on in train mode (no recomputation without grad);
    bf16 inputs_embeds on an fp32 model (as transformers); return_dict=False on a chunked prompt; the
    output's cache under transformers 5's key "cache"."""
    import dataclasses

    from bamba.model import DECODE_MATMUL_MIN_KEYS, CausalLMOutput

    model = tiny()
    ids = torch.randint(1, 97, (2, DECODE_MATMUL_MIN_KEYS + 3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cache = HybridMambaAttentionDynamicCache(model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    out = model(ids[:, :1], attention_mask=step_mask, past_key_values=cache)
    out.logits.logsumexp(-1).sum().backward()
    assert model.model.embed_tokens.weight.grad is not None

    model.train()
    model.gradient_checkpointing_enable()
    torch.manual_seed(5)
    with_checkpointing = model.generate(ids[:1, :6], max_new_tokens=3)
    model.gradient_checkpointing_disable()
    torch.manual_seed(5)
    assert torch.equal(with_checkpointing, model.generate(ids[:1, :6], max_new_tokens=3))
    model.eval()

    with torch.no_grad():
        embeds = model.model.embed_tokens(ids[:, :5])
        low = model(inputs_embeds=embeds.bfloat16()).logits  # the first norm's output is rounded to bf16
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, model(inputs_embeds=embeds).logits, atol=1e-2, rtol=1e-2)
        model.model.prefill_chunk_size = 4
        h, c = model.model(ids[:, :9], return_dict=False)
        assert isinstance(h, torch.Tensor) and h.shape == (2, 9, 32) and c.get_seq_length() == 9
        out = model(ids[:, :5])
        assert out.keys() == ["logits", "cache"] and out.get("cache") is out.cache is out.past_key_values
        assert "cache" in out and "past_key_values" in out and out["past_key_values"] is out.cache
        # built, replaced and assigned under either name, as before and as in transformers
        assert dataclasses.replace(out, past_key_values=None).cache is None
        again = CausalLMOutput(logits=out.logits, past_key_values=out.cache)
        again.cache = None
        assert again.past_key_values is None and again.keys() == ["logits"]
        bf16 = tiny().to(torch.bfloat16)
        with pytest.raises(
            ValueError, match="inputs_embeds has dtype torch.float32; expected floating point"
        ):
            bf16(inputs_embeds=embeds)  # fp32 into bf16 weights: a clear error, not a matmul's
