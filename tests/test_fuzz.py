"""Hostile files (issue 21): a seeded fuzz run over every reader of user files (benchmarks/fuzz_loader.py;
`--cases 10000` is the full campaign), and one test per failure the campaign found, each fixed."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
import sys

import pytest
import torch

import bamba.checkpoint as ckpt
from bamba import BambaConfig, BambaForCausalLM, Tokenizer
from bamba.checkpoint import CheckpointError, SafetensorsFile
from bamba.textfiles import iter_text_files
from bamba.tokenizer import _piece_ends, _training_sequences, train_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import fuzz_loader  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_seeded_fuzz_run_finds_no_crash_hang_memory_blowup_or_wrong_model(tmp_path):
    """Cases dealt over every target; each in a forked worker under RLIMIT_AS and a timeout."""
    records = fuzz_loader.campaign(cases=240, seed=1, timeout=60, memory_gib=2.0, root=str(tmp_path))
    summary = fuzz_loader.summary(records)
    failures = [r for r in records if r["outcome"] in fuzz_loader.FAILURES]
    assert not failures, json.dumps(failures[:5], indent=1)
    assert set(summary["by_target"]) == set(fuzz_loader.TARGETS)
    assert summary["outcomes"]["error"] > 0 and summary["outcomes"]["loaded"] > 0


# ----- a small checkpoint ------------------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path) -> str:
    torch.manual_seed(0)
    BambaForCausalLM(BambaConfig(**fuzz_loader.TINY)).save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


def _header(path: str) -> tuple[dict, bytes]:
    header, _, body = fuzz_loader.read_st(path)
    return header, body


def _write(path: str, header: dict | str, body: bytes) -> None:
    text = header if isinstance(header, str) else json.dumps(header)
    fuzz_loader.write_st(path, text.encode(), body)


def test_a_deeply_nested_header_is_a_named_error_not_a_recursion_error(folder):
    path = os.path.join(folder, "model.safetensors")
    header, body = _header(path)
    name = next(k for k in header if k != "__metadata__")
    text = json.dumps(header).replace(json.dumps(header[name]["shape"]), "[" * 100_000 + "]" * 100_000, 1)
    _write(path, text, body)
    with pytest.raises(
        CheckpointError, match="model.safetensors: corrupt safetensors header: JSON nested too deeply"
    ):
        SafetensorsFile(path)


@pytest.mark.parametrize(
    "fault", ["overlap", "gap", "trailing", "short", "metadata", "nan", "twice", "float"]
)
def test_offsets_and_headers_the_safetensors_library_refuses_are_refused(folder, fault):
    """An offset into another tensor's bytes loaded silently, with wrong weights; the library refuses it,
    and the other faults here, so do we (with the file and tensor named)."""
    from safetensors.torch import load_file

    path = os.path.join(folder, "model.safetensors")
    header, body = _header(path)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    size = lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0]  # noqa: E731
    a, b = next((a, b) for a in names for b in names if a != b and size(a) == size(b))
    text = None
    if fault == "overlap":  # a's bytes are b's: shapes fit, a loads with b's values
        header[a]["data_offsets"] = list(header[b]["data_offsets"])
    elif fault == "gap":
        header[names[-1]]["data_offsets"] = [v + 4 for v in header[names[-1]]["data_offsets"]]
        body += b"\0" * 4
    elif fault == "trailing":
        body += b"\0" * 8
    elif fault == "short":
        body = body[:-4]
    elif fault == "metadata":
        header["__metadata__"] = {"format": None}
    elif fault == "nan":
        header[a]["note"] = float("nan")
    elif fault == "twice":  # a's entry twice in the JSON text, the second pointing at b's bytes
        text = (
            json.dumps(header)[:-1]
            + ", "
            + json.dumps({a: {**header[a], "data_offsets": header[b]["data_offsets"]}})[1:]
        )
    else:
        header[a]["shape"] = [float(d) for d in header[a]["shape"]]
    _write(path, text or header, body)
    with pytest.raises(Exception):  # noqa: B017 (the oracle: whatever the library raises)
        load_file(path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        BambaForCausalLM.from_pretrained(folder)


def test_a_config_with_far_more_layers_than_the_weights_fails_before_building_a_module(folder, monkeypatch):
    """A 3-layer checkpoint whose config said 50,000 layers built all of them first (over a minute)."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["num_hidden_layers"] = 50_000
    with open(path, "w") as f:
        json.dump(config, f)
    built = []
    monkeypatch.setattr(BambaForCausalLM, "__init__", lambda self, *a, **k: built.append(1) or 1 / 0)
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=50000, but the weights hold layers 0\.\.2"):
        BambaForCausalLM.from_pretrained(folder)
    from bamba.info import model_info

    with pytest.raises(CheckpointError, match="num_hidden_layers=50000"):
        model_info(folder)
    assert not built


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rms_norm_eps", float("nan"), "rms_norm_eps=nan is invalid: must be a finite number >= 0"),
        ("rope_parameters", {"rope_theta": -1.0}, "rope_theta=-1.0 is invalid: must be a finite number > 0"),
        (
            "hidden_size",
            2**80,
            "hidden_size=1208925819614629174706176 is invalid: must be a positive integer",
        ),
        ("pad_token_id", 10**6, "pad_token_id=1000000 is invalid: must be a token id"),
        ("mamba_d_head", True, "mamba_d_head=True is invalid"),
        ("vocab_size", 321, r"embed_tokens.weight is \[320, 32\]"),
    ],
)
def test_config_values_that_failed_inside_torch_are_named(folder, field, value, message):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config[field] = value
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=message) as e:
        BambaForCausalLM.from_pretrained(folder)
    assert folder in str(e.value)


