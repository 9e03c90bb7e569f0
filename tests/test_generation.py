"""generate: greedy parity with transformers (batched, left-padded), sampling controls, streaming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bamba import BambaForCausalLM
from bamba.generation import TextIteratorStreamer, TextStreamer, generate, process_logits


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


@pytest.mark.parametrize(
    "overrides", [dict(), dict(mamba_n_groups=2, attn_layer_indices=[0, 2], eos_token_id=5)]
)
def test_greedy_equals_transformers_batched_left_padded(hf_folder, overrides):
    ref, folder = hf_folder(seed=3, **overrides)
    ours = BambaForCausalLM.from_pretrained(folder)
    torch.manual_seed(1)
    rows = [torch.randint(3, 97, (n,)) for n in (9, 4, 6)]
    ids, mask = left_pad(rows)
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(got, expected)
    # single prompt, no mask
    one = rows[0][None]
    assert torch.equal(
        generate(ours, one, max_new_tokens=15), ref.generate(one, max_new_tokens=15, do_sample=False)
    )


def test_finished_rows_are_padded_and_dropped(hf_folder):
    _, folder = hf_folder(seed=4)
    model = BambaForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 97, (3, 5))
    free = generate(model, ids, max_new_tokens=6, eos_token_id=[])
    stop_token = int(free[1, 7])  # row 1 emits this at its 3rd new token
    out = generate(model, ids, max_new_tokens=6, eos_token_id=stop_token, pad_token_id=0)
    row = out[1, 5:].tolist()
    first = row.index(stop_token)
    assert row[: first + 1] == free[1, 5 : 5 + first + 1].tolist()
    assert all(t == 0 for t in row[first + 1 :])
    for i in (0, 2):  # other rows are unaffected by row 1 leaving the batch, until they hit the stop token
        n = out[i, 5:].tolist()
        k = n.index(stop_token) + 1 if stop_token in n else len(n)
        assert n[:k] == free[i, 5 : 5 + k].tolist()


def test_min_new_tokens_and_max_length(hf_folder):
    _, folder = hf_folder(seed=5)
    model = BambaForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 97, (1, 4))
    first = int(generate(model, ids, max_new_tokens=1)[0, -1])
    out = generate(model, ids, max_new_tokens=5, min_new_tokens=3, eos_token_id=first)
    assert out.shape[1] >= 4 + 3 and first not in out[0, 4:7].tolist()
    assert generate(model, ids, max_length=9).shape == (1, 9)


def test_sampling_is_seeded_and_respects_top_k(hf_folder):
    _, folder = hf_folder(seed=6)
    model = BambaForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 97, (2, 4))
    a = generate(model, ids, max_new_tokens=8, do_sample=True, seed=7, eos_token_id=[])
    b = generate(model, ids, max_new_tokens=8, do_sample=True, seed=7, eos_token_id=[])
    c = generate(model, ids, max_new_tokens=8, do_sample=True, seed=8, eos_token_id=[])
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, ids, max_new_tokens=8, eos_token_id=[])
    top1 = generate(model, ids, max_new_tokens=8, do_sample=True, top_k=1, seed=3, eos_token_id=[])
    assert torch.equal(top1, greedy)
    n = generate(model, ids, max_new_tokens=3, do_sample=True, num_return_sequences=3, seed=1)
    assert n.shape[0] == 6 and torch.equal(n[0, :4], ids[0]) and torch.equal(n[3, :4], ids[1])


def test_process_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    hist = torch.randint(0, 50, (3, 7))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(hist, logits.clone())
    for w in (
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.8),
        MinPLogitsWarper(0.05),
    ):
        expected = w(hist, expected)
    got = process_logits(
        logits, hist, temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3
    )
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    from bamba.tokenizer import train_tokenizer

    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text("plain ascii words only, nothing else here\n" * 50)
    return train_tokenizer([str(corpus)], vocab_size=300, out_dir=str(tmp_path_factory.mktemp("tok")))


def test_streamer_never_emits_broken_characters(byte_tokenizer):
    text = "héllo 🙂 世界!"
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # multi-byte characters are split over several tokens
    pieces: list[str] = []
    s = TextStreamer(byte_tokenizer, skip_prompt=True, on_text=pieces.append)
    s.put(torch.tensor([[1, 2]]))  # the prompt, skipped
    for i in ids:
        s.put(torch.tensor([i]))
    s.end()
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any("🙂" in p for p in pieces)


def test_iterator_streamer(byte_tokenizer):
    it = TextIteratorStreamer(byte_tokenizer, skip_prompt=False)
    for i in byte_tokenizer.encode("ok ü", add_special_tokens=False):
        it.put([i])
    it.end()
    assert "".join(it) == "ok ü"


def test_bad_generation_arguments(hf_folder):
    _, folder = hf_folder(seed=2, max_position_embeddings=16)
    model = BambaForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="longer than the model's context"):
        generate(model, torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="length >= 1"):
        generate(model, torch.ones(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="stop_strings needs a tokenizer"):
        generate(model, torch.ones(1, 3, dtype=torch.long), stop_strings=["x"])
    for bad, match in [
        (dict(top_k=-1), "top_k=-1 must be an integer >= 0"),
        (dict(top_p=0.0), "top_p=0.0 must be in \\(0, 1\\]"),
        (dict(min_p=1.5), "min_p=1.5 must be in \\[0, 1\\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate(model, torch.ones(1, 3, dtype=torch.long), do_sample=True, **bad)
    with pytest.raises(ValueError, match="max_length=2 is shorter than the prompt \\(3 tokens\\)"):
        generate(model, torch.ones(1, 3, dtype=torch.long), max_length=2)


def test_generation_config_stop_tokens_and_budgets_as_transformers(hf_folder):
    """generation_config.json's eos list stops generation (instruct checkpoints list end-of-turn there);
    max_new_tokens wins over max_length; sampling defaults to top_k=50. Each against transformers."""
    import json

    ref, folder = hf_folder(seed=5)
    ids = torch.randint(3, 97, (1, 4))
    first = int(ref.generate(ids, max_new_tokens=1, do_sample=False)[0, -1])
    gen_file = Path(folder) / "generation_config.json"
    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "eos_token_id": [2, first]}))
    import transformers

    ref = transformers.BambaForCausalLM.from_pretrained(folder)
    ours = BambaForCausalLM.from_pretrained(folder)
    expected = ref.generate(ids, max_new_tokens=6, do_sample=False)
    assert expected.shape == (1, 5)  # stopped at the listed token
    assert torch.equal(generate(ours, ids, max_new_tokens=6), expected)
    ours.save_pretrained(Path(folder) / "again")  # the list survives a save
    assert json.loads((Path(folder) / "again" / "generation_config.json").read_text())["eos_token_id"] == [
        2,
        first,
    ]

    both = dict(max_new_tokens=3, max_length=12, eos_token_id=[])
    assert generate(ours, ids, **both).shape == ref.generate(ids, do_sample=False, **both).shape == (1, 7)

    sampled = dict(max_new_tokens=8, do_sample=True, eos_token_id=[])  # default top_k: 50 in both
    torch.manual_seed(11)
    theirs = ref.generate(ids, **sampled)
    torch.manual_seed(11)
    assert torch.equal(generate(ours, ids, **sampled), theirs)
    torch.manual_seed(11)
    assert not torch.equal(generate(ours, ids, top_k=None, **sampled), theirs)  # top_k does matter here


def test_streamers_end_and_reset(hf_folder, byte_tokenizer):
    """A streamer ends even when nothing is generated (an iterating consumer would wait forever), and a
    reused TextStreamer skips each call's prompt."""
    _, folder = hf_folder(seed=2)
    model = BambaForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 97, (1, 4))
    it = TextIteratorStreamer(
        byte_tokenizer, skip_prompt=True, timeout=10
    )  # a missing end() fails, not hangs
    generate(model, ids, max_new_tokens=0, streamer=it)
    assert list(it) == []  # returns: end() was called
    for bad in (dict(input_ids=ids.expand(2, 4)), dict(input_ids=ids, do_sample=True, top_p=2.0)):
        it = TextIteratorStreamer(
            byte_tokenizer, skip_prompt=True, timeout=10
        )  # a missing end() fails, not hangs
        with pytest.raises(ValueError):
            generate(model, streamer=it, **bad)
        assert list(it) == []  # an error ends it too
    pieces: list[str] = []
    s = TextStreamer(byte_tokenizer, skip_prompt=True, on_text=pieces.append)
    for _ in range(2):
        generate(model, ids, max_new_tokens=3, streamer=s, eos_token_id=[])
    once = "".join(pieces)
    pieces.clear()
    generate(model, ids, max_new_tokens=3, streamer=s, eos_token_id=[])
    assert once == 2 * "".join(pieces)  # no prompt text in the later calls
