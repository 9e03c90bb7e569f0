"""Parity with transformers (the oracle): tiny random models saved by transformers, loaded by our loader."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model, relative_rms

from bamba import BambaForCausalLM

CONFIGS = {
    "base": dict(),
    "groups2_chunk5": dict(mamba_n_groups=2, mamba_chunk_size=5),
    "no_attention": dict(attn_layer_indices=None),
    "attn_first_last": dict(attn_layer_indices=[0, 2]),
    "tied_projbias_noconvbias": dict(tie_word_embeddings=True, mamba_proj_bias=True, mamba_conv_bias=False),
    "finite_dt_limit": dict(time_step_limit=(0.05, 0.6)),
    "zloss_long_chunk": dict(z_loss_coefficient=1e-3, mamba_chunk_size=64),
    "mha_dstate16": dict(num_key_value_heads=4, mamba_d_state=16, mamba_n_heads=8),
    "attention_mlp_bias": dict(attention_bias=True, mlp_bias=True, mamba_proj_bias=True),
}


def assert_logits_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("length", [3, 23])
def test_logits_loss_hidden_states_match_transformers(hf_folder, name, length):
    ref_model, folder = hf_folder(seed=length, **CONFIGS[name])
    ours = BambaForCausalLM.from_pretrained(folder)
    torch.manual_seed(length)
    ids = torch.randint(1, 97, (2, length))
    labels = ids.clone()
    labels[0, : length // 2] = -100
    with torch.no_grad():
        ref = ref_model(ids, labels=labels, output_hidden_states=True, use_cache=False)
        out = ours(ids, labels=labels, output_hidden_states=True)
    assert_logits_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_as_close_to_fp32_as_transformers(hf_folder, dtype, one_thread):
    """A whole model loaded in bf16 / fp16 on the CPU: its logits are as close to transformers' fp32 ones
    as transformers' own in that dtype. Measured over six tiny models: relative RMS 0.0049-0.0098 (bf16),
    0.0006-0.0011 (fp16), 0.98-1.02x transformers'; the bound allows 1.1x."""
    ref_model, folder = hf_folder(seed=3, mamba_proj_bias=True, attention_bias=True)
    ids = torch.randint(3, 97, (2, 21), generator=torch.Generator().manual_seed(3))
    ours = BambaForCausalLM.from_pretrained(folder, dtype=dtype)
    with torch.no_grad():
        want = ref_model(ids, use_cache=False).logits
        theirs = ref_model.to(dtype)(ids, use_cache=False).logits
        got = ours(ids).logits
    assert got.dtype == dtype
    assert relative_rms(got, want) <= 1.1 * relative_rms(theirs, want), (got - want).abs().max()


def test_z_loss_is_added(hf_folder):
    ref_model, folder = hf_folder(z_loss_coefficient=0.5)
    ours = BambaForCausalLM.from_pretrained(folder)
    ids = torch.randint(1, 97, (1, 9))
    with torch.no_grad():
        with_z = ours(ids, labels=ids).loss
        ours.config.z_loss_coefficient = 0.0
        without = ours(ids, labels=ids).loss
        ref = ref_model(ids, labels=ids, use_cache=False).loss
    torch.testing.assert_close(with_z, ref)
    assert with_z > without + 1.0  # logsumexp^2 ~ log(97)^2 ~ 21, times 0.5


def test_logits_to_keep_and_attentions(hf_folder):
    import transformers

    ref_model, folder = hf_folder()
    ours = BambaForCausalLM.from_pretrained(folder)
    ids = torch.randint(1, 97, (2, 11))
    with torch.no_grad():
        full = ours(ids).logits
        last2 = ours(ids, logits_to_keep=2).logits
        picked = ours(ids, logits_to_keep=torch.tensor([0, 5])).logits
        eager = transformers.BambaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        ref_attn = eager(ids, output_attentions=True, use_cache=False).attentions
        attn = ours(ids, output_attentions=True).attentions
    assert last2.shape == (2, 2, 97)
    torch.testing.assert_close(last2, full[:, -2:])
    torch.testing.assert_close(picked, full[:, [0, 5]])
    assert len(attn) == len(ref_attn) == 1
    torch.testing.assert_close(attn[0], ref_attn[0], atol=1e-5, rtol=1e-4)