@pytest.mark.parametrize(
    "shard", ["../outside/model.safetensors", "/abs/model.safetensors", "..", "a\\..\\b"]
)
def test_a_shard_path_never_leaves_the_folder(tmp_path, shard):
    torch.manual_seed(0)
    model = BambaForCausalLM(BambaConfig(**fuzz_loader.TINY))
    model.save_pretrained(tmp_path / "outside")  # a valid checkpoint the path would reach
    model.save_pretrained(tmp_path / "m", max_shard_size=24_000)
    index = tmp_path / "m" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = sorted(data["weight_map"])[0]
    data["weight_map"][name] = shard.replace("/abs", str(tmp_path / "outside"))
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="is not a file name in the checkpoint folder"):
        BambaForCausalLM.from_pretrained(tmp_path / "m")


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    torch.manual_seed(0)
    BambaForCausalLM(BambaConfig(**fuzz_loader.TINY)).save_pretrained(tmp_path / "m", max_shard_size=24_000)
    index = tmp_path / "m" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    shutil.copy(tmp_path / "m" / first, tmp_path / "m" / "copy.safetensors")
    data["weight_map"]["extra"] = "copy.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="is in both .* and copy.safetensors|is in both copy"):
        BambaForCausalLM.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("generation_config.json", {"eos_token_id": [2, -5]}, "eos_token_id=\\[2, -5\\] is invalid"),
        ("generation_config.json", {"pad_token_id": "0"}, 'pad_token_id="0" is invalid'),
        ("quantization_config.json", None, "expected quant_method 'bamba'"),
    ],
)
def test_generation_and_quantization_configs_are_checked_when_loading(folder, name, value, message):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(value if value is not None else {"quant_method": "gptq", "modules": []}, f)
    with pytest.raises(CheckpointError, match=message):
        BambaForCausalLM.from_pretrained(folder)


def test_bamba_info_names_a_quantization_config_whose_format_does_not_fit_the_weights(folder, capsys):
    """The campaign: an int8 folder whose quantization_config.json says int4 (weights of 32 inputs, not a
    multiple of the group size): from_pretrained named the file, `bamba info` did not."""
    from bamba.cli import main
    from bamba.quantize import quantize

    model = BambaForCausalLM.from_pretrained(folder)
    quantize(model, "int8_weight_only")
    model.save_pretrained(folder)
    path = os.path.join(folder, "quantization_config.json")
    with open(path) as f:
        meta = json.load(f)
    with open(path, "w") as f:
        json.dump({**meta, "format": "int4_weight_only"}, f)
    assert main(["info", folder]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"bamba info: error: {path}: int4 weight (out=")


# ----- tokenizer files and chat templates --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tok")
    fuzz_loader._corpus(str(root / "corpus.txt"))
    train_tokenizer([str(root / "corpus.txt")], 320, str(root / "tok"))
    return str(root / "tok")


@pytest.mark.parametrize(
    "entry, value, message",
    [
        ("added_tokens_decoder", [1], "added_tokens_decoder is invalid"),
        ("added_tokens_decoder", {"x": {"content": "a"}}, "added_tokens_decoder is invalid"),
        ("model_max_length", math.inf, "model_max_length=Infinity is invalid"),
        ("bos_token", 5, "bos_token=5 is invalid"),
        ("chat_template", [1], "chat_template is invalid"),
        ("padding_side", "up", 'padding_side="up" is invalid'),
    ],
)
def test_tokenizer_config_entries_of_the_wrong_type_name_the_file(
    tok_folder, tmp_path, entry, value, message
):
    folder = shutil.copytree(tok_folder, tmp_path / "t")
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config[entry] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"tokenizer_config.json: {message}"):
        Tokenizer.from_pretrained(folder)


