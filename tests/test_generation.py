"""generate: greedy parity with transformers (batched, left-padded), sampling controls, streaming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bamba import BambaForCausalLM
from bamba.generation import generate
from bamba.sampling import process_logits
from bamba.streamers import TextIteratorStreamer, TextStreamer


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


def test_output_grows_as_tokens_come(hf_folder, monkeypatch):
    """The output starts with a few new-token columns and doubles them when full: the same tokens past
    several doublings (greedy on a left-padded batch, against transformers; sampled rows kept in the batch,
    against one allocation), and a huge max_new_tokens that eos ends costs only what was generated."""
    import bamba.generation as generation

    ref, folder = hf_folder(seed=3)
    ours = BambaForCausalLM.from_pretrained(folder)
    torch.manual_seed(1)
    ids, mask = left_pad([torch.randint(3, 97, (n,)) for n in (9, 4, 6)])
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    whole = generate(ours, ids, attention_mask=mask, max_new_tokens=12, do_sample=True, seed=5)
    monkeypatch.setattr(generation, "_ROOM", 1)  # 1 -> 2 -> 4 -> 8 -> 12 columns
    assert torch.equal(generate(ours, ids, attention_mask=mask, max_new_tokens=12), expected)
    sampled = generate(ours, ids, attention_mask=mask, max_new_tokens=12, do_sample=True, seed=5)
    assert torch.equal(sampled, whole)
    monkeypatch.setattr(generation, "_ROOM", 256)
    stop = int(expected[0, 9 + 5])  # row 0's 6th new token ends it
    out = generate(ours, ids[:1], attention_mask=mask[:1], max_new_tokens=10**15, eos_token_id=stop)
    assert torch.equal(out, expected[:1, : 9 + 6])


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


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_p=0.8, top_k=0),
        dict(min_p=0.9, top_k=0),  # (near-uniform random logits: only a high min_p cuts)
        dict(top_p=0.7, min_p=0.6, top_k=40, temperature=0.5),
    ],
)
def test_sampling_with_top_p_and_min_p_draws_as_transformers(hf_folder, kw, one_thread):
    """With the same global seed, the same tokens as transformers' sampling (its warpers, then one
    multinomial draw per step); and top_p / min_p matter here: without them other tokens are drawn."""
    ref, folder = hf_folder(seed=6)
    ours = BambaForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 97, (2, 4), generator=torch.Generator().manual_seed(1))
    kw = dict(do_sample=True, max_new_tokens=12, eos_token_id=None, **kw)
    torch.manual_seed(4)
    theirs = ref.generate(ids, **kw)
    torch.manual_seed(4)
    assert torch.equal(generate(ours, ids, **kw), theirs)
    torch.manual_seed(4)
    plain = generate(ours, ids, **{**kw, "top_p": None, "min_p": None})
    assert not torch.equal(plain, theirs)


def test_sampling_draws_from_the_generator_given(hf_folder):
    """generator=: the draws come from it (the same seed gives the same tokens, another seed others),
    and the global RNG is left as it was."""
    _, folder = hf_folder(seed=6)
    model = BambaForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 97, (2, 4), generator=torch.Generator().manual_seed(2))
    kw = dict(do_sample=True, max_new_tokens=8, eos_token_id=[])
    state = torch.get_rng_state()
    a = generate(model, ids, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # another global state: no effect
    b = generate(model, ids, generator=torch.Generator().manual_seed(5), **kw)
    c = generate(model, ids, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, generate(model, ids, seed=5, **kw))  # seed=5: a generator seeded with 5


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
        (dict(temperature=float("nan")), "temperature=nan must be > 0 when sampling"),
        (dict(seed=10**23), "seed=100000000000000000000000 must be in \\[-2\\*\\*63, 2\\*\\*64\\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate(model, torch.ones(1, 3, dtype=torch.long), do_sample=True, **bad)
    with pytest.raises(ValueError, match="max_length=2 is shorter than the prompt \\(3 tokens\\)"):
        generate(model, torch.ones(1, 3, dtype=torch.long), max_length=2)
    # as transformers (it returned identical copies)
    with pytest.raises(
        ValueError, match="num_return_sequences=2 with greedy decoding would return identical"
    ):
        generate(model, torch.ones(1, 3, dtype=torch.long), num_return_sequences=2)


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


def test_streamers_end_and_reset(hf_folder, byte_tokenizer, capsys):
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
    it = TextIteratorStreamer(byte_tokenizer, timeout=10)
    generate(model, ids, max_new_tokens=2, streamer=it, eos_token_id=[])
    first = next(it)  # an iterator, as transformers' (next() raised a TypeError)
    assert iter(it) is it and first and len([first, *it]) >= 2
    for bad in (dict(input_ids=ids.expand(2, 4)), dict(input_ids=ids, do_sample=True, top_p=2.0)):
        it = TextIteratorStreamer(
            byte_tokenizer, skip_prompt=True, timeout=10
        )  # a missing end() fails, not hangs
        with pytest.raises(ValueError):
            generate(model, streamer=it, **bad)
        assert list(it) == []  # an error ends it too
        printing = TextStreamer(byte_tokenizer, skip_prompt=True)
        with pytest.raises(ValueError):
            generate(model, streamer=printing, **bad)
        assert capsys.readouterr().out == ""  # a refused printing streamer prints nothing (not a newline)
    pieces: list[str] = []
    s = TextStreamer(byte_tokenizer, skip_prompt=True, on_text=pieces.append)
    for _ in range(2):
        generate(model, ids, max_new_tokens=3, streamer=s, eos_token_id=[])
    once = "".join(pieces)
    pieces.clear()
    generate(model, ids, max_new_tokens=3, streamer=s, eos_token_id=[])
    assert once == 2 * "".join(pieces)  # no prompt text in the later calls


# ----- transformers' generate arguments and behaviours --------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    """The embedded demo model and tokenizer, ours and transformers' (a real tokenizer, 10 MB of weights)."""
    import transformers

    from bamba.demo import demo_path
    from bamba.tokenizer import Tokenizer

    folder = demo_path()
    # fp32 on both sides: the stored bf16 logits tie often, and which of two tied tokens a bf16 GEMM
    # favours depends on the CPU (on an AMX Xeon ours and transformers' differ by one bf16 ulp)
    return (
        BambaForCausalLM.from_pretrained(folder, dtype=torch.float32),
        transformers.BambaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
        Tokenizer.from_pretrained(folder),
        transformers.AutoTokenizer.from_pretrained(folder),
    )


