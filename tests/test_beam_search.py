"""Beam search (generate with num_beams > 1) against transformers' on the same random tiny checkpoints:
sequences, sequence scores, per-step scores and beam indices, with eos ids that end beams early."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_generation import left_pad

import bamba.generation
from bamba import BambaForCausalLM
from bamba.generation import generate
from bamba.streamers import TextStreamer


@pytest.fixture
def pair(hf_folder, one_thread):
    """(transformers model, ours, left-padded ids, mask, eos ids that the greedy continuation meets)."""
    ref, folder = hf_folder(seed=5, pad_token_id=1)
    ours = BambaForCausalLM.from_pretrained(folder)
    torch.manual_seed(2)
    ids, mask = left_pad([torch.randint(3, 97, (n,)) for n in (6, 3, 5)], pad=1)
    greedy = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    # two tokens that greedy decoding emits early: beams then end at different lengths
    eos = [int(greedy[0, ids.shape[1] + 2]), int(greedy[1, ids.shape[1] + 4])]
    return ref, ours, ids, mask, eos


def both(ref, ours, ids, mask, **kw):
    theirs = ref.generate(ids, attention_mask=mask, do_sample=False, **kw)
    return theirs, generate(ours, ids, attention_mask=mask, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_beams=2),
        dict(num_beams=3, num_return_sequences=3),
        dict(num_beams=4, num_return_sequences=2, length_penalty=0.0),
        dict(num_beams=3, length_penalty=2.0, early_stopping="never"),
        dict(num_beams=3, length_penalty=-0.5, early_stopping=True, num_return_sequences=2),
        dict(num_beams=2, min_new_tokens=5, no_repeat_ngram_size=2),
        dict(num_beams=3, repetition_penalty=1.3, num_return_sequences=2),
    ],
)
@pytest.mark.parametrize("room", [256, 1])  # 1: the beams' columns double at 1, 2, 4 and 8 new tokens
def test_beam_search_equals_transformers(pair, kw, room, monkeypatch):
    monkeypatch.setattr(bamba.generation, "_ROOM", room)
    ref, ours, ids, mask, eos = pair
    common = dict(max_new_tokens=10, eos_token_id=eos, return_dict_in_generate=True, output_scores=True)
    theirs, got = both(ref, ours, ids, mask, **common, **kw)
    assert torch.equal(got.sequences, theirs.sequences), (got.sequences, theirs.sequences)
    torch.testing.assert_close(got.sequences_scores, theirs.sequences_scores, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.beam_indices, theirs.beam_indices)  # int32 both
    assert list(got.keys()) == [k for k in theirs.keys() if k != "cache"]  # the same fields in order
    torch.testing.assert_close(got[1], theirs[1], atol=1e-4, rtol=1e-4)  # so out[1] is sequences_scores
    assert len(got.scores) == len(theirs.scores)
    for a, b in zip(got.scores, theirs.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # plain generate returns the same sequences
    assert torch.equal(
        generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, **kw), got.sequences
    )


def test_a_huge_max_new_tokens_costs_what_the_beams_use(pair):
    """The beams' columns grow as tokens come: a search that its eos ids end early no longer allocates
    max_new_tokens columns first (10**12 failed to allocate)."""
    _, ours, ids, mask, _ = pair
    kw = dict(attention_mask=mask, eos_token_id=[36, 24, 81, 61], num_beams=3, early_stopping=True)
    short = generate(ours, ids, max_new_tokens=30, **kw)
    assert short.shape[1] < ids.shape[1] + 30  # the search ended on its own
    assert torch.equal(generate(ours, ids, max_new_tokens=10**12, **kw), short)


def forward_calls(model) -> list[int]:
    """A counter of `model`'s forward calls (one per decoding step after the prompt's)."""
    count = [0]
    model.register_forward_hook(lambda *args: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize(
    "eos, kw",
    [
        # many eos ids: prompts fill their k hypotheses early, so the stopping rules decide the result
        ([36, 24, 81, 61], dict(num_beams=3, early_stopping=True)),  # no new hypotheses once k are done
        ([8, 39, 87, 4, 62, 82, 41, 77], dict(num_beams=4)),  # the heuristic: done when nothing can beat them
        ([8, 39, 87, 4, 62, 82, 41, 77], dict(num_beams=4, early_stopping="never")),  # judged at max length
        ([21, 96, 13, 90, 52, 23, 73, 16, 9, 80, 4, 3, 39, 10], dict(num_beams=2, length_penalty=0.5)),
    ],
)
def test_beam_search_stopping_rules_equal_transformers(pair, eos, kw):
    """The same hypotheses, scores and number of decoding steps as transformers' where the early-stopping
    rules matter (each case fails if one of them is changed: a mutation check when this was written)."""
    ref, ours, ids, mask, _ = pair
    kw = dict(max_new_tokens=14, eos_token_id=eos, return_dict_in_generate=True, output_scores=True, **kw)
    kw["num_return_sequences"] = kw["num_beams"]
    steps_ref, steps_ours = forward_calls(ref), forward_calls(ours)
    theirs, got = both(ref, ours, ids, mask, **kw)
    assert torch.equal(got.sequences, theirs.sequences)
    torch.testing.assert_close(got.sequences_scores, theirs.sequences_scores, atol=1e-4, rtol=1e-4)
    assert steps_ours[0] == steps_ref[0]


def test_beam_search_keeps_enough_continuations_when_the_best_ones_end(pair):
    """Every one of the best first tokens is an eos id: beam search must look past 2 * num_beams
    continuations (transformers keeps (1 + number of eos ids) * num_beams) to find beams that go on."""
    ref, ours, ids, mask, _ = pair
    one = ids[0, mask[0].bool()][None]  # the first prompt without its padding
    eos = ref(one).logits[0, -1].topk(5).indices.tolist()  # the 5 likeliest first tokens
    kw = dict(max_new_tokens=8, eos_token_id=eos, num_beams=2, early_stopping="never")
    kw |= dict(return_dict_in_generate=True, output_scores=True, num_return_sequences=2)
    steps_ref, steps_ours = forward_calls(ref), forward_calls(ours)
    theirs = ref.generate(one, do_sample=False, **kw)
    got = generate(ours, one, **kw)
    assert torch.equal(got.sequences, theirs.sequences) and steps_ours[0] == steps_ref[0] > 2
    torch.testing.assert_close(got.sequences_scores, theirs.sequences_scores, atol=1e-4, rtol=1e-4)


def test_beam_search_runs_past_greedy_and_ends_early(pair):
    """Checks that the cases above exercise what they should: some hypotheses end with an eos id before the
    limit (shorter rows padded), and beam search finds a better-scoring sequence than greedy decoding."""
    ref, ours, ids, mask, eos = pair
    out = generate(
        ours,
        ids,
        attention_mask=mask,
        max_new_tokens=10,
        eos_token_id=eos,
        num_beams=3,
        num_return_sequences=3,
        return_dict_in_generate=True,
        output_scores=True,
        length_penalty=0.0,
    )
    new = out.sequences[:, ids.shape[1] :]
    ended = torch.isin(new, torch.tensor(eos)).any(dim=1)
    assert bool(ended.any()) and new.shape[1] == 10
    greedy = generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos)
    assert not torch.equal(out.sequences[::3], greedy)


def test_beam_search_without_padding_and_with_prefill_chunks(pair):
    ref, ours, ids, mask, eos = pair
    one = ids[0, mask[0].bool()][None]  # the first prompt without its padding
    kw = dict(max_new_tokens=8, num_beams=3, eos_token_id=eos)
    expected = ref.generate(one, do_sample=False, **kw)
    assert torch.equal(generate(ours, one, **kw), expected)
    assert torch.equal(generate(ours, one, prefill_chunk_size=2, **kw), expected)


def test_beam_search_from_a_generation_config(pair):
    import transformers

    ref, ours, ids, mask, eos = pair
    cfg = transformers.GenerationConfig(
        num_beams=3, early_stopping=True, max_new_tokens=6, eos_token_id=eos, do_sample=False, pad_token_id=1
    )
    expected = ref.generate(ids, attention_mask=mask, generation_config=cfg)
    assert torch.equal(generate(ours, ids, attention_mask=mask, generation_config=cfg), expected)


def test_beam_search_refuses_what_it_does_not_do(pair, capsys):
    _, ours, ids, mask, _ = pair
    cases = [
        (dict(num_beams=2, stop_strings="x", tokenizer=object()), "num_beams=2 with stop_strings"),
        (
            dict(num_beams=2, streamer=TextStreamer(SimpleNamespace(decode=lambda ids, **kw: ""))),
            "with streamer",
        ),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 must be <= num_beams=2"),
        (dict(num_beams=2, early_stopping="sometimes"), "early_stopping='sometimes': expected True, False"),
        (dict(num_beams=2, length_penalty="1"), "length_penalty must be a number"),
        (dict(num_beams=2, max_new_tokens=0), "num_beams=2 needs at least one new token"),
    ]
    for kw, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            generate(ours, ids, attention_mask=mask, **{"max_new_tokens": 3, **kw})
    assert capsys.readouterr().out == ""  # the refused streamer printed nothing (it printed a newline)


def test_eos_and_pad_given_as_none_mean_none_as_in_transformers(pair):
    """Left out, eos_token_id and pad_token_id are the checkpoint's; given as None they are none, as in
    transformers (beams then run past the checkpoint's eos id 2, and no padding is inferred from id 1)."""
    ref, ours, ids, mask, _ = pair
    one = torch.tensor([[42, 66, 34, 94]])  # a prompt whose beams meet id 2 (the checkpoint's eos)
    for kw in (dict(num_beams=3), dict(num_beams=1), dict(num_beams=2, min_new_tokens=4)):
        kw = dict(max_new_tokens=12, eos_token_id=None, **kw)
        expected = ref.generate(one, do_sample=False, **kw)
        assert torch.equal(generate(ours, one, **kw), expected), kw
    assert 2 in expected[0, 4:-1].tolist()  # the checkpoint's eos id did not stop it
    padded = torch.tensor([[1, 1, 37, 24, 44]])  # 1: the checkpoint's pad id
    for kw in (dict(), dict(pad_token_id=None)):
        kw = dict(max_new_tokens=6, **kw)
        theirs = ref.generate(padded, do_sample=False, **kw)
        assert torch.equal(generate(ours, padded, **kw), theirs), kw
    assert torch.equal(
        generate(ours, padded, max_new_tokens=6, generation_config={"pad_token_id": None}), theirs
    )


def test_hypotheses_that_end_early_are_padded_with_the_pad_id_even_when_it_is_0(hf_folder, one_thread):
    """transformers pads them with `pad_token_id or eos_token_id[0]`, so a pad id of 0 (false) gives the
    eos id there; bamba keeps the pad id, as its greedy decoding (and transformers') does. Everything else
    is equal."""
    ref, folder = hf_folder(seed=5)  # pad id 0
    ours = BambaForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[0, 0, 44, 53, 42, 66, 34], [94, 26, 8, 38, 3, 13, 72]])
    mask = (torch.arange(7) >= torch.tensor([[2], [0]])).long()
    greedy = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    eos = int(greedy[0, 9])  # a token that the first row's continuation meets early: its beams end first
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=4, eos_token_id=eos, length_penalty=0.5)
    theirs, got = ref.generate(ids, do_sample=False, **kw), generate(ours, ids, **kw)
    filled = torch.zeros_like(got, dtype=torch.bool)
    filled[:, 7:] = (got[:, 7:] == eos).long().cummax(dim=1).values.bool() & (got[:, 7:] != eos)  # after it
    assert bool(filled.any()) and bool((got[filled] == 0).all()) and bool((theirs[filled] == eos).all())
    assert torch.equal(got[~filled], theirs[~filled])


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_beams=3),  # top_k 50 by default when sampling, as in transformers
        dict(num_beams=2, temperature=0.7, top_k=0, num_return_sequences=2),
        dict(num_beams=4, top_p=0.9, top_k=30, early_stopping=True, num_return_sequences=3),
    ],
)
def test_beam_sampling_equals_transformers_with_the_same_seed(pair, kw):
    """do_sample with beams: each step's continuations are drawn in proportion to the whole sequences'
    (warped) probabilities; the same global seed draws the same beams as transformers."""
    ref, ours, ids, mask, eos = pair
    kw = dict(
        do_sample=True,
        max_new_tokens=9,
        eos_token_id=eos,
        return_dict_in_generate=True,
        output_scores=True,
        **kw,
    )
    torch.manual_seed(4)
    theirs = ref.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(4)
    got = generate(ours, ids, attention_mask=mask, **kw)
    assert torch.equal(got.sequences, theirs.sequences)
    torch.testing.assert_close(got.sequences_scores, theirs.sequences_scores, atol=1e-4, rtol=1e-4)
    for a, e in zip(got.scores, theirs.scores, strict=True):  # the warped log-probabilities
        assert torch.equal(torch.isinf(a), torch.isinf(e))
        torch.testing.assert_close(a[~torch.isinf(a)], e[~torch.isinf(e)], atol=1e-4, rtol=1e-4)
    greedy = generate(ours, ids, attention_mask=mask, **{**kw, "do_sample": False})
    assert not torch.equal(got.sequences, greedy.sequences)  # the draws matter here
    seeded = [generate(ours, ids, attention_mask=mask, seed=9, **kw).sequences for _ in range(2)]
    assert torch.equal(*seeded)  # seed= makes it repeatable
