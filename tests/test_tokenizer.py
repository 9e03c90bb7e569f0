"""Tokenizer tests: parity with transformers' AutoTokenizer on tokenizers built here, streaming decode, errors."""

import json
import random

import jinja2
import pytest
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from bamba.tokenizer import Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

WORDS = (
    "the a of and to in is was he she it they we you that with for on as at by this from but not or his her "
    "king queen lord lady sword crown castle river forest night day light dark love death time world heart "
    "naïve café déjà vu über señor garçon fiancée Ångström"
).split()

TEXTS = [
    "Hello world, the king is dead.",
    "naïve café — déjà vu über señor",
    "CJK 你好世界 and emoji 🎉👍🏽 mixed in",
    "  leading spaces, tabs\tand\nnewlines  ",
    "Special tokens inline: <|bos|> and <|eos|> and <|pad|>.",
    "",
]

# The pre-tokenizer split of Llama 3's tokenizer.json.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Indented over several lines, so trim_blocks / lstrip_blocks matter as they do for real templates.
LLAMA3_TEMPLATE = """{{- bos_token -}}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) -}}
    {% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim -}}
    {% if 'tool_calls' in message %}
        {{- '[tool calls]' -}}
    {% endif %}
    {{- '<|eot_id|>' -}}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{% endif %}
"""
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Who is the king?  "},
    {"role": "assistant", "content": "The king is dead. 👑", "tool_calls": None},
]