class Scripted(torch.nn.Module):
    """Runs `inner` (so the cache is exercised) but makes greedy decoding emit `script`, one id per step."""

    def __init__(self, inner: BambaForCausalLM, script: list[int], vocab: int) -> None:
        super().__init__()
        self.inner, self.config, self.script, self.vocab, self.step = inner, inner.config, script, vocab, 0

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def forward(self, ids: torch.Tensor, **kw):
        from types import SimpleNamespace

        self.inner(ids.remainder(self.config.vocab_size), **kw)  # the script's ids may lie outside
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)  # (B, L, vocab)
        logits[:, -1, self.script[self.step]] = 1.0
        self.step += 1
        return SimpleNamespace(logits=logits)


def test_missing_attention_mask_is_inferred_from_padding_as_transformers(hf_folder):
    """Without a mask, transformers takes input_ids != pad as the mask when the pad id occurs and is not
    an eos id (else all ones); the tiny models' pad id is 0."""
    ref, folder = hf_folder(seed=3)
    ours = BambaForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[0, 0, 0, 66, 56, 29], [12, 45, 77, 66, 56, 29]])
    masked = generate(ours, ids, attention_mask=(ids != 0).long(), max_new_tokens=8)
    assert torch.equal(masked, ref.generate(ids, max_new_tokens=8, do_sample=False))
    assert torch.equal(generate(ours, ids, max_new_tokens=8), masked)
    # pad == eos: the zeros may be real tokens, no mask is inferred
    expected = ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=0)
    assert torch.equal(generate(ours, ids, max_new_tokens=8, eos_token_id=0), expected)
    assert not torch.equal(expected[:, 6:], masked[:, 6:])  # the mask does change row 0 here


def test_stop_string_longer_in_tokens_than_in_characters(hf_folder, byte_tokenizer):
    """5 CJK characters are 15 byte-level tokens: the stop string must still fire, at its last byte."""
    stop = "你好吗朋友"
    assert len(byte_tokenizer.encode(stop, add_special_tokens=False)) > len(stop) + 8
    out = scripted_generate(hf_folder, byte_tokenizer, "x", "ok " + stop + " and more after it", stop)
    assert out == "x" + "ok " + stop


