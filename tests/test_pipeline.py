"""The text-generation pipeline against transformers' pipeline on the same folder (greedy)."""

from __future__ import annotations

import pytest
import torch
from conftest import relative_rms

from bamba import BambaForCausalLM, pipeline
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


def test_sampled_prompts_run_one_by_one(folder):
    """Sampled prompts run one by one by default, as transformers' pipeline runs them: each draws as if it
    ran alone, continuing the random stream (batched, the rows shared one stream and drew otherwise).
    transformers' own list input first draws a DataLoader seed from the stream, so its draws differ."""
    ours = pipeline("text-generation", model=folder)
    prompts = ["ROMEO: what light", "ay", "JULIET:"]
    kw = dict(max_new_tokens=8, do_sample=True, top_k=0, temperature=1.5)
    torch.manual_seed(3)
    alone = [ours(p, **kw) for p in prompts]
    torch.manual_seed(3)
    assert ours(prompts, **kw) == alone
    torch.manual_seed(3)
    assert ours(prompts, batch_size=3, **kw) != alone  # batched: one shared stream


def test_a_streamer_streams_the_prompts_one_after_the_other(folder):
    """With a streamer, prompts run one by one (batched, the streamer refused the batch of 2)."""
    from bamba.streamers import TextStreamer

    ours = pipeline("text-generation", model=folder)
    pieces: list[str] = []
    streamer = TextStreamer(ours.tokenizer, skip_prompt=True, on_text=pieces.append)
    out = ours(["ROMEO: what", "ay"], max_new_tokens=4, streamer=streamer, return_full_text=False)
    assert "".join(pieces) == "".join(r[0]["generated_text"] for r in out)


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


@pytest.fixture(scope="module")
def pipes(folder):
    """(ours, transformers') pipelines on the same folder, built once for the module."""
    import transformers

    return pipeline("text-generation", model=folder), transformers.pipeline("text-generation", model=folder)


def test_chat_ending_with_the_assistant_is_continued_as_transformers(pipes):
    ours, ref = pipes
    prefill = [{"role": "user", "content": "ROMEO?"}, {"role": "assistant", "content": "JULIET "}]
    for chat, cont in [(prefill, None), (prefill, True), (prefill, False), (prefill[:1], True)]:
        for extra in ({}, {"return_full_text": False}, {"return_tensors": True}):
            kw = dict(max_new_tokens=5, do_sample=False, continue_final_message=cont, **extra)
            assert ours(chat, **kw) == ref(chat, **kw), (cont, extra)
    out = ours(prefill, max_new_tokens=3)[0]["generated_text"]
    assert len(out) == 2 and out[1]["content"].startswith("JULIET ")  # merged, not a second reply


def test_transformers_pipeline_arguments(pipes):
    import transformers

    ours, ref = pipes
    prompts = ["ROMEO: what", "ay"]
    greedy = dict(max_new_tokens=6, do_sample=False)
    # a stop string that the greedy continuation meets: its first letter or digit
    text = ours(prompts[0], **dict(greedy, max_new_tokens=12))[0]["generated_text"]
    stop = next(c for c in text[len(prompts[0]) : -1] if c.isascii() and c.isalnum())
    cases = [
        dict(greedy, return_tensors=True),
        dict(greedy, return_text=True),
        dict(greedy, prefix="JULIET: "),
        dict(greedy, prefix="JULIET: ", return_full_text=False),
        dict(greedy, stop_sequence=stop, max_new_tokens=12),
        dict(greedy, stop_sequence=["zz", stop], max_new_tokens=12),
        dict(greedy, clean_up_tokenization_spaces=True),
        dict(greedy, skip_special_tokens=False),
        dict(greedy, num_beams=3, num_return_sequences=2),  # beam search
        dict(generation_config=transformers.GenerationConfig(max_new_tokens=3, do_sample=False)),
        dict(greedy, generation_config=transformers.GenerationConfig(max_new_tokens=3)),  # explicit wins
    ]
    for kw in cases:
        assert ours(prompts[0], **kw) == ref(prompts[0], **kw), kw
    stopped = ours(prompts[0], **cases[4])[0]["generated_text"]
    assert stopped.endswith(stop) and len(stopped) < len(text)
    # a prompt list: prompts one by one (transformers' default) or in left-padded batches of batch_size
    for kw in ({}, {"batch_size": 2}, {"batch_size": 1}):
        for extra in ({}, {"return_tensors": True}):
            args = {"max_new_tokens": 6, "do_sample": False, **kw, **extra}
            assert ours(prompts, **args) == ref(prompts, **args), args
    assert ours(prompts[1], prefix="JULIET: ", max_length=8) == ref(
        prompts[1], prefix="JULIET: ", max_length=8, do_sample=False
    )
    # a dict works too (transformers' pipeline needs a GenerationConfig); explicit arguments win
    assert ours("ay", generation_config={"max_new_tokens": 3}) == ref("ay", max_new_tokens=3, do_sample=False)
    with pytest.raises(ValueError, match="exclude each other"):
        ours("ay", return_text=True, return_full_text=False)
    with pytest.raises(ValueError, match="penalty_alpha"):
        ours("ay", generation_config={"penalty_alpha": 0.6})  # contrastive search: not in bamba's generate
    with pytest.raises(TypeError, match="unknown argument.*'colour'"):
        ours("ay", colour="red")


