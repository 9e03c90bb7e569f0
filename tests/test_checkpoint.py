"""Checkpoint folders: loading transformers' layout, sharding, the hub cache, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY, relative_rms

from bamba import BambaConfig, BambaForCausalLM, BambaModel, HybridMambaAttentionDynamicCache
from bamba.checkpoint import CheckpointError, SafetensorsFile, save_safetensors


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = BambaForCausalLM(BambaConfig(**TINY)).eval()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    return model, folder


def test_sharded_round_trip_and_dtype(saved, tmp_path):
    model, _ = saved
    model.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = BambaForCausalLM.from_pretrained(tmp_path / "sharded")
    ids = torch.randint(1, 97, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)
    bf16 = BambaForCausalLM.from_pretrained(tmp_path / "sharded", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    with torch.no_grad():  # fp32's logits within bf16's rounding (measured: relative RMS 0.0061)
        assert relative_rms(bf16(ids).logits, model(ids).logits) < 0.015
    # saving again with one shard removes the stale shards
    model.save_pretrained(tmp_path / "sharded")
    assert sorted(os.listdir(tmp_path / "sharded")) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def test_base_model_loads_from_causal_lm_checkpoint(saved):
    model, folder = saved
    base = BambaModel.from_pretrained(folder)
    ids = torch.randint(1, 97, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, model.model(ids).last_hidden_state)


def test_our_safetensors_reader_reads_library_files(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).bfloat16()}
    save_file(tensors, tmp_path / "lib.safetensors")
    st = SafetensorsFile(str(tmp_path / "lib.safetensors"))
    for k, v in tensors.items():
        assert torch.equal(st.tensor(k), v)
    save_safetensors(tensors, str(tmp_path / "ours.safetensors"))
    for k, v in load_file(tmp_path / "ours.safetensors").items():
        assert torch.equal(v, tensors[k])


def test_missing_and_unexpected_tensors_are_all_listed(saved, tmp_path):
    _, folder = saved
    st = SafetensorsFile(str(folder / "model.safetensors"))
    tensors = {k: st.tensor(k).clone() for k in st.keys()}
    del tensors["model.layers.0.mamba.A_log"], tensors["lm_head.weight"]
    tensors["model.layers.0.mamba.extra"] = torch.zeros(1)
    save_safetensors(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        BambaForCausalLM.from_pretrained(folder)
    msg = str(e.value)
    assert (
        "model.layers.0.mamba.A_log" in msg
        and "lm_head.weight" in msg
        and "model.layers.0.mamba.extra" in msg
    )


def test_wrong_shape_names_tensor_and_shapes(saved):
    _, folder = saved
    st = SafetensorsFile(str(folder / "model.safetensors"))
    tensors = {k: st.tensor(k).clone() for k in st.keys()}
    tensors["model.layers.2.mamba.D"] = torch.ones(5)
    save_safetensors(tensors, str(folder / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.2\.mamba\.D: expected \[4\], found \[5\]"
    ) as info:
        BambaForCausalLM.from_pretrained(folder)
    assert "missing" not in str(info.value)  # present with the wrong shape: not also listed as missing


def test_truncated_and_corrupt_files(saved):
    _, folder = saved
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        BambaForCausalLM.from_pretrained(folder)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-header!" + data[24:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        BambaForCausalLM.from_pretrained(folder)
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="truncated"):
        BambaForCausalLM.from_pretrained(folder)


def test_missing_shard_and_missing_files(saved, tmp_path):
    model, _ = saved
    model.save_pretrained(tmp_path / "s", max_shard_size="30KB")
    shard = sorted(f for f in os.listdir(tmp_path / "s") if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / "s" / shard)
    with pytest.raises(FileNotFoundError, match=f"missing shard.*{shard}"):
        BambaForCausalLM.from_pretrained(tmp_path / "s")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        BambaForCausalLM.from_pretrained(empty)
    shutil.copy(tmp_path / "s" / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        BambaForCausalLM.from_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        BambaForCausalLM.from_pretrained(str(tmp_path / "does-not-exist"))


def test_bad_config_json(saved):
    _, folder = saved
    (folder / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        BambaForCausalLM.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba2"}))
    with pytest.raises(ValueError, match="model_type is 'mamba2'"):
        BambaForCausalLM.from_pretrained(folder)


def test_token_ids_outside_vocabulary(saved):
    model, _ = saved
    with pytest.raises(ValueError, match=r"token id 97, outside the vocabulary \[0, 97\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))


def test_hub_repo_id_from_cache_offline(saved, tmp_path, monkeypatch):
    model, folder = saved
    cache = tmp_path / "hub"
    snap = cache / "models--ibm-ai-platform--tiny-bamba" / "snapshots" / "abc123"
    shutil.copytree(folder, snap)
    (cache / "models--ibm-ai-platform--tiny-bamba" / "refs").mkdir()
    (cache / "models--ibm-ai-platform--tiny-bamba" / "refs" / "main").write_text("abc123")
    from bamba import Tokenizer
    from bamba.demo import demo_path

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(demo_path(), name), snap / name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = BambaForCausalLM.from_pretrained("ibm-ai-platform/tiny-bamba", cache_dir=str(cache))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    tok = Tokenizer.from_pretrained("ibm-ai-platform/tiny-bamba", cache_dir=str(cache))
    assert tok.encode("ROMEO:") == Tokenizer.from_pretrained(demo_path()).encode("ROMEO:")
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache while offline"):
        BambaForCausalLM.from_pretrained("ibm-ai-platform/not-cached", cache_dir=str(cache))


def test_from_pretrained_takes_config_revision_and_token(saved, tmp_path, monkeypatch):
    """config= stands for the folder's config.json (a dt limit here, which changes the logits as in a
    model built with it); revision= picks that ref's snapshot in the hub cache; token= reaches
    huggingface_hub."""
    import huggingface_hub

    model, folder = saved
    cfg = BambaConfig(**{**TINY, "time_step_limit": (0.0, 0.05)})
    given = BambaForCausalLM.from_pretrained(folder, config=cfg)
    built = BambaForCausalLM(cfg).eval()
    built.load_state_dict(model.state_dict())
    ids = torch.randint(1, 97, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(given(ids).logits, built(ids).logits, atol=0, rtol=0)
        assert not torch.allclose(given(ids).logits, model(ids).logits)  # the limit matters here

    torch.manual_seed(1)
    other = BambaForCausalLM(BambaConfig(**TINY))
    repo = tmp_path / "hub" / "models--org--tiny"
    for commit, m in (("abc123", model), ("def456", other)):
        m.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "refs" / "v2").write_text("def456")
    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = str(tmp_path / "hub")
    v2 = BambaForCausalLM.from_pretrained("org/tiny", cache_dir=cache, revision="v2", token="hf_test")
    assert torch.equal(v2.lm_head.weight, other.lm_head.weight)
    assert calls[-1]["revision"] == "v2" and calls[-1]["token"] == "hf_test"
    main = BambaForCausalLM.from_pretrained("org/tiny", cache_dir=cache)
    assert torch.equal(main.lm_head.weight, model.lm_head.weight) and calls[-1]["revision"] is None


def test_save_pretrained_in_another_dtype(saved, tmp_path):
    """save_pretrained(dtype=...) stores every float tensor in that dtype (the model itself is left as
    it was); loading gives the model cast to it."""
    model, _ = saved
    for dtype in (torch.bfloat16, "float16"):
        out = tmp_path / str(dtype)
        model.save_pretrained(out, dtype=dtype)
        want = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
        stored = SafetensorsFile(str(out / "model.safetensors"))
        assert {stored.entries[name][0] for name in stored.keys()} == {want}
        assert model.dtype == torch.float32
        back = BambaForCausalLM.from_pretrained(out)
        assert back.dtype == want
        for name, t in model.state_dict().items():
            assert torch.equal(back.state_dict()[name], t.to(want)), name


def test_saving_over_a_checkpoint_keeps_it_until_the_new_one_is_written(saved, monkeypatch):
    """A save that fails part way (a full disk) leaves the earlier checkpoint whole and loadable."""
    import bamba.checkpoint as ckpt

    model, folder = saved
    before = sorted(os.listdir(folder))

    def full_disk(tensors, metadata=None):
        def write(f):
            f.write(b"partial")
            raise OSError("no space left on device (simulated)")

        return write

    monkeypatch.setattr(ckpt, "_safetensors_writer", full_disk)
    with pytest.raises(OSError, match="no space left"):
        model.save_pretrained(folder, max_shard_size="30KB")
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == before  # no temporary file left either
    back = BambaForCausalLM.from_pretrained(folder)
    ids = torch.randint(1, 97, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_bad_headers_indexes_and_dtypes_are_named(saved):
    _, folder = saved
    path = folder / "model.safetensors"
    st = SafetensorsFile(str(path))
    tensors = {k: st.tensor(k).clone() for k in st.keys()}
    del st

    def write_header(header: dict | list) -> None:
        blob = json.dumps(header).encode()
        path.write_bytes(len(blob).to_bytes(8, "little") + blob + b"\0" * 64)

    write_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}})
    with pytest.raises(CheckpointError, match="corrupt header entry for tensor 'a'"):
        SafetensorsFile(str(path))
    write_header(["not", "a", "dict"])
    with pytest.raises(CheckpointError, match="corrupt safetensors header \\(a JSON list\\)"):
        SafetensorsFile(str(path))
    tensors["model.layers.2.mamba.D"] = torch.ones(4, dtype=torch.int32)
    save_safetensors(tensors, str(path))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.2\.mamba\.D: expected floating point, found torch\.int32"
    ):
        BambaForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(
        CheckpointError, match="index.json: not a valid safetensors index .*weight_map must map"
    ):
        BambaForCausalLM.from_pretrained(folder)


def test_quantized_folders_load_as_base_models_and_plain_saves_replace_them(saved, tmp_path):
    from bamba import quantize

    model, folder = saved
    q = quantize(BambaForCausalLM.from_pretrained(folder), "int8_weight_only")
    q.save_pretrained(tmp_path / "q")
    base = BambaModel.from_pretrained(tmp_path / "q")  # module names mapped like the tensors'
    ids = torch.randint(1, 97, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(
            base(ids).last_hidden_state, q.model(ids).last_hidden_state, atol=0, rtol=0
        )
    model.save_pretrained(tmp_path / "q")  # a plain model saved over it: no stale quantization_config.json
    assert not (tmp_path / "q" / "quantization_config.json").exists()
    with torch.no_grad():
        back = BambaForCausalLM.from_pretrained(tmp_path / "q")
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)
    (tmp_path / "q" / "quantization_config.json").write_text("[1, 2]")
    with pytest.raises(
        CheckpointError, match="quantization_config.json: expected a JSON object with a 'modules' list"
    ):
        BambaForCausalLM.from_pretrained(tmp_path / "q")


@pytest.mark.parametrize(
    "before, after, new",
    [
        ("1GB", "30KB", "plain"),
        ("30KB", "1GB", "plain"),
        ("30KB", "30KB", "plain"),
        ("1GB", "1GB", "untied"),  # over a tied save: the old config would drop the new lm_head
        ("30KB", "1GB", "int8"),  # a quantization_config.json appears
        ("1GB", "1GB", "eps"),  # the same tensors, a config that reads them differently
    ],
)
def test_a_crash_while_publishing_a_save_never_mixes_two_saves(
    saved, tmp_path, monkeypatch, before, after, new
):
    """Killed at any rename of a save over an earlier one, the folder loads the earlier save or the new one
    whole, or fails to load; it never loads a mix (the new weights read with the old config either), and no
    temporary file is left."""
    import bamba.checkpoint as ckpt
    from bamba import quantize

    old_model, _ = saved
    torch.manual_seed(1)
    new_model = BambaForCausalLM(BambaConfig(**TINY, rms_norm_eps=0.5 if new == "eps" else 1e-5)).eval()
    if new == "untied":
        old_model = BambaForCausalLM(BambaConfig(**TINY, tie_word_embeddings=True)).eval()
    if new == "int8":
        quantize(new_model, "int8_weight_only")
    ids = torch.randint(1, 97, (1, 5))
    with torch.no_grad():
        want = {"old": old_model(ids).logits, "new": new_model(ids).logits}
    real_replace = os.replace
    for crash_at in range(1, 12):
        folder = tmp_path / f"f{crash_at}"
        old_model.save_pretrained(folder, max_shard_size=before)
        calls = []

        def crashing_replace(src, dst, calls=calls, crash_at=crash_at):
            calls.append(dst)
            if len(calls) == crash_at:
                raise KeyboardInterrupt("killed (simulated)")
            real_replace(src, dst)

        monkeypatch.setattr(ckpt.os, "replace", crashing_replace)
        try:
            new_model.save_pretrained(folder, max_shard_size=after)
            crashed = False
        except KeyboardInterrupt:
            crashed = True
        monkeypatch.setattr(ckpt.os, "replace", real_replace)
        assert not [f for f in os.listdir(folder) if f.startswith(".tmp-")]
        try:
            back = BambaForCausalLM.from_pretrained(folder)
        except (CheckpointError, FileNotFoundError):
            assert crashed
            continue
        with torch.no_grad():
            got = back(ids).logits
        assert any(torch.equal(got, w) for w in want.values()), (crash_at, calls)
        if not crashed:
            assert torch.equal(got, want["new"])
            break
    else:
        pytest.fail("the save never ran to its end: more renames than the loop tries")


def test_a_tied_config_with_a_distinct_stored_head_loads_it_untied_as_transformers(saved, tmp_path):
    """config.json says tie_word_embeddings=true, but the file holds an lm_head.weight of its own:
    transformers keeps that head (and warns); so do we, and saving again keeps it."""
    import transformers

    model, folder = saved  # untied, with its own head
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    transformers.logging.set_verbosity_error()
    ref = transformers.BambaForCausalLM.from_pretrained(folder).eval()
    with pytest.warns(UserWarning, match="lm_head.weight differs from model.embed_tokens.weight"):
        ours = BambaForCausalLM.from_pretrained(folder)
    assert not ours.config.tie_word_embeddings and ours.model.config is ours.config
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    ids = torch.randint(1, 97, (1, 6))
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ids).logits, want)
        ours.save_pretrained(tmp_path / "again")
        torch.testing.assert_close(BambaForCausalLM.from_pretrained(tmp_path / "again")(ids).logits, want)


def test_a_tied_checkpoint_holding_only_the_head_loads_as_transformers(saved, tmp_path):
    """A tied checkpoint whose file keeps lm_head.weight and not model.embed_tokens.weight (the other
    copy of the same tensor): transformers loads it; it was refused as missing the embeddings."""
    import transformers
    from safetensors.torch import load_file, save_file

    _, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")  # the tied weight, under the head
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    transformers.logging.set_verbosity_error()
    ref = transformers.BambaForCausalLM.from_pretrained(tmp_path).eval()
    ours = BambaForCausalLM.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(1, 97, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("dtype", [torch.int8, torch.complex64, "int8", torch.bool, 3])
def test_a_non_float_dtype_is_refused_when_saving_and_loading(saved, tmp_path, dtype):
    """torch.int8 used to pass: saving truncated every weight to int8, loading failed deep in torch."""
    model, folder = saved
    with pytest.raises(ValueError, match="is not a floating-point torch dtype"):
        model.save_pretrained(tmp_path / "x", dtype=dtype)
    assert not (tmp_path / "x").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="is not a floating-point torch dtype"):
        BambaForCausalLM.from_pretrained(folder, dtype=dtype)


def test_input_types_are_widened_or_named(saved):
    """Narrow integer ids are widened for the embedding (int16 / uint8 raised deep in torch); wrong types of
    input_ids, labels and inputs_embeds, and a cache of another batch size, are named."""
    model, _ = saved
    ids = torch.randint(1, 97, (2, 5))
    with torch.no_grad():
        expected = model(ids).logits
        for dtype in (torch.int8, torch.int16, torch.uint8, torch.int32):
            torch.testing.assert_close(model(ids.to(dtype)).logits, expected)
        with pytest.raises(TypeError, match="input_ids must be a torch tensor"):
            model([[1, 2, 3]])
        with pytest.raises(
            ValueError, match="input_ids must be an integer tensor, found dtype torch.float32"
        ):
            model(ids.float())
        for labels in (ids.float(), ids.bool()):
            with pytest.raises(ValueError, match="labels must be an integer tensor"):
                model(ids, labels=labels)
        torch.testing.assert_close(model(ids, labels=ids.int()).loss, model(ids, labels=ids).loss)
        embeds = model.model.embed_tokens(ids)
        with pytest.raises(
            ValueError, match="inputs_embeds has dtype torch.float64; expected floating point no wider"
        ):
            model(inputs_embeds=embeds.double())
        cache = HybridMambaAttentionDynamicCache(model.config)
        model(ids, past_key_values=cache)
        with pytest.raises(ValueError, match="past_key_values holds 2 rows; the input has batch size 1"):
            model(ids[:1, :1], past_key_values=cache)
        cache.reset()  # as transformers' reset: a new sequence
        torch.testing.assert_close(model(ids, past_key_values=cache).logits, expected)
        assert cache.get_seq_length() == 5


def test_transformers_loading_keywords_are_applied_or_refused(saved, tmp_path):
    """torch_dtype and device_map (one device) act as dtype and device; any other unknown keyword (a
    typo) is refused: they used to be swallowed as hub download options, silently."""
    _, folder = saved
    assert BambaForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert BambaForCausalLM.from_pretrained(folder, torch_dtype="auto").dtype == torch.float32
    for device_map in ("cpu", "auto" if not torch.cuda.is_available() else "cpu", torch.device("cpu")):
        assert BambaForCausalLM.from_pretrained(folder, device_map=device_map).device.type == "cpu"
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['dytpe'\]"):
        BambaForCausalLM.from_pretrained(folder, dytpe=torch.bfloat16)
    # the same setting spelled two ways is one setting; a one-device dict is that device
    assert (
        BambaForCausalLM.from_pretrained(folder, dtype="bf16", torch_dtype=torch.bfloat16).dtype
        == torch.bfloat16
    )
    one = BambaForCausalLM.from_pretrained(folder, device="cpu", device_map={"": "cpu:0", "lm_head": "cpu"})
    assert one.device.type == "cpu"
    with pytest.raises(TypeError, match="spreads the model over several devices"):
        BambaForCausalLM.from_pretrained(folder, device_map={"model": "cpu", "lm_head": "meta"})
    with pytest.raises(TypeError, match="dtype=torch.float32 and torch_dtype=torch.bfloat16 differ"):
        BambaForCausalLM.from_pretrained(folder, dtype=torch.float32, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"device_map='balanced' is not one device"):
        BambaForCausalLM.from_pretrained(folder, device_map="balanced")
    if not torch.cuda.is_available():
        for kw in (dict(device_map=0), dict(device="cuda")):
            with pytest.raises(ValueError, match="but CUDA is not available on this machine"):
                BambaForCausalLM.from_pretrained(folder, **kw)
    with pytest.raises(TypeError, match=r"group_size=64 applies to quantization='int4_weight_only' only"):
        BambaForCausalLM.from_pretrained(folder, quantization="int8", group_size=64)
    assert BambaForCausalLM.from_pretrained(folder, local_files_only=True).dtype == torch.float32  # hub's
    # the config's and the tokenizer's loaders refuse unknown keywords too (a typo of revision, say)
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['revison'\]"):
        BambaConfig.from_pretrained(folder, revison="main")


def test_quantized_integer_tensors_must_keep_their_dtype(tmp_path):
    """An int32 tensor where an int8 weight is expected was cast silently (wrapping values > 127)."""
    from bamba import quantize

    torch.manual_seed(0)
    cfg = {**TINY, "hidden_size": 64, "intermediate_size": 64}
    quantize(BambaForCausalLM(BambaConfig(**cfg)).eval(), "int8").save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    st = SafetensorsFile(path)
    tensors = {k: st.tensor(k).clone() for k in st.keys()}
    del st
    name = "model.layers.0.feed_forward.up_proj.weight"
    tensors[name] = tensors[name].to(torch.int32)
    save_safetensors(tensors, path)
    with pytest.raises(CheckpointError, match=rf"{name}: expected torch.int8, found torch.int32"):
        BambaForCausalLM.from_pretrained(tmp_path)


def test_max_shard_size_is_read_as_transformers_or_refused_by_name():
    """Decimal and binary units up to T ("1TB" was refused); a float or a size <= 0 gets an error naming
    max_shard_size (a float raised a TypeError from `re`, "0" was taken)."""
    from bamba.checkpoint import parse_size

    sizes = {"5GB": 5 * 10**9, "500MB": 5 * 10**8, "1.5GB": 15 * 10**8, "1TB": 10**12, "1GiB": 2**30}
    assert {k: parse_size(k) for k in sizes} == sizes
    assert parse_size("2TiB") == 2 * 2**40 and parse_size(7) == 7
    assert parse_size("10kb") == 10**4 // 8 and parse_size("5Gb") == 5 * 10**9 // 8  # bits, as transformers
    assert parse_size("64b") == parse_size("64B") == 64  # (no unit: bytes)
    assert parse_size("9007199254740MB") == 9007199254740 * 10**6  # exact (a float lost the last digits)
    for bad, message in [
        (1e9, "found float"),
        (True, "found bool"),
        ("0", "must be > 0"),
        (-3, "must be > 0"),
        ("5 parsecs", "expected a byte count"),
    ]:
        with pytest.raises(ValueError, match=f"max_shard_size=.*{message}"):
            parse_size(bad)


def test_a_save_removes_what_a_killed_save_left(saved, tmp_path):
    """A save killed (SIGKILL) while it wrote left its staged .tmp- files, and later saves kept them (up
    to a checkpoint's size each time); now a save removes those of dead writers on this machine, and
    leaves those of live writers (here: this process's parent) and of other machines."""
    model, _ = saved
    folder = tmp_path / "m"
    code = (
        "import os, sys, bamba.checkpoint as c\n"
        "real = c._safetensors_writer\n"
        "def dying(*a, **k):\n"
        "    write = real(*a, **k)\n"
        "    def w(f):\n"
        "        write(f); f.flush(); os.kill(os.getpid(), 9)\n"
        "    return w\n"
        "c._safetensors_writer = dying\n"
        "from bamba import BambaForCausalLM\n"
        "BambaForCausalLM.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])\n"
    )
    model.save_pretrained(folder)
    src = tmp_path / "src"
    model.save_pretrained(src)
    r = subprocess.run([sys.executable, "-c", code, str(src), str(folder)], capture_output=True)
    assert r.returncode == -9
    left = [f for f in os.listdir(folder) if f.startswith(".tmp-")]
    assert left  # the killed save's staged shard
    from bamba.files import _staging_host_prefix

    live = folder / f"{_staging_host_prefix()}{os.getppid()}-x.safetensors"
    other = folder / ".tmp-another_host-1-x.safetensors"
    for f in (live, other):
        f.write_bytes(b"")
    model.save_pretrained(folder)
    assert sorted(f for f in os.listdir(folder) if f.startswith(".tmp-")) == sorted([live.name, other.name])
    BambaForCausalLM.from_pretrained(folder)