def _corpus_lines(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(_corpus_lines()), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("trained")
    train_tokenizer([corpus], vocab_size=400, out_dir=str(out))
    return str(out)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> str:
    """A Llama-3-style folder: split regex + byte-level BPE, BOS/EOS as added tokens after the BPE vocab."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(_corpus_lines(300, seed=1), trainer)
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos}:1 $B:1",
                special_tokens=[(bos, backend.token_to_id(bos))],
            ),
        ]
    )
    out = tmp_path_factory.mktemp("llama3")
    backend.save(str(out / "tokenizer.json"))
    added = {
        str(backend.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in specials
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": bos,
        "eos_token": "<|end_of_text|>",
        "clean_up_tokenization_spaces": True,  # as in Llama 3; transformers ignores it for BPE
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(out)


def _hf(folder: str):
    return transformers.AutoTokenizer.from_pretrained(folder)


def _assert_encode_decode_parity(ours: Tokenizer, hf, texts: list[str]) -> None:
    assert ours.vocab_size == len(hf)
    for text in texts:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special), (text, special)
        ids = ours.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (
                text
            )


# ---- training ---------------------------------------------------------------------------------------------------


def test_train_tokenizer_layout_and_special_ids(trained):
    ours = Tokenizer.from_pretrained(trained)
    assert ours.vocab_size == 400
    assert (ours.pad_token, ours.bos_token, ours.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id) == (0, 1, 2)
    assert ours.add_bos_token
    assert ours.encode("the king")[0] == 1 and 1 not in ours.encode("the king", add_special_tokens=False)
    # Training learned merges: a frequent word is one token, not one per byte.
    assert len(ours.encode(" king", add_special_tokens=False)) == 1
    config = json.loads(open(f"{trained}/tokenizer_config.json", encoding="utf-8").read())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["clean_up_tokenization_spaces"] is False
    assert config["model_max_length"] == ours.model_max_length
    special_map = json.loads(open(f"{trained}/special_tokens_map.json", encoding="utf-8").read())
    assert special_map == {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


def test_train_tokenizer_is_deterministic(corpus, tmp_path):
    train_tokenizer([corpus], vocab_size=400, out_dir=str(tmp_path / "a"))
    train_tokenizer([corpus], vocab_size=400, out_dir=str(tmp_path / "b"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_train_tokenizer_rejects_bad_arguments(corpus, tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer([corpus], vocab_size=100, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="pad, bos, eos"):
        train_tokenizer([corpus], vocab_size=400, out_dir=str(tmp_path), special_tokens=("<a>", "<b>"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer([str(tmp_path / "nope.txt")], vocab_size=400, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="min_frequency=-1 must be an integer >= 0"):
        train_tokenizer([corpus], vocab_size=400, out_dir=str(tmp_path), min_frequency=-1)
    with pytest.raises(ValueError, match="vocab_size=30000000000 must be an integer <= 16777216"):
        train_tokenizer([corpus], vocab_size=30_000_000_000, out_dir=str(tmp_path))  # aborted the process
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8 text \\(near byte 3"):
        train_tokenizer([str(latin1)], vocab_size=400, out_dir=str(tmp_path))


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--min-frequency", "-1", "min_frequency=-1 must be"),
        ("--vocab-size", "30000000000", "vocab_size=30000000000"),
    ],
)
def test_train_tokenizer_command_rejects_bad_numbers_in_one_line(
    corpus, tmp_path, capsys, option, value, message
):
    from bamba.cli import main

    args = ["train-tokenizer", corpus, "--vocab-size", "400", "--out", str(tmp_path / "tok"), option, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


# ---- parity with transformers -------------------------------------------------------------------------------------


def test_trained_parity_with_transformers(trained):
    ours, hf = Tokenizer.from_pretrained(trained), _hf(trained)
    _assert_encode_decode_parity(ours, hf, TEXTS)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
    )


def test_batch_left_padding_matches_transformers(trained):
    ours, hf = Tokenizer.from_pretrained(trained), _hf(trained)
    texts = ["the king", "a much longer line about the queen and her castle", "你好"]
    got = ours(texts)
    want = hf(texts, padding=True, padding_side="left", return_tensors="pt")
    torch.testing.assert_close(got["input_ids"], want["input_ids"])
    torch.testing.assert_close(got["attention_mask"], want["attention_mask"])
    assert got["input_ids"].dtype == torch.long
    first = got["input_ids"][0]
    n_pad = len(first) - len(ours.encode(texts[0]))
    assert n_pad > 0 and first[:n_pad].tolist() == [ours.pad_token_id] * n_pad
    assert got["attention_mask"][0].tolist() == [0] * n_pad + [1] * (len(first) - n_pad)
    assert ours.batch_decode(got["input_ids"], skip_special_tokens=True) == texts

    right = ours(texts, padding_side="right", return_tensors=None)
    assert right["input_ids"][0][: len(ours.encode(texts[0]))] == ours.encode(texts[0])
    with pytest.raises(ValueError, match="different lengths"):
        ours(texts, padding=False)


def test_llama3_style_parity_with_transformers(llama3):
    ours, hf = Tokenizer.from_pretrained(llama3), _hf(llama3)
    texts = TEXTS + ["<|begin_of_text|>already there", "Hello , world . I don 't know 's 12345 ok"]
    _assert_encode_decode_parity(ours, hf, texts)
    assert ours.bos_token_id == hf.bos_token_id == ours.token_to_id("<|begin_of_text|>")
    assert ours.encode("hi")[0] == ours.bos_token_id and ours.add_bos_token
    assert ours.pad_token is None and ours.pad_token_id is None
    # clean_up_tokenization_spaces is set but not applied to BPE: spaces before punctuation survive.
    text = "Hello , world . I don 't"
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


def test_llama3_batch_pads_with_eos_without_pad_token(llama3):
    ours = Tokenizer.from_pretrained(llama3)
    batch = ours(["a", "the king is dead"])
    eos = ours.eos_token_id
    short = ours.encode("a")
    n_pad = batch["input_ids"].shape[1] - len(short)
    assert batch["input_ids"][0].tolist() == [eos] * n_pad + short
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(short), len(ours.encode("the king is dead"))]


def test_special_tokens_from_config_and_map_like_transformers(trained, tmp_path):
    """A pad token missing from tokenizer.json is added; special_tokens_map.json overrides the config."""
    tokenizer_json = json.loads(open(f"{trained}/tokenizer.json", encoding="utf-8").read())
    tokenizer_json["post_processor"] = None  # without a post-processor nothing is added, add_bos_token or not
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    config = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<new_pad>", "add_bos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|pad|>"}}))
    ours, hf = Tokenizer.from_pretrained(tmp_path), _hf(str(tmp_path))
    assert ours.eos_token == hf.eos_token == "<|pad|>"
    assert ours.pad_token_id == hf.pad_token_id == 400  # appended after the trained vocab
    assert not ours.add_bos_token
    _assert_encode_decode_parity(ours, hf, TEXTS + ["x<new_pad>y"])


def test_clean_up_tokenization_spaces_applies_to_non_bpe(tmp_path):
    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", ",", "world", ".", "don", "'t"])}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"unk_token": "[UNK]", "clean_up_tokenization_spaces": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours, hf = Tokenizer.from_pretrained(tmp_path), _hf(str(tmp_path))
    ids = ours.encode("hello, world. zzz")
    assert ids == hf.encode("hello, world. zzz") == [1, 2, 3, 4, 0]
    assert ours.decode(ids) == hf.decode(ids) == "hello, world. [UNK]"


def test_save_pretrained_round_trip(llama3, tmp_path):
    ours = Tokenizer.from_pretrained(llama3)
    ours.chat_template = LLAMA3_TEMPLATE
    ours.save_pretrained(tmp_path)
    again, hf = Tokenizer.from_pretrained(tmp_path), _hf(str(tmp_path))
    _assert_encode_decode_parity(again, hf, TEXTS)
    assert again.encode(TEXTS[2]) == ours.encode(TEXTS[2])
    assert again.config["model_input_names"] == ["input_ids", "attention_mask"]  # unknown keys kept
    assert again.model_max_length == 131072
    assert again.apply_chat_template(CHAT, tokenize=False) == hf.apply_chat_template(CHAT, tokenize=False)


# ---- chat template ----------------------------------------------------------------------------------------------


def test_chat_template_matches_transformers(trained):
    ours, hf = Tokenizer.from_pretrained(trained), _hf(trained)
    for gen in (False, True):
        text = ours.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=False)
        assert text == hf.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=False)
        ids = ours.apply_chat_template(CHAT, add_generation_prompt=gen, return_dict=False)
        assert ids == hf.apply_chat_template(CHAT, add_generation_prompt=gen)["input_ids"]
    assert text.startswith("<|bos|><|system|>\nYou are terse.<|eos|>\n") and text.endswith("<|assistant|>\n")
    assert ids.count(ours.bos_token_id) == 1


def test_chat_template_outputs_and_arguments_match_transformers(trained, llama3, tmp_path):
    ours, hf = Tokenizer.from_pretrained(trained), _hf(trained)
    short = [{"role": "user", "content": "Who?"}]
    # transformers 5: tokenize=True and return_dict=True by default
    assert ours.apply_chat_template(CHAT) == dict(hf.apply_chat_template(CHAT))
    for kw in (
        dict(return_dict=False),
        dict(tokenize=False, continue_final_message=True),
        dict(return_dict=False, continue_final_message=True),
        dict(tokenize=False, answer="42"),  # any other keyword is a template variable
        dict(tokenize=False, chat_template="{{ messages[0]['role'] }}|{{ answer }}", answer="42"),
    ):
        assert ours.apply_chat_template(CHAT, **kw) == hf.apply_chat_template(CHAT, **kw), kw
    for kw in (dict(return_dict=False), dict(tokenize=False), dict(padding=True)):  # a list of chats
        expected = hf.apply_chat_template([CHAT, short], **kw)
        assert ours.apply_chat_template([CHAT, short], **kw) == (
            dict(expected) if "padding" in kw else expected
        )
    got, expected = (t.apply_chat_template(CHAT, return_tensors="pt") for t in (ours, hf))
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    got = ours.apply_chat_template([CHAT, short], padding=True, return_tensors="pt", return_dict=False)
    assert torch.equal(
        got, hf.apply_chat_template([CHAT, short], padding=True, return_tensors="pt", return_dict=False)
    )
    with pytest.raises(ValueError, match="exclude each other"):
        ours.apply_chat_template(CHAT, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ValueError, match="truncation is not supported"):
        ours.apply_chat_template(CHAT, truncation=True, max_length=4)
    # a template that trims the message: the continued text is cut before the trimmed spaces, as transformers
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(open(f"{llama3}/{name}", "rb").read())
    (tmp_path / "chat_template.jinja").write_text(LLAMA3_TEMPLATE, encoding="utf-8")
    ours, hf = Tokenizer.from_pretrained(tmp_path), _hf(str(tmp_path))
    chat = [*CHAT[:2], {"role": "assistant", "content": "The king is  "}]
    kw = dict(tokenize=False, continue_final_message=True)
    assert ours.apply_chat_template(chat, **kw) == hf.apply_chat_template(chat, **kw)
    assert ours.apply_chat_template(chat, **kw).endswith("The king is")


def test_decode_of_a_batch_gives_a_list_as_transformers(trained):
    ours, hf = Tokenizer.from_pretrained(trained), _hf(trained)
    ids = ours(["the king is dead", "a queen"], padding_side="right")["input_ids"]  # (2, L) tensor
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids.tolist(), skip_special_tokens=skip) == hf.decode(
            ids.tolist(), skip_special_tokens=skip
        )
    assert ours.decode(ids[0, 1]) == hf.decode(ids[0, 1])  # a 0-d tensor: one token
    rows = [ids[0, :3], ids[1, :2]]  # a list of 1-d tensors: a batch too
    assert ours.decode(rows) == hf.decode(rows)
    assert ours.decode([]) == hf.decode([]) == ""


def test_chat_template_jinja_file(llama3, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(open(f"{llama3}/{name}", "rb").read())
    (tmp_path / "chat_template.jinja").write_text(LLAMA3_TEMPLATE, encoding="utf-8")
    ours, hf = Tokenizer.from_pretrained(tmp_path), _hf(str(tmp_path))
    text = ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
    )
    assert "Who is the king?<|eot_id|>" in text  # `trim` applied
    assert "[tool calls]" not in text  # `tool_calls: None` is dropped, as transformers does
    ids = ours.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    assert ids[:2] == [ours.bos_token_id, ours.token_to_id("<|start_header_id|>")]
    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_saving_keeps_a_chat_template_jinja_file_current(llama3, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(open(f"{llama3}/{name}", "rb").read())
    (tmp_path / "chat_template.jinja").write_text("OLD {{ messages[0]['content'] }}", encoding="utf-8")
    tok = Tokenizer.from_pretrained(tmp_path)
    tok.chat_template = "NEW {{ messages[0]['content'] }}"
    tok.save_pretrained(tmp_path)  # the file loading prefers must not bring the old template back
    assert (
        Tokenizer.from_pretrained(tmp_path).apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False
        )
        == "NEW hi"
    )
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()
    assert Tokenizer.from_pretrained(tmp_path).chat_template is None  # nor in tokenizer_config.json


def test_missing_chat_template_raises(llama3):
    ours = Tokenizer.from_pretrained(llama3)
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(CHAT)


# ---- streaming decode -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["trained", "llama3"])
def test_decode_stream_never_emits_partial_characters(fixture, request):
    ours = Tokenizer.from_pretrained(request.getfixturevalue(fixture))
    text = "naïve café — 你好世界 🎉👍🏽 Ångström, done."
    ids = ours.encode(text)
    # The corpus has no CJK / emoji: some tokens hold only part of a character's bytes.
    assert any("\ufffd" in ours.decode([i]) for i in ids)
    for skip in (False, True):
        stream = ours.stream_decoder(skip_special_tokens=skip)
        pieces = [stream.step(i) for i in ids]
        pieces.append(stream.flush())
        assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces).endswith(text)
        # Each multi-byte character comes out whole, in one piece.
        for ch in "你好世界🎉ï":
            assert any(ch in p for p in pieces), ch
    assert pieces[-1] == ""  # nothing left to flush once the text ends on a whole character


def test_decode_stream_holds_back_until_character_completes(trained):
    ours = Tokenizer.from_pretrained(trained)
    ids = ours.encode("a🎉", add_special_tokens=False)
    assert len(ids) == 5  # "a" + the four bytes of the emoji
    stream = ours.stream_decoder()
    assert [stream.step(i) for i in ids] == ["a", "", "", "", "🎉"]
    # A stream cut inside a character: flush hands back the rest as decode() does, with U+FFFD.
    stream = ours.stream_decoder()
    emitted = [stream.step(i) for i in ids[:3]]
    assert emitted == ["a", "", ""]
    rest = stream.flush()
    assert rest == ours.decode(ids[:3])[1:] and "\ufffd" in rest


def test_decode_stream_with_sentencepiece_style_decoder():
    """Llama-2 style: byte-fallback BPE whose decoder strips the leading space of every decode call.

    Decoding only the new ids would lose the space before each word; the stream's context window keeps it.
    """
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    merges = [("\u2581", c) for c in letters]
    for piece in ["\u2581", *letters, *("\u2581" + c for c in letters)]:
        vocab[piece] = len(vocab)
    backend = BackendTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    ours = Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    text = "the king said 你好 to me"
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    assert ours.id_to_token(ids[-10]).startswith("<0x")  # CJK falls back to bytes
    stream = ours.stream_decoder()
    pieces = [stream.step(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert " k" in pieces and "你" in pieces and "\ufffd" not in "".join(pieces)


# ---- errors -----------------------------------------------------------------------------------------------------


def test_missing_tokenizer_json_names_folder_and_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value) and "tokenizer.json" in str(info.value)


def test_missing_local_folder_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        Tokenizer.from_pretrained(str(tmp_path / "does" / "not" / "exist"))


def test_malformed_files_are_named(trained, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(open(f"{trained}/{name}", "rb").read())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json: expected a JSON object, found a JSON list"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "tokenizer.json").write_text(
        '{"version": "1.0", "model": {"type": "BPE", "vocab', encoding="utf-8"
    )
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


# ---- review of stop 13: named templates, generation blocks, named extra tokens, call arguments -------------


def _copy_llama3(llama3: str, dest, **config_updates) -> str:
    config = json.loads(open(f"{llama3}/tokenizer_config.json", encoding="utf-8").read())
    config.update(config_updates)
    (dest / "tokenizer.json").write_bytes(open(f"{llama3}/tokenizer.json", "rb").read())
    (dest / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(dest)


def test_named_chat_templates_as_transformers(llama3, tmp_path):
    """Named templates are picked by name, "tool_use" when tools are given, and saved so that both
    libraries read them back (only "default" was kept, and chat_template="tool_use" was taken as the text
    of a template)."""
    templates = [
        {"name": "default", "template": "DEFAULT:{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "TOOLS:{{ (tools or []) | length }}:{{ messages[0]['content'] }}"},
    ]
    (tmp_path / "a").mkdir()
    folder = _copy_llama3(llama3, tmp_path / "a", chat_template=templates)
    msg = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}
    ours, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    for kw in (
        dict(),
        dict(chat_template="tool_use"),
        dict(tools=[tool]),
        dict(chat_template="default", tools=[tool]),
    ):
        assert ours.apply_chat_template(msg, tokenize=False, **kw) == hf.apply_chat_template(
            msg, tokenize=False, **kw
        )
    assert ours.apply_chat_template(msg, tokenize=False, tools=[tool]) == "TOOLS:1:hi"
    ours.save_pretrained(tmp_path / "saved")
    for again in (Tokenizer.from_pretrained(tmp_path / "saved"), _hf(str(tmp_path / "saved"))):
        assert (
            again.apply_chat_template(msg, tokenize=False, chat_template="tool_use", tools=[]) == "TOOLS:0:hi"
        )
    # transformers 5's own layout: additional_chat_templates/<name>.jinja
    hf.save_pretrained(tmp_path / "hf")
    assert Tokenizer.from_pretrained(tmp_path / "hf").named_chat_templates == {
        "tool_use": templates[1]["template"]
    }


def test_generation_blocks_and_named_extra_tokens_in_templates_as_transformers(llama3, tmp_path):
    template = (
        "{{ image_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{% endgeneration %}{% else %}<{{ m['content'] }}>{% endif %}{% endfor %}"
    )
    folder = _copy_llama3(
        llama3, tmp_path, chat_template=template, extra_special_tokens={"image_token": "<image>"}
    )
    ours, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = ours.apply_chat_template(chat, tokenize=False)
    assert text == hf.apply_chat_template(chat, tokenize=False) == "<image><hi>yo"
    assert ours.image_token == hf.image_token == "<image>"
    assert ours.image_token_id == hf.image_token_id == ours.token_to_id("<image>")
    with pytest.raises(AttributeError, match="no attribute 'video_token'"):
        _ = ours.video_token


def test_reasoning_fields_and_content_blocks_in_templates_as_transformers(llama3, tmp_path):
    """A message's reasoning reaches templates under all its names (a Qwen-style template reads
    reasoning_content, a gpt-oss-style one thinking), and continue_final_message continues the last text
    block of a content list, or a reasoning field, as transformers 5 does (these rendered nothing, or were
    refused)."""
    template = (
        "{% for m in messages %}<{{ m['role'] }}>"
        "{% if m.reasoning_content %}[r:{{ m.reasoning_content }}]{% endif %}"
        "{% if m.thinking %}[t:{{ m.thinking }}]{% endif %}"
        "{% if m.content is string %}{{ m.content }}{% else %}"
        "{% for b in m.content %}{% if b.text %}{{ b.text }}|{% endif %}{% endfor %}{% endif %}"
        "</{{ m['role'] }}>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    folder = _copy_llama3(llama3, tmp_path, chat_template=template)
    ours, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    user = {"role": "user", "content": "hi"}
    cases = [
        ([user, {"role": "assistant", "content": "yo", "reasoning": "think"}], {}),
        ([user, {"role": "assistant", "content": "yo", "thinking": "a", "reasoning_content": "b"}], {}),
        ([user, {"role": "assistant", "content": "yo", "reasoning_content": None, "thinking": "c"}], {}),
        (
            [
                user,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "one"},
                        {"type": "image"},
                        {"type": "text", "text": "two"},
                    ],
                },
            ],
            dict(continue_final_message=True),
        ),
        (
            [user, {"role": "assistant", "content": "", "reasoning_content": "so far"}],
            dict(continue_final_message="reasoning_content"),
        ),
    ]
    for chat, kw in cases[:-1]:
        expected = hf.apply_chat_template(chat, tokenize=False, **kw)
        assert ours.apply_chat_template(chat, tokenize=False, **kw) == expected, (chat, kw)
    assert "[r:think][t:think]" in hf.apply_chat_template(cases[0][0], tokenize=False)
    # a reasoning field rendered under two names: cut after the first, where transformers cuts after the
    # last and leaves its marker in the first
    chat, kw = cases[-1]
    leaky = hf.apply_chat_template(chat, tokenize=False, **kw)
    assert leaky == "<user>hi</user><assistant>[r:so farCONTINUE_FINAL_MESSAGE_TAG ][t:so far"
    assert ours.apply_chat_template(chat, tokenize=False, **kw) == "<user>hi</user><assistant>[r:so far"


def test_call_arguments_are_read_as_transformers_or_refused(trained):
    ours, hf = Tokenizer.from_pretrained(trained), _hf(trained)
    batch = ["the king is dead", "a"]
    for padding in (False, "do_not_pad"):
        got = ours(batch, padding=padding, return_tensors=None)["input_ids"]
        assert got == hf(batch, padding=padding)["input_ids"]  # unpadded (it padded, for any string)
    assert ours(batch, padding="longest")["input_ids"].shape == ours(batch)["input_ids"].shape
    with pytest.raises(ValueError, match="padding='max_length' needs max_length"):
        ours(batch, padding="max_length")
    with pytest.raises(ValueError, match="padding='yes': expected True"):
        ours(batch, padding="yes")
    with pytest.raises(TypeError, match="text pairs are not supported"):
        ours("hello", "world")  # transformers encodes a pair; the second text used to be dropped
    with pytest.raises(TypeError, match="texts must be a string or a list of strings, found NoneType"):
        ours(None)
    with pytest.raises(TypeError, match="encode: text must be a string, found NoneType"):
        ours.encode(None)
    with pytest.raises(TypeError, match="messages must be a list of"):
        ours.apply_chat_template("hi")


def test_template_files_replace_the_config_and_saving_keeps_them_exact(llama3, tmp_path):
    """As transformers: template files replace the config's chat_template entry; saving into a folder
    with template files rewrites them, stale named ones removed (an old tool_use.jinja used to come back,
    in both libraries, and a rewritten chat_template.jinja hid the config's named templates from
    transformers)."""
    templates = [{"name": "default", "template": "CFG"}, {"name": "tool_use", "template": "CFGTOOLS"}]
    folder = tmp_path / "a"
    folder.mkdir()
    _copy_llama3(llama3, folder, chat_template=templates)
    (folder / "chat_template.jinja").write_text("FILE", encoding="utf-8")
    msg = [{"role": "user", "content": "hi"}]
    ours, hf = Tokenizer.from_pretrained(folder), _hf(str(folder))
    assert (
        ours.apply_chat_template(msg, tokenize=False, tools=[])
        == hf.apply_chat_template(msg, tokenize=False, tools=[])
        == "FILE"
    )
    assert ours.named_chat_templates == {}

    ours.named_chat_templates = {"tool_use": "NEWTOOLS", "other": "OTHER"}
    ours.save_pretrained(folder)  # a folder with template files: the named ones become files too
    for again in (Tokenizer.from_pretrained(folder), _hf(str(folder))):
        assert again.apply_chat_template(msg, tokenize=False, tools=[]) == "NEWTOOLS"
        assert again.apply_chat_template(msg, tokenize=False) == "FILE"
    ours.named_chat_templates = {}
    ours.chat_template = "X"
    ours.save_pretrained(folder)
    assert not (folder / "additional_chat_templates").exists()
    for again in (Tokenizer.from_pretrained(folder), _hf(str(folder))):
        assert again.apply_chat_template(msg, tokenize=False, tools=[]) == "X"