def scripted_generate(hf_folder, tok, prompt: str, script: str, stop: str) -> str:
    """The text of `generate` from `prompt`, the model made to emit `script` token by token, with `stop`."""
    _, folder = hf_folder(seed=2)
    ids = tok.encode(script, add_special_tokens=False)
    model = Scripted(BambaForCausalLM.from_pretrained(folder), ids, tok.vocab_size)
    prompt_ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    out = generate(
        model, prompt_ids, max_new_tokens=len(ids), eos_token_id=[], stop_strings=[stop], tokenizer=tok
    )
    return tok.decode(out[0].tolist())


def test_stop_strings_match_across_the_prompt_as_transformers(demo, hf_folder, byte_tokenizer):
    """transformers' StopStringCriteria checks the end of the whole sequence: a stop string may begin in
    the prompt, and fires when a new token completes it; one lying wholly in the prompt does not fire."""
    ours, ref, tok, htok = demo
    ids = torch.tensor([tok.encode("ROMEO:\n")])
    for stop in [":\nI", "\nROMEO", "o, I"]:
        expected = ref.generate(ids, max_new_tokens=15, do_sample=False, stop_strings=[stop], tokenizer=htok)
        assert torch.equal(
            generate(ours, ids, max_new_tokens=15, stop_strings=[stop], tokenizer=tok), expected
        )
    first = generate(ours, ids, max_new_tokens=15, stop_strings=[":\nI"], tokenizer=tok)
    assert first.shape[1] == ids.shape[1] + 1  # the first new token, "I", completes it

    out = scripted_generate(hf_folder, byte_tokenizer, "x ab y", "ab cd ab", "ab")
    assert out == "x ab yab"  # not at once, though the prompt holds "ab"


def test_bad_arguments_are_named(hf_folder):
    _, folder = hf_folder(seed=2)
    model = BambaForCausalLM.from_pretrained(folder)
    ids = torch.ones(2, 3, dtype=torch.long)
    cases = [
        (
            dict(attention_mask=torch.ones(2, 4, dtype=torch.long)),
            ValueError,
            r"attention_mask has shape \(2, 4\); expected .* \(2, 3\)",
        ),
        (
            dict(attention_mask=torch.ones(1, 3, dtype=torch.long)),
            ValueError,
            r"attention_mask has shape \(1, 3\)",
        ),
        (
            dict(repetition_penalty=0.0),
            ValueError,
            "repetition_penalty=0.0 must be a strictly positive float",
        ),
        (dict(repetition_penalty=-1.2), ValueError, "repetition_penalty=-1.2 must be a strictly positive"),
        (
            dict(eos_token_id="2"),
            TypeError,
            "eos_token_id must be a token id or a list of them, found str '2'",
        ),
        (dict(eos_token_id=[2, "3"]), TypeError, "eos_token_id must be a token id"),
        (dict(num_return_sequences=0), ValueError, "num_return_sequences=0 must be an integer >= 1"),
        (dict(temperature="0.7"), TypeError, "temperature must be a number, found str '0.7'"),
        (dict(temperature="0.7", do_sample=True), TypeError, "temperature must be a number"),
        (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an integer, found float 2.5"),
        (dict(top_k="5", do_sample=True), TypeError, "top_k must be an integer"),
        (
            dict(num_beams=2, num_return_sequences=3),
            ValueError,
            "num_return_sequences=3 must be <= num_beams=2",
        ),
        (dict(stop_strings=[""], tokenizer=object()), TypeError, "stop_strings must be non-empty strings"),
        (dict(generation_config={"typical_p": 0.5}), ValueError, r"generation_config sets \['typical_p'\]"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            generate(model, ids, **{"max_new_tokens": 2, **kwargs})
    with pytest.raises(ValueError, match="pass the prompt once"):
        generate(model, ids, inputs=ids)


def test_transformers_keyword_arguments(hf_folder):
    """inputs=, use_cache, num_beams=1, generation_config (below explicit arguments), min_length,
    no_repeat_ngram_size, and the number types transformers takes: each against transformers."""
    import numpy as np
    import transformers

    ref, folder = hf_folder(seed=3)
    ours = BambaForCausalLM.from_pretrained(folder)
    torch.manual_seed(1)
    ids, mask = left_pad([torch.randint(3, 97, (n,)) for n in (7, 4)])
    greedy = ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)

    def same(expected: torch.Tensor, **kw) -> None:
        got = generate(ours, **{"input_ids": ids, "attention_mask": mask, **kw})
        assert torch.equal(got, expected), kw

    same(greedy, max_new_tokens=10, use_cache=False, num_beams=1)
    same(greedy, input_ids=None, inputs=ids, max_new_tokens=10)
    same(greedy, max_new_tokens=10.0)  # an integral float, as transformers
    gen_cfg = transformers.GenerationConfig(max_new_tokens=4, repetition_penalty=1.5, do_sample=False)
    same(ref.generate(ids, attention_mask=mask, generation_config=gen_cfg), generation_config=gen_cfg)
    expected = ref.generate(
        ids, attention_mask=mask, max_new_tokens=10, repetition_penalty=1.5, do_sample=False
    )
    same(expected, generation_config=gen_cfg, max_new_tokens=10)  # explicit wins
    same(expected, generation_config={"max_new_tokens": 10, "repetition_penalty": 1.5})
    assert not torch.equal(expected, greedy)  # the penalty (left padding ignored, as there) matters here
    assert ref.generation_config.use_cache  # transformers' use_cache=False recomputes: the same tokens
    assert torch.equal(
        ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, use_cache=False), greedy
    )

    for n in (1, 2, 3):
        expected = ref.generate(
            ids, attention_mask=mask, max_new_tokens=12, do_sample=False, no_repeat_ngram_size=n
        )
        same(expected, max_new_tokens=12, no_repeat_ngram_size=n)
        if n == 2:  # greedy repeats a bigram in row 1 here: the ban matters
            assert not torch.equal(expected[:, :17], greedy)

    stop = int(greedy[0, 7])  # row 0's first new token
    for kw in (dict(min_length=10), dict(min_length=9, min_new_tokens=1), dict(min_length=3)):
        expected = ref.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=stop, **kw
        )
        same(expected, max_new_tokens=6, eos_token_id=stop, **kw)
    assert expected[0, 7] == stop and not expected[0, 8:].any()  # min_length=3 < the prompt: stops at once

    # numpy and tensor numbers
    eos = int(greedy[1, 8])
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    same(expected, max_new_tokens=np.int64(10), eos_token_id=torch.tensor(eos))
    unused = next(i for i in range(3, 97) if i not in greedy)
    same(expected, max_new_tokens=10, eos_token_id=torch.tensor([eos, unused]))
    same(
        expected,
        max_new_tokens=10,
        eos_token_id=np.int32(eos),
        top_k=np.int64(5),
        temperature=np.float32(0.5),
    )