def test_save_then_transformers_loads_same_logits(tmp_path):
    import transformers

    from bamba import BambaConfig

    cfg = BambaConfig(**{**__import__("conftest").TINY, "tie_word_embeddings": True})
    torch.manual_seed(0)
    ours = BambaForCausalLM(cfg).eval()
    ours.save_pretrained(tmp_path / "ours", max_shard_size=20_000)  # forces several shards
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    ref = transformers.BambaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(1, 97, (2, 13))
    with torch.no_grad():
        assert_logits_close(ours(ids).logits, ref(ids, use_cache=False).logits)
    back = BambaForCausalLM.from_pretrained(tmp_path / "ours")
    for (k, a), (k2, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_initialization_matches_transformers_scheme():
    from conftest import TINY

    from bamba import BambaConfig

    torch.manual_seed(0)
    m = BambaForCausalLM(BambaConfig(**TINY))
    mixer = m.model.layers[0].mamba
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1, 5).float()))
    assert torch.equal(mixer.D, torch.ones(4)) and torch.equal(mixer.dt_bias, torch.ones(4))
    assert torch.equal(m.model.embed_tokens.weight[0], torch.zeros(32))  # padding row
    w = m.model.layers[2].feed_forward.up_proj.weight
    assert abs(w.std().item() - 0.02) < 0.004 and abs(w.mean().item()) < 0.003
    hf = hf_model(0)
    ours_keys = {k: v.shape for k, v in m.state_dict().items()}
    ref_keys = {k: v.shape for k, v in hf.state_dict().items()}
    assert ours_keys == ref_keys


def test_logits_to_keep_2d_and_tuple_outputs_as_transformers(hf_folder):
    """2-D logits_to_keep (positions per row, or a bool mask), return_dict=False and the output's
    mapping behaviour, as transformers'."""
    ref_model, folder = hf_folder()
    ours = BambaForCausalLM.from_pretrained(folder)
    ids = torch.randint(1, 97, (2, 9))
    rows = torch.tensor([[0, 1], [2, 3]])
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 3], mask[1, 1], mask[1, 8] = True, True, True
    with torch.no_grad():
        for keep in (rows, mask):
            expected = ref_model(ids, logits_to_keep=keep, use_cache=False).logits
            got = ours(ids, logits_to_keep=keep).logits
            assert got.shape == expected.shape
            assert_logits_close(got, expected)
        ref = ref_model(ids, labels=ids, use_cache=False, return_dict=False)
        out = ours(ids, labels=ids, use_cache=False, return_dict=False)
        mapping = ours(ids, labels=ids, use_cache=False)
        base = ours.model(ids, use_cache=False, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref) == 2
    torch.testing.assert_close(out[0], ref[0])
    assert_logits_close(out[1], ref[1])
    assert isinstance(base, tuple) and len(base) == 1
    assert len(mapping) == 2 and "logits" in mapping and "past_key_values" not in mapping
    assert list(mapping) == ["loss", "logits"] and mapping.get("attentions", 7) == 7
    assert torch.equal(dict(mapping.items())["logits"], mapping.logits)
    with pytest.raises(ValueError, match=r"logits_to_keep=-2: an int must be >= 0"):
        ours(ids, logits_to_keep=-2)  # transformers would drop the first two positions


def test_odd_rotary_dims_as_transformers(hf_folder):
    """head_dim 10 with partial_rotary_factor 0.5: 5 rotary dims, of which transformers rotates 6."""
    ref_model, folder = hf_folder(hidden_size=40, num_attention_heads=4, num_key_value_heads=2)
    ours = BambaForCausalLM.from_pretrained(folder)
    assert ours.config.rotary_dim == 5
    ids = torch.randint(1, 97, (2, 11))
    with torch.no_grad():
        assert_logits_close(ours(ids).logits, ref_model(ids, use_cache=False).logits)
