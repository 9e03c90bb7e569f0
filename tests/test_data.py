"""Tests for bamba.data: collator parity with transformers, packing invariants, padding, text readers."""

import itertools
import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bamba.data import DataCollatorWithFlattening, pack_examples, pad_batch
from bamba.textfiles import iter_text_files

BOOL_COMBOS = list(itertools.product([False, True], repeat=3))  # position_ids, flash kwargs, seq_idx


def hf_collator(**kwargs):
    transformers_collator = pytest.importorskip("transformers.data.data_collator")
    return transformers_collator.DataCollatorWithFlattening(**kwargs)


def assert_same_batch(ours: dict, theirs: dict) -> None:
    """Same keys in the same order; same types, dtypes, shapes and values."""
    assert list(ours) == list(theirs)
    for key in theirs:
        a, b = ours[key], theirs[key]
        assert type(a) is type(b), key
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(a, b), key
        elif isinstance(b, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape, key
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b, key


def random_features(rng: random.Random, n: int, with_labels: bool, kind: str) -> list[dict]:
    """n examples (some maybe empty, never all) as lists, tensors, or a mix of both."""
    features = []
    for i in range(n):
        length = rng.randint(0 if i else 1, 12)
        ex = {"input_ids": [rng.randrange(50_000) for _ in range(length)]}
        if with_labels:
            ex["labels"] = [rng.choice([-100, rng.randrange(50_000)]) for _ in range(length)]
        if kind == "tensor" or (kind == "mixed" and rng.random() < 0.5):
            ex = {k: torch.tensor(v, dtype=torch.long) for k, v in ex.items()}
        features.append(ex)
    rng.shuffle(features)
    return features


# ---------------------------------------------------------------- collator


def test_collator_known_values():
    features = [{"input_ids": [5, 6, 7]}, {"input_ids": []}, {"input_ids": torch.tensor([8, 9])}]
    out = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(features)
    assert list(out) == [
        "input_ids",
        "labels",
        "position_ids",
        "seq_idx",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
    ]
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9]] and out["input_ids"].dtype == torch.int64
    assert out["labels"].tolist() == [[-100, 6, 7, -100, 9]] and out["labels"].dtype == torch.int64
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]] and out["position_ids"].dtype == torch.int64
    assert out["seq_idx"].tolist() == [[0, 0, 0, 1, 1]] and out["seq_idx"].dtype == torch.int32
    for k in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert out[k].tolist() == [0, 3, 5] and out[k].dtype == torch.int32
    assert out["max_length_q"] == out["max_length_k"] == 3 and type(out["max_length_q"]) is int
    assert out["cu_seq_lens_q"] is not out["cu_seq_lens_k"]


def test_collator_labels_and_separator():
    features = [{"input_ids": [1, 2, 3], "labels": [-100, 20, 30]}, {"input_ids": [4, 5], "labels": [40, 50]}]
    out = DataCollatorWithFlattening(return_position_ids=False, separator_id=7)(features)
    assert list(out) == ["input_ids", "labels"]
    assert out["labels"].tolist() == [[7, 20, 30, 7, 50]]
    assert DataCollatorWithFlattening()(features, separator_id=0)["labels"].tolist() == [[0, 20, 30, 0, 50]]


@pytest.mark.parametrize("kind", ["list", "tensor", "mixed"])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("position_ids, flash, seq_idx", BOOL_COMBOS)
def test_collator_matches_transformers_all_args(position_ids, flash, seq_idx, with_labels, kind):
    rng = random.Random(f"{position_ids}-{flash}-{seq_idx}-{with_labels}-{kind}")  # stable seed
    for separator_id in (-100, 0, rng.randrange(1000)):
        kwargs = dict(
            return_position_ids=position_ids,
            separator_id=separator_id,
            return_flash_attn_kwargs=flash,
            return_seq_idx=seq_idx,
        )
        theirs_collator, ours_collator = hf_collator(**kwargs), DataCollatorWithFlattening(**kwargs)
        for n in (1, 2, 5):
            features = random_features(rng, n, with_labels, kind)
            assert_same_batch(ours_collator(features), theirs_collator(features))
            assert_same_batch(
                ours_collator(features, return_tensors="np"), theirs_collator(features, return_tensors="np")
            )


token_lists = st.lists(st.integers(-100, 2**40), max_size=10)