def test_scores_and_logits_as_transformers(hf_folder):
    """return_dict_in_generate with output_scores / output_logits: per step (batch, vocab) processed
    scores and raw logits, rows that finished early included, as transformers' GenerateDecoderOnlyOutput."""
    ref, folder = hf_folder(seed=3)
    ours = BambaForCausalLM.from_pretrained(folder)
    torch.manual_seed(1)
    ids, mask = left_pad([torch.randint(3, 97, (n,)) for n in (7, 4, 5)])
    free = generate(ours, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    eos = int(free[1, 9])  # row 1 finishes at its 3rd new token, the others later or never
    for kw in (dict(), dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=2)):
        common = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0, **kw)
        theirs = ref.generate(
            ids,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
            **common,
        )
        got = generate(
            ours, ids, return_dict_in_generate=True, output_scores=True, output_logits=True, **common
        )
        assert torch.equal(got.sequences, theirs.sequences)
        assert len(got.scores) == len(theirs.scores) == len(got.logits) == got.sequences.shape[1] - 7
        for mine, expected in [(got.scores, theirs.scores), (got.logits, theirs.logits)]:
            for a, e in zip(mine, expected):
                assert a.shape == e.shape == (3, 97)
                torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
        assert torch.equal(
            got["sequences"], generate(ours, ids, **common)
        )  # dropping finished rows: same ids
    only = generate(ours, ids, attention_mask=mask, max_new_tokens=2, return_dict_in_generate=True)
    assert only.scores is None and only.logits is None and only.sequences.shape == (3, 9)

    # sampling: the scores are the warped ones
    sample = dict(
        attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=20, temperature=0.7, eos_token_id=[]
    )
    torch.manual_seed(5)
    theirs = ref.generate(ids, return_dict_in_generate=True, output_scores=True, **sample)
    torch.manual_seed(5)
    got = generate(ours, ids, return_dict_in_generate=True, output_scores=True, **sample)
    assert torch.equal(got.sequences, theirs.sequences)
    for a, e in zip(got.scores, theirs.scores):
        assert torch.equal(torch.isinf(a), torch.isinf(e))
        torch.testing.assert_close(a[~torch.isinf(a)], e[~torch.isinf(e)], atol=1e-5, rtol=1e-5)

    # sampling a batch in which a row finishes early: the same seed draws the same tokens as transformers,
    # with or without scores (finished rows used to be dropped, which shifted the others' draws)
    sample = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, pad_token_id=0)
    torch.manual_seed(0)
    free = ref.generate(ids, eos_token_id=None, **sample)
    eos = int(free[0, 8])  # row 0's second new token
    torch.manual_seed(0)
    theirs = ref.generate(ids, eos_token_id=eos, **sample)
    assert theirs[0, 9:].eq(0).all() and not theirs[1:, 9:].eq(0).all()  # row 0 ended, the others went on
    for extra in (dict(), dict(return_dict_in_generate=True, output_scores=True)):
        torch.manual_seed(0)
        got = generate(ours, ids, eos_token_id=eos, **sample, **extra)
        assert torch.equal(got["sequences"] if extra else got, theirs)


