"""BambaConfig: same fields and defaults as transformers, config.json round trip, clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bamba import BambaConfig, preset


def test_defaults_match_transformers():
    import transformers

    ref = json.loads(transformers.BambaConfig().to_json_string())
    ours = json.loads(BambaConfig().to_json_string())
    for key, value in ref.items():
        if key in ("transformers_version",):
            continue
        assert key in ours, key
        assert ours[key] == value, key
    assert BambaConfig().mamba_d_head == 64  # "auto": expand * hidden / heads


def test_round_trip_keeps_unknown_keys(tmp_path):
    cfg = BambaConfig(hidden_size=64, mamba_n_heads=8, num_attention_heads=4, num_key_value_heads=2)
    d = cfg.to_dict()
    d["my_custom_field"] = {"a": 1}
    (tmp_path / "config.json").write_text(json.dumps(d))
    back = BambaConfig.from_json_file(tmp_path / "config.json")
    assert back == cfg and back.extra["my_custom_field"] == {"a": 1}
    assert json.loads(back.to_json_string())["my_custom_field"] == {"a": 1}
    assert back.time_step_limit == (0.0, math.inf)


def test_reads_transformers_and_legacy_layouts(tmp_path):
    import transformers

    ref = transformers.BambaConfig(
        hidden_size=64,
        mamba_n_heads=8,
        attn_layer_indices=[1],
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    ref.rope_parameters["rope_theta"] = 5000.0
    ref.save_pretrained(tmp_path)
    cfg = BambaConfig.from_pretrained(tmp_path)
    assert cfg.rope_theta == 5000.0 and cfg.partial_rotary_factor == 0.5
    assert cfg.layers_block_type == ["mamba", "attention", "mamba"]
    legacy = cfg.to_dict() | {"rope_theta": 20000.0, "time_step_limit": [0.0, float("inf")]}
    del legacy["rope_parameters"]
    assert BambaConfig.from_dict(legacy).rope_theta == 20000.0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(hidden_size=100, num_attention_heads=32), "num_attention_heads"),
        (dict(num_key_value_heads=5), "num_key_value_heads"),
        (dict(mamba_n_heads=100), "mamba_n_heads"),
        (dict(attn_layer_indices=[3, 32]), "attn_layer_indices"),
        (dict(mamba_n_groups=3), "mamba_n_groups"),
        (dict(mamba_d_head=32), "mamba_d_head"),
        (dict(time_step_limit=(0.5, 0.1)), "time_step_limit"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BambaConfig(**kwargs)


def test_bad_config_files(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        BambaConfig.from_json_file(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        BambaConfig.from_json_file(tmp_path / "b.json")
    # wrong JSON types: a string "false" would tie the embeddings; a string eps fails only in the forward
    for field, value, expected in [
        ("tie_word_embeddings", "false", "true or false"),
        ("rms_norm_eps", "1e-5", "a number"),
        ("pad_token_id", 0.5, "an integer or null"),
        ("eos_token_id", ["2"], "an integer, a list of integers, or null"),
        ("attn_layer_indices", [1.7], "a list of integers or null"),  # was read as [1]
        ("attn_layer_indices", "12", "a list of integers or null"),  # was read as [1, 2]
        ("max_position_embeddings", "x", "a positive integer"),
        ("time_step_limit", 5, r"\[min, max\] \(two numbers\) or null"),  # was a bare TypeError
        ("time_step_limit", [0, {"x": 1}], r"\[min, max\]"),
        ("time_step_limit", "ab", r"\[min, max\]"),
        ("time_step_limit", [0.1], r"\[min, max\]"),
    ]:
        (tmp_path / "c.json").write_text(json.dumps({"model_type": "bamba", field: value}))
        with pytest.raises(ValueError, match=f"c.json: BambaConfig.{field}=.* must be {expected}"):
            BambaConfig.from_json_file(tmp_path / "c.json")
    (tmp_path / "d.json").write_text(json.dumps({"model_type": "bamba", "rope_parameters": [1]}))
    with pytest.raises(ValueError, match=r"d.json: rope_parameters=\[1\] is invalid: must be a JSON object"):
        BambaConfig.from_json_file(tmp_path / "d.json")


def test_integer_values_of_float_fields_are_written_as_floats(tmp_path):
    """transformers' strict config refuses `"z_loss_coefficient": 0` where a float is due."""
    import transformers

    cfg = BambaConfig(z_loss_coefficient=0, rms_norm_eps=1, attn_layer_indices=[1], num_hidden_layers=2)
    cfg.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert isinstance(written["z_loss_coefficient"], float) and isinstance(written["rms_norm_eps"], float)
    hf = transformers.BambaConfig.from_pretrained(tmp_path)
    assert hf.z_loss_coefficient == 0.0 and hf.rms_norm_eps == 1.0


def test_presets():
    cfg = preset("bamba-9b")
    assert (cfg.vocab_size, cfg.num_hidden_layers, cfg.attn_layer_indices) == (128256, 32, [9, 18, 27])
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        4096,
        14336,
        32,
        8,
    )
    assert (cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state, cfg.mamba_n_groups) == (128, 64, 128, 1)
    small = preset("bench-small")
    assert small.layers_block_type.count("attention") == 3
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")


def test_explicit_head_dim_is_honoured_as_in_transformers(tmp_path):
    """transformers' attention uses config.head_dim when a config.json sets it (q_proj: heads * head_dim)."""
    from conftest import hf_model

    from bamba import BambaForCausalLM

    ref = hf_model(0, head_dim=16)
    ref.save_pretrained(tmp_path)
    ours = BambaForCausalLM.from_pretrained(str(tmp_path))
    assert ours.config.head_dim == 16 and ours.config.attention_head_dim == 16
    ids = torch.randint(1, 97, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert "head_dim" not in BambaConfig().to_dict()  # derived: not written, as transformers does
    with pytest.raises(ValueError, match="head_dim=0 is invalid"):
        BambaConfig(head_dim=0)