def test_inputs_of_the_wrong_form_say_what_is_accepted(folder):
    ours = pipeline(model=folder, max_new_tokens=2)
    with pytest.raises(TypeError, match="single message dict .* list of messages"):
        ours({"role": "user", "content": "hi"})
    for bad in (None, 5):
        with pytest.raises(
            TypeError, match="must be a string, a list of strings, a chat .* or a list of chats"
        ):
            ours(bad)
    with pytest.raises(ValueError, match="needs 'role' and 'content'"):
        ours([{"role": "user"}])


def test_bad_task_and_input(folder):
    with pytest.raises(ValueError, match="only 'text-generation'"):
        pipeline("summarization", model=folder)
    with pytest.raises(ValueError, match="string or a list of chat messages"):
        pipeline(model=folder)([torch.ones(2)])


def test_loading_keywords_reach_from_pretrained_as_transformers(folder):
    """torch_dtype, device_map and model_kwargs load the model (they were taken as generate's defaults,
    and failed at the first call)."""
    pipe = pipeline("text-generation", model=folder, torch_dtype=torch.bfloat16, device_map="cpu")
    assert pipe.model.dtype == torch.bfloat16 and pipe.model.device.type == "cpu"
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # fp32's logits within bf16's rounding (measured: relative RMS 0.0079)
        fp32 = BambaForCausalLM.from_pretrained(folder)(ids).logits
        assert relative_rms(pipe.model(ids).logits, fp32) < 0.015
    pipe = pipeline("text-generation", model=folder, model_kwargs={"quantization": "int8"})
    assert pipe.model.quantization_config["format"] == "int8_weight_only"
    assert isinstance(pipe("ROMEO:", max_new_tokens=2)[0]["generated_text"], str)
    with pytest.raises(ValueError, match=r"\['torch_dtype'\] set how a model loads"):
        pipeline(model=pipe.model, tokenizer=folder, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"\['device_map'\] given both directly and in model_kwargs"):
        pipeline(model=folder, device_map="cpu", model_kwargs={"device_map": "cpu"})


def test_hub_keywords_reach_the_tokenizer_too(folder, monkeypatch):
    """model_kwargs' hub keywords (cache_dir, token, ...) and revision load the tokenizer as well as the
    model, as transformers' pipeline does; before, the tokenizer was looked up without them."""
    import bamba.checkpoint as ckpt
    import bamba.hub as hub

    seen = []
    real = hub.resolve_folder

    def recording(path, revision=None, **hub):
        seen.append((revision, hub))
        return real(path, revision=revision, **hub)

    monkeypatch.setattr(ckpt, "resolve_folder", recording)  # (the model's loader)
    monkeypatch.setattr(hub, "resolve_folder", recording)  # (the tokenizer's)
    pipeline(model=folder, revision="main", model_kwargs={"local_files_only": True})
    assert len(seen) >= 3  # the model, then tokenizer.json and its other files
    assert all(call == ("main", {"local_files_only": True}) for call in seen)
    model = BambaForCausalLM.from_pretrained(folder)
    seen.clear()  # an already loaded model: the same keywords go to the tokenizer alone
    pipeline(model=model, tokenizer=folder, revision="main", model_kwargs={"local_files_only": True})
    assert seen and all(call == ("main", {"local_files_only": True}) for call in seen)


def test_decode_options_reach_the_tokenizer(pipes, monkeypatch):
    """skip_special_tokens and clean_up_tokenization_spaces go to decode (the demo's BPE tokenizer and
    short greedy runs show no difference in text, so the calls are recorded)."""
    ours, _ = pipes
    calls = []
    real = ours.tokenizer.decode
    monkeypatch.setattr(ours.tokenizer, "decode", lambda ids, **kw: calls.append(kw) or real(ids, **kw))
    ours("ROMEO:", max_new_tokens=2, skip_special_tokens=False, clean_up_tokenization_spaces=True)
    assert calls and all(
        kw["skip_special_tokens"] is False and kw["clean_up_tokenization_spaces"] is True for kw in calls
    )
    calls.clear()
    ours("ROMEO:", max_new_tokens=2)
    assert calls and all(kw["skip_special_tokens"] is True for kw in calls)  # transformers' default