def test_generate_output_and_generation_config_as_transformers(hf_folder):
    """GenerateOutput behaves as transformers' (out[0], `in`, keys, get); a checkpoint's own
    generation_config (which holds output_attentions: false) is accepted; min_new_tokens, when given, wins
    over min_length."""
    import transformers

    ref, folder = hf_folder(seed=4)
    ours = BambaForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 97, (1, 5))
    out = generate(ours, ids, max_new_tokens=3, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(out[0], out.sequences) and "scores" in out and "logits" not in out
    assert out.keys() == ["sequences", "scores"] and out.get("logits") is None and len(out) == 2
    config = transformers.GenerationConfig.from_pretrained(folder)
    assert "output_attentions" in config.to_diff_dict()
    config.max_new_tokens = 4
    expected = ref.generate(ids, generation_config=config, do_sample=False)
    assert torch.equal(generate(ours, ids, generation_config=config), expected)
    free = generate(ours, ids, max_new_tokens=6, eos_token_id=[])
    eos = int(free[0, 6])  # the second new token
    for kw in (
        dict(min_new_tokens=1, min_length=9),
        dict(min_new_tokens=0, min_length=10),
        dict(min_length=9),
    ):
        expected = ref.generate(
            ids, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0, **kw
        )
        got = generate(ours, ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0, **kw)
        assert torch.equal(got, expected), kw


def test_streamers_as_transformers(demo, capsys):
    """Defaults as transformers': the prompt is streamed too, TextStreamer ends with a newline, and extra
    keyword arguments go to decode."""
    import threading

    import transformers

    ours, ref, tok, htok = demo
    ids = torch.tensor([tok.encode("ROMEO:\n")])
    ref.generate(ids, max_new_tokens=8, do_sample=False, streamer=transformers.TextStreamer(htok))
    expected = capsys.readouterr().out
    assert expected.startswith("<|bos|>ROMEO:\n") and expected.endswith("\n")
    generate(ours, ids, max_new_tokens=8, streamer=TextStreamer(tok))
    assert capsys.readouterr().out == expected
    kw = dict(skip_prompt=True, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    ref.generate(ids, max_new_tokens=8, do_sample=False, streamer=transformers.TextStreamer(htok, **kw))
    expected = capsys.readouterr().out
    generate(ours, ids, max_new_tokens=8, streamer=TextStreamer(tok, **kw))
    assert capsys.readouterr().out == expected
    with pytest.raises(TypeError, match=r"streamer decode options \['colour'\]"):
        TextStreamer(tok, colour="red")

    texts = []
    for model, streamer in [
        (ref, transformers.TextIteratorStreamer(htok, timeout=10)),
        (ours, TextIteratorStreamer(tok, timeout=10)),
    ]:
        th = threading.Thread(
            target=model.generate,
            args=(ids,),
            kwargs=dict(max_new_tokens=8, do_sample=False, streamer=streamer),
        )
        th.start()
        texts.append("".join(streamer))
        th.join()
    assert texts[0] == texts[1] and texts[0].startswith("<|bos|>ROMEO:\n")


def test_streamer_passes_extra_keyword_arguments_to_decode():
    """TextStreamer(tok, **kwargs) decodes with those kwargs, as transformers' does (the BPE demo tokenizer
    ignores clean_up_tokenization_spaces, so a recording tokenizer shows it)."""
    seen = []

    class Recording:
        def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
            seen.append(clean_up_tokenization_spaces)
            return "".join(chr(97 + i) for i in ids)

    pieces = []
    streamer = TextStreamer(Recording(), on_text=pieces.append, clean_up_tokenization_spaces=True)
    streamer.put(torch.tensor([[0, 1]]))  # the prompt (streamed too)
    streamer.put(torch.tensor([2]))
    streamer.end()
    assert "".join(pieces) == "abc" and seen and all(v is True for v in seen)


def test_stopping_criteria_as_transformers(hf_folder):
    """Custom stopping criteria (a transformers StoppingCriteriaList, or plain callables) see every row
    and the scores as transformers' do, and stop the rows they say, greedy and sampling."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    ref, folder = hf_folder(seed=3)
    ours = BambaForCausalLM.from_pretrained(folder)
    torch.manual_seed(1)
    ids, mask = left_pad([torch.randint(3, 97, (n,)) for n in (7, 4, 5)])
    free = generate(ours, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    token = int(free[2, 8])  # row 2's second new token
    seen: list[tuple] = []

    class AfterToken(StoppingCriteria):  # stops a row once it has produced `token`, and records its calls
        def __call__(self, input_ids, scores, **kwargs):
            seen.append((tuple(input_ids.shape), None if scores is None else len(scores)))
            return (input_ids[:, 7:] == token).any(dim=1)

    common = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=1, pad_token_id=0)
    expected = ref.generate(
        ids, do_sample=False, stopping_criteria=StoppingCriteriaList([AfterToken()]), **common
    )
    calls_theirs, seen[:] = list(seen), []
    got = generate(ours, ids, stopping_criteria=StoppingCriteriaList([AfterToken()]), **common)
    assert torch.equal(got, expected)
    assert seen == calls_theirs and seen[0] == ((3, 8), None)  # every row, after each new token
    assert got[2, 9:].eq(0).all() and not got[0, 8:].eq(0).all()  # row 2 stopped, the others went on

    # with scores returned, the criteria get them so far; a plain function returning one bool stops all
    seen[:] = []
    out = generate(
        ours,
        ids,
        stopping_criteria=[AfterToken(), lambda input_ids, scores: input_ids.shape[1] >= 11],
        return_dict_in_generate=True,
        output_scores=True,
        **common,
    )
    assert out.sequences.shape == (3, 11) and [n for _, n in seen] == [1, 2, 3, 4]
    assert torch.equal(out.sequences, expected[:, :11])

    # sampling a batch: the same seed, the same draws and stops as transformers
    sample = dict(do_sample=True, top_k=20, **common)
    torch.manual_seed(4)
    expected = ref.generate(ids, stopping_criteria=StoppingCriteriaList([AfterToken()]), **sample)
    torch.manual_seed(4)
    assert torch.equal(generate(ours, ids, stopping_criteria=[AfterToken()], **sample), expected)

    # no eos id: a stopped row is padded from there on (transformers goes on generating its tokens)
    no_eos = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    stop_row_0 = StoppingCriteriaList(
        [lambda input_ids, scores: torch.tensor([input_ids.shape[1] >= 9, 0, 0]) > 0]
    )
    theirs = ref.generate(ids, attention_mask=mask, do_sample=False, stopping_criteria=stop_row_0, **no_eos)
    got = generate(ours, ids, attention_mask=mask, stopping_criteria=stop_row_0, **no_eos)
    assert torch.equal(got[:, :9], theirs[:, :9]) and torch.equal(got[1:], theirs[1:])
    assert got[0, 9:].eq(0).all() and not theirs[0, 9:].eq(0).all()

    # one callable alone, and 0 / 1 integers, as transformers' `|` takes them
    stopped = generate(ours, ids, max_new_tokens=3, stopping_criteria=lambda i, s: torch.tensor([1, 0, 0]))
    assert stopped[0, 8:].eq(0).all() and stopped.shape == (3, 10)
    with pytest.raises(TypeError, match="stopping_criteria must be callables"):
        generate(ours, ids, stopping_criteria=[3])
    for bad, found in [
        (torch.tensor([1, 0]), r"torch.int64 of shape \(2,\)"),
        (None, "NoneType"),
        (0.5, "torch.float32"),
    ]:
        with pytest.raises(ValueError, match=rf"returned {found}.*; expected a bool per row \(3\)"):
            generate(ours, ids, stopping_criteria=[lambda i, s, bad=bad: bad])
    with pytest.raises(ValueError, match="num_beams=2 with stopping_criteria"):
        generate(ours, ids, num_beams=2, stopping_criteria=[AfterToken()])