@pytest.mark.parametrize(  # (each finite, a few seconds and megabytes, where the bound is not kept)
    "template, message",
    [
        ("{% for i in range(2000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}", "loop iterations"),
        ("{% for i in range(2000) %}{% for j in range(1000) if j < 0 %}{% endfor %}{% endfor %}", "loop"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
        ("{{ 'x' * 5000000 }}", "a repetition of 1 x 5000000"),
        ("{{ 'x'|center(5000000) }}", "the number 5000000"),
        ("{{ '%05000000d' % 1 }}", "a width or precision above"),
        ("{{ 2 ** 10000000 }}", "a power of more than"),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(23) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "more",
        ),
        ("{% for i in range(1000) %}{{ 'x' * 10000 }}{% endfor %}", "an output of more than"),
        ("{{ undefined_function() }}", "failed: UndefinedError"),
        ("{{ ''.__class__.__mro__ }}", "failed: SecurityError"),
        # (the campaign: a sum of 200,000 terms took 20-80 s to lex and parse before it recursed too deeply)
        ("{{ 1" + " + 1" * 20_000 + " }}", "a template of more than 32768 tokens"),
        ("{% raw %}" + "x" * 300_000, "a template of 300009 characters"),
    ],
)
def test_a_chat_template_that_loops_recurses_or_explodes_is_a_named_error(
    tok_folder, tmp_path, template, message
):
    folder = shutil.copytree(tok_folder, tmp_path / "t")
    (folder / "chat_template.jinja").write_text(template)
    tok = Tokenizer.from_pretrained(folder)
    with pytest.raises(ValueError, match=message) as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert str(folder) in str(e.value) or "raise" in template


def test_the_template_bounds_leave_real_templates_alone(tok_folder):
    """The default template renders as before, and so does a long chat (its step budget grows with it)."""
    tok = Tokenizer.from_pretrained(tok_folder)
    chat = [{"role": "user" if i % 2 else "assistant", "content": f"message {i}"} for i in range(3000)]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text.count("<|user|>") == 1500 and text.endswith("message 2999<|eos|>\n")


