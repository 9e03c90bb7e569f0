"""The text-generation pipeline against transformers' pipeline on the same folder (greedy)."""

from __future__ import annotations

import pytest
import torch

from bamba import pipeline
from bamba.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from conftest import hf_model

    root = tmp_path_factory.mktemp("pipe")
    corpus = root / "corpus.txt"
    corpus.write_text("ROMEO: what light through yonder window breaks?\nJULIET: ay me!\n" * 30)
    tok = train_tokenizer([str(corpus)], vocab_size=300, out_dir=str(root / "model"), min_frequency=1)
    assert len(tok) <= 300
    model = hf_model(seed=11, vocab_size=300, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(root / "model")
    return str(root / "model")


def test_strings_match_transformers_pipeline(folder):
    import transformers

    ref = transformers.pipeline("text-generation", model=folder)
    ours = pipeline("text-generation", model=folder)
    for prompt in ["ROMEO: what", "ay"]:
        expected = ref(prompt, max_new_tokens=8, do_sample=False)
        got = ours(prompt, max_new_tokens=8)
        assert got == expected
    got = ours(["ROMEO:", "JULIET: ay me"], max_new_tokens=5, return_full_text=False)
    assert len(got) == 2 and all(len(r) == 1 for r in got)
    assert (
        got[1][0]["generated_text"]
        == ours("JULIET: ay me", max_new_tokens=5, return_full_text=False)[0]["generated_text"]
    )


def test_max_length_counts_each_prompt_as_transformers(folder):
    import transformers

    ref = transformers.pipeline("text-generation", model=folder)
    ours = pipeline("text-generation", model=folder)
    prompts = ["ROMEO: what light", "ay"]
    expected = [ref(p, max_length=12, do_sample=False) for p in prompts]
    assert ours(prompts, max_length=12) == expected  # not the batch's padded width
    assert ours(prompts[1], max_length=12) == expected[1]


def test_chat_messages(folder):
    ours = pipeline("text-generation", model=folder, max_new_tokens=4)
    messages = [{"role": "user", "content": "ROMEO?"}]
    out = ours(messages)
    assert out[0]["generated_text"][:1] == messages
    assert out[0]["generated_text"][1]["role"] == "assistant"
    n = ours("ROMEO:", do_sample=True, num_return_sequences=3, seed=0)
    assert len(n) == 3


def test_bad_task_and_input(folder):
    with pytest.raises(ValueError, match="only 'text-generation'"):
        pipeline("summarization", model=folder)
    with pytest.raises(ValueError, match="string or a list of chat messages"):
        pipeline(model=folder)([torch.ones(2)])