@st.composite
def collator_cases(draw):
    n = draw(st.integers(1, 6))
    ids = [draw(token_lists) for _ in range(n)]
    if not any(ids):
        ids[0] = [draw(st.integers(0, 100))]
    # Labels may differ in length from input_ids: transformers just takes labels[1:].
    labels = [draw(token_lists) for _ in range(n)] if draw(st.booleans()) else None
    features = []
    for i in range(n):
        ex = {"input_ids": ids[i]} if labels is None else {"input_ids": ids[i], "labels": labels[i]}
        features.append(
            {k: torch.tensor(v, dtype=torch.long) if draw(st.booleans()) else v for k, v in ex.items()}
        )
    kwargs = dict(
        return_position_ids=draw(st.booleans()),
        separator_id=draw(st.integers(-1000, 1000)),
        return_flash_attn_kwargs=draw(st.booleans()),
        return_seq_idx=draw(st.booleans()),
        position_ids_start=draw(st.integers(0, 3)),
    )
    return features, kwargs


@settings(max_examples=150, deadline=None)
@given(collator_cases())
def test_collator_matches_transformers_random(case):
    features, kwargs = case
    snapshot = [{k: list(v) if isinstance(v, list) else v.clone() for k, v in f.items()} for f in features]
    ours = DataCollatorWithFlattening(**kwargs)(features)
    assert_same_batch(ours, hf_collator(**kwargs)(features))
    for f, g in zip(features, snapshot):  # inputs left untouched
        assert all(torch.equal(torch.as_tensor(f[k]), torch.as_tensor(g[k])) for k in g)


def test_collator_errors():
    collator = DataCollatorWithFlattening()
    with pytest.raises(ValueError, match="all empty"):
        collator([{"input_ids": []}, {"input_ids": torch.tensor([], dtype=torch.long)}])
    with pytest.raises(ValueError, match="example 1 lacks 'labels'"):
        collator([{"input_ids": [1], "labels": [1]}, {"input_ids": [2]}])
    with pytest.raises(ValueError, match="example 2 has 'labels'"):
        collator([{"input_ids": [1]}, {"input_ids": []}, {"input_ids": [2], "labels": [2]}])
    with pytest.raises(ValueError, match="return_tensors"):
        collator([{"input_ids": [1]}], return_tensors="tf")
    with pytest.raises(ValueError, match="example 0's input_ids must be one sequence of token ids \\(1-D\\)"):
        collator([{"input_ids": torch.tensor([[5, 6, 7]])}])


def test_collator_return_tensors_as_in_transformers():
    features = [{"input_ids": [1, 2]}, {"input_ids": [3]}]
    as_np = DataCollatorWithFlattening(return_tensors="np")(features)
    assert isinstance(as_np["input_ids"], np.ndarray)
    assert_same_batch(as_np, hf_collator(return_tensors="np")(features))
    default = DataCollatorWithFlattening()(features, return_tensors=None)  # None: the collator's own
    assert isinstance(default["input_ids"], torch.Tensor)


# ---------------------------------------------------------------- pack_examples


def test_pack_examples_known_values():
    examples = [[1, 2, 3], [], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]
    rows = list(pack_examples(examples, max_tokens=4))
    assert rows == [[[1, 2, 3]], [[4, 5]], [[6, 7, 8, 9]], [[10, 11, 12], [13]]]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.integers(0, 1000), max_size=20), max_size=12), st.integers(1, 16))
def test_pack_examples_invariants(examples, max_tokens):
    rows = list(pack_examples(iter(examples), max_tokens))  # a generator is accepted
    # Long examples split into max_tokens pieces, empty ones skipped, order kept.
    expected_pieces = [ex[i : i + max_tokens] for ex in examples for i in range(0, len(ex), max_tokens)]
    assert [piece for row in rows for piece in row] == expected_pieces
    for row in rows:
        assert row and sum(map(len, row)) <= max_tokens
    # Greedy: a row is closed only because the next piece does not fit in it.
    for row, next_row in zip(rows, rows[1:]):
        assert sum(map(len, row)) + len(next_row[0]) > max_tokens


def test_pack_examples_bad_budget():
    with pytest.raises(ValueError, match="max_tokens"):
        list(pack_examples([[1]], 0))


# ---------------------------------------------------------------- pad_batch