@pytest.mark.parametrize("beams", ["1", "2"])
def test_generating_from_weights_that_hold_nan_is_a_named_error(tok_folder, tmp_path, capsys, beams):
    """The campaign: a flipped byte of a shard made a weight NaN, and `bamba generate` failed inside
    torch.multinomial ('probability tensor contains either inf, nan or element < 0')."""
    from bamba.cli import main

    folder = shutil.copytree(tok_folder, tmp_path / "m")
    torch.manual_seed(0)
    model = BambaForCausalLM(BambaConfig(**fuzz_loader.TINY))
    with torch.no_grad():
        model.model.final_layernorm.weight[3] = math.nan
    model.save_pretrained(folder)
    rc = main(["generate", "--model", str(folder), "--max-new-tokens", "2", "--num-beams", beams, "Hi"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == (
        f"bamba generate: error: {folder}: the model's next-token scores are NaN or infinite, so there is "
        "nothing to sample from (a weight or an activation is not finite)"
    )


def test_a_template_just_within_the_size_bounds_renders(tok_folder, tmp_path):
    """30,000 tokens and 150,000 characters (the largest of 71 real templates: 2,461 and 16,714)."""
    folder = shutil.copytree(tok_folder, tmp_path / "t")
    (folder / "chat_template.jinja").write_text("{{ 'abcd' }}" * 10_000 + "x" * 30_000)
    tok = Tokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "abcd" * 10_000 + "x" * 30_000


def test_a_long_text_is_encoded_in_pieces_with_the_ids_of_the_whole(tok_folder):
    tok = Tokenizer.from_pretrained(tok_folder)
    rng = random.Random(0)
    words = ["the", "king", "and", "queen", "ünï", "😀", "12345", "'s", "!!", "\t"]
    text = " ".join(rng.choice(words) + rng.choice(["", " ", "  ", "\n"]) for _ in range(60_000))
    assert len(list(_piece_ends(text))) > 3  # (pieces of 65536 characters)
    whole = tok.backend.encode(text, add_special_tokens=False).ids
    assert (
        tok([text, "x"], padding=False, return_tensors=None, add_special_tokens=False)["input_ids"][0]
        == whole
    )


def test_training_a_tokenizer_on_one_enormous_word_is_fast_and_unchanged_elsewhere(tmp_path):
    """A run of 250,000 letters took the BPE trainer two minutes (its time grows with a word's length
    squared); runs are cut at 1,000 characters. Other lines are read as the library reads files."""
    corpus = tmp_path / "c.txt"
    fuzz_loader._corpus(str(corpus))
    corpus.write_bytes(corpus.read_bytes().replace(b"\n", b"\r\n", 20) + b"\xef\xbb\xbflast line no newline")
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    def trained(use_files: bool) -> str:
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<p>"], show_progress=False)
        if use_files:
            backend.train([str(corpus)], trainer)
        else:
            backend.train_from_iterator(_training_sequences([str(corpus)]), trainer)
        return backend.to_str()

    assert trained(True) == trained(False)
    (tmp_path / "a.txt").write_text("word " + "a" * 250_000 + " end\n")
    pieces = list(_training_sequences([str(tmp_path / "a.txt")]))
    assert "".join(pieces) == (tmp_path / "a.txt").read_text() and max(map(len, pieces)) <= 1006
    train_tokenizer([str(tmp_path / "a.txt")], 300, str(tmp_path / "tok"))  # (no longer minutes)


def test_a_deeply_nested_jsonl_line_is_a_named_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:1: JSON nested too deeply"):
        list(iter_text_files([str(path)]))


# ----- trainer_state.pt -----------------------------------------------------------------------------------------
def test_a_resumed_optimizer_state_that_does_not_fit_is_a_named_error(tmp_path):
    """Moments of another shape failed inside AdamW's step (a RuntimeError), after the resume."""
    from bamba.train_state import restore_optimizer

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    state = opt.state_dict()
    state["state"][0]["exp_avg"] = torch.zeros(1000)
    fresh = torch.optim.AdamW(model.parameters())
    saved = {"optimizer": state, "schedule": {}, "max_steps": 1}
    with pytest.raises(
        ValueError, match=r"optimizer state in trainer_state.pt does not fit a parameter of shape \[3, 4\]"
    ):
        restore_optimizer(saved, model, fresh, False, {})
    saved["optimizer"] = {"state": {}, "param_groups": []}
    with pytest.raises(ValueError, match="optimizer state in trainer_state.pt does not fit this model"):
        restore_optimizer(saved, model, torch.optim.AdamW(model.parameters()), False, {})


def test_read_trainer_state_refuses_random_states_that_torch_and_random_would_reject(tmp_path):
    from bamba.train_state import STATE_KEYS, read_trainer_state

    good = {k: 0 for k in STATE_KEYS} | {"schedule": {}, "optimizer": {"state": {}, "param_groups": []}}
    for rng in (
        {"torch": torch.zeros(3, dtype=torch.uint8), "python": random.getstate()},  # wrong length
        {"torch": torch.zeros_like(torch.get_rng_state()), "python": random.getstate()},  # not a valid state
        {"torch": torch.get_rng_state(), "python": (3, (1, 2), None)},  # not a Mersenne Twister state
    ):
        torch.save({**good, "rng": rng}, tmp_path / "trainer_state.pt")
        with pytest.raises(ValueError, match="trainer_state.pt is malformed .*rng should be"):
            read_trainer_state(str(tmp_path))
    torch.save(
        {**good, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
        tmp_path / "trainer_state.pt",
    )
    assert read_trainer_state(str(tmp_path))["step"] == 0


def test_a_pickle_in_trainer_state_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"step": fuzz_loader._Payload(str(marker))}, tmp_path / "trainer_state.pt")
    from bamba.train_state import read_trainer_state

    with pytest.raises(ValueError, match="trainer_state.pt is unreadable or corrupt"):
        read_trainer_state(str(tmp_path))
    assert not marker.exists()


def test_header_length_beyond_the_bound_is_refused_before_reading(folder):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 2**63))
    with pytest.raises(CheckpointError, match="corrupt safetensors header \\(length 9223372036854775808"):
        ckpt.SafetensorsFile(path)


def test_json_we_read_has_no_key_twice_and_no_nesting_past_the_parser():
    """Which of two values for one key counts is a guess (the library and Python take the last one; a
    reader written otherwise takes the first): a file that holds both is refused."""
    from bamba.files import parse_json

    with pytest.raises(
        ValueError, match="x.json: not valid JSON \\(the key 'a' appears twice in one object\\)"
    ):
        parse_json('{"a": 1, "b": {"c": 2}, "a": 3}', "x.json")
    with pytest.raises(ValueError, match="x.json: JSON nested too deeply to read"):
        parse_json("[" * 100_000 + "]" * 100_000, "x.json")
    assert parse_json(b'{"a": [1, {"b": NaN}]}', "x.json")["a"][0] == 1
