"""The embedded demo model: it ships in the package, generates out of the box, and transformers reads it."""

from __future__ import annotations

import subprocess
import sys

import torch

from bamba import BambaForCausalLM, Tokenizer, pipeline
from bamba.demo import demo_path
from bamba.generation import generate


def test_demo_folder_is_complete_and_small():
    import os

    folder = demo_path()
    files = set(os.listdir(folder))
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert name in files, name
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in files if not f.endswith(".py"))
    assert size < 16 * 2**20
    model = BambaForCausalLM.from_pretrained(folder)
    kinds = model.config.layers_block_type
    assert "attention" in kinds and kinds.count("mamba") >= 2


def test_transformers_loads_demo_with_same_logits_and_greedy_text():
    import transformers

    transformers.logging.set_verbosity_error()
    folder = demo_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ours = BambaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(folder)
    prompt = "ROMEO:\nWhat light"
    ids = tok.encode(prompt)
    assert ids == ref_tok(prompt)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref(x, use_cache=False).logits, atol=1e-4, rtol=1e-4)
    ours_ids = generate(ours, x, max_new_tokens=24)
    ref_ids = ref.generate(x, max_new_tokens=24, do_sample=False)
    assert torch.equal(ours_ids, ref_ids)
    assert tok.decode(ours_ids[0]) == ref_tok.decode(ref_ids[0])


def test_demo_writes_shakespeare_like_text():
    generator = pipeline("text-generation")
    greedy = generator("ROMEO:", max_new_tokens=40, do_sample=False)[0]["generated_text"]
    assert greedy.startswith("ROMEO:\n")  # a speaker's name is followed by the speech on the next line
    words = [w.strip(".,;:!?'-") for w in greedy.split()[1:]]
    assert len(words) >= 3 and all(w.replace("'", "").isalpha() for w in words if w)
    sampled = generator("KING RICHARD III:", max_new_tokens=60, do_sample=True, seed=0, eos_token_id=[])
    text = sampled[0]["generated_text"]
    assert len(text.split()) > 15 and text.count("\n") >= 2


def test_bamba_generate_runs_out_of_the_box():
    r = subprocess.run(
        [sys.executable, "-m", "bamba", "generate", "--max-new-tokens", "30", "--seed", "0", "ROMEO:"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 20