def test_pad_batch_right_and_left():
    examples = [[5, 6, 7], [8], [0, 9]]  # 0 is also the pad id: a real 0 keeps its label
    right = pad_batch(examples, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [0, 9, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert right["labels"].tolist() == [[5, 6, 7], [8, -100, -100], [0, 9, -100]]
    left = pad_batch(examples, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 9]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert left["labels"].tolist() == [[5, 6, 7], [-100, -100, 8], [-100, 0, 9]]
    for out in (right, left):
        assert all(v.dtype == torch.long and v.shape == (3, 3) for v in out.values())


def test_pad_batch_edge_cases():
    out = pad_batch([[], [3, 4]], pad_token_id=2)
    assert out["input_ids"].tolist() == [[2, 2], [3, 4]]
    assert out["labels"].tolist() == [[-100, -100], [3, 4]]
    with pytest.raises(ValueError, match="padding_side"):
        pad_batch([[1]], 0, padding_side="middle")
    with pytest.raises(ValueError, match="no examples"):
        pad_batch([], 0)


def test_pad_and_pack_hold_the_same_tokens():
    rng = random.Random(0)
    examples = [[rng.randrange(100) for _ in range(rng.randint(1, 9))] for _ in range(20)]
    padded = pad_batch(examples, pad_token_id=0)
    packed = [ex for row in pack_examples(examples, 16) for ex in row]
    assert padded["input_ids"][padded["attention_mask"].bool()].tolist() == [t for ex in packed for t in ex]


# ---------------------------------------------------------------- iter_text_files


def test_iter_text_files_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"\n\nfirst doc\nline two\n\n\n\nsecond  \n \t \nthird\r\n\r\nfourth\n\n \n")
    jsonl = tmp_path / "b.jsonl"
    records = [
        json.dumps({"text": "x\n\ny", "id": 1}),
        "",
        json.dumps({"text": ""}),
        json.dumps({"text": "last"}),
    ]
    jsonl.write_text("\n".join(records))  # a blank line inside, no newline at the end
    docs = list(iter_text_files([str(txt), jsonl]))
    assert docs == ["first doc\nline two", "second", "third", "fourth", "x\n\ny", "", "last"]


@pytest.mark.parametrize(
    "bad_line, found",
    [
        ('{"txt": "oops"}', "no 'text' field"),
        ('{"text": 3}', "type number"),
        ('["text"]', "JSON array"),
        ("{not json", "invalid JSON"),
    ],
)
def test_iter_text_files_bad_jsonl_line(tmp_path, bad_line, found):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n\n' + bad_line + "\n")
    docs = iter_text_files([path])
    assert next(docs) == "ok"
    with pytest.raises(ValueError) as err:
        next(docs)
    assert f"{path}:3:" in str(err.value) and found in str(err.value)


def test_iter_text_files_missing_and_unsupported(tmp_path):
    good = tmp_path / "a.txt"
    good.write_text("hello")
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        iter_text_files([good, missing])  # raised at call time, before reading anything
    with pytest.raises(ValueError, match="is a folder; give the .txt or .jsonl files in it"):
        iter_text_files([tmp_path])  # a folder is not a file (it was called missing)
    csv = tmp_path / "table.csv"
    csv.write_text("a,b")
    with pytest.raises(ValueError, match=r"table\.csv.*'\.csv'"):
        iter_text_files([str(csv)])


def test_iter_text_files_encodings(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes("\ufeff".encode() + b'{"text": "first"}\n{"text": "second"}\n')
    txt = tmp_path / "bom.txt"
    txt.write_bytes("\ufeff".encode() + b"hello\n\nworld")
    assert list(iter_text_files([bom, txt])) == ["first", "second", "hello", "world"]  # the mark dropped
    cr = tmp_path / "cr.jsonl"
    cr.write_bytes(b'{"text": "a"}\r{"text": "b"}\r\n{"text": "c"}')
    assert list(iter_text_files([cr])) == ["a", "b", "c"]  # any line ending, as text mode reads them
    # U+2028 / U+2029 / U+0085 may stand unescaped inside a JSON string (json.dumps(ensure_ascii=False)
    # writes them so): they do not end a line.
    seps = tmp_path / "seps.jsonl"
    texts = ["a\u2028b", "c\u2029d\u0085e", "", "  "]
    seps.write_text(
        "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\n", encoding="utf-8"
    )
    assert list(iter_text_files([seps])) == texts
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8 text"):
        list(iter_text_files([latin1]))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not UTF-8 text"):
        list(iter_text_files([bad]))
