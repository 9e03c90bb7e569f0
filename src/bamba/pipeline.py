"""`bamba.pipeline("text-generation", model=...)`: strings or chats in, generated text out, like transformers."""

from __future__ import annotations

from typing import Any

import torch

from .generation import eos_ids_with, generate
from .model import BambaForCausalLM
from .tokenizer import Tokenizer

Chat = list[dict[str, str]]


def _is_chat(x: Any) -> bool:
    return isinstance(x, list | tuple) and len(x) > 0 and all(isinstance(m, dict) and "role" in m for m in x)


class TextGenerationPipeline:
    """Callable on a prompt, a list of prompts, a chat (list of {"role", "content"}), or a list of chats.

    Returns, per input, a list of `{"generated_text": ...}` (one per returned sequence): the prompt plus
    its continuation when `return_full_text` (default), else the continuation alone; for a chat, the
    messages with the assistant's reply appended. A single input gives the list alone, as transformers.
    Generation keyword arguments are those of `bamba.generation.generate` (default max_new_tokens=50).
    """

    def __init__(self, model: BambaForCausalLM, tokenizer: Tokenizer, **generate_defaults: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.generate_defaults = generate_defaults

    def __call__(
        self, inputs: str | list[str] | Chat | list[Chat], return_full_text: bool = True, **kwargs: Any
    ) -> list:
        single = isinstance(inputs, str) or _is_chat(inputs)
        batch = [inputs] if single else list(inputs)
        if not batch:
            raise ValueError("the pipeline got an empty list of inputs")
        budget = {**self.generate_defaults, **kwargs}
        if budget.get("max_new_tokens") is None and budget.get("max_length") is not None and len(batch) > 1:
            # max_length counts each prompt's own tokens (as transformers' pipeline, which runs them one by
            # one), not the padded width of a batch
            return [self(item, return_full_text, **kwargs) for item in batch]
        prompts = []
        for item in batch:
            if _is_chat(item):
                prompts.append(
                    self.tokenizer.apply_chat_template(item, add_generation_prompt=True, tokenize=False)
                )
            elif isinstance(item, str):
                prompts.append(item)
            else:
                raise ValueError(
                    f"pipeline input must be a string or a list of chat messages, found {type(item).__name__}"
                )
        chat = [_is_chat(item) for item in batch]
        enc = [self.tokenizer.encode(p, add_special_tokens=not c) for p, c in zip(prompts, chat)]
        if any(len(e) == 0 for e in enc):
            raise ValueError("a prompt encodes to zero tokens")
        width = max(len(e) for e in enc)
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        ids = torch.full((len(enc), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros(len(enc), width, dtype=torch.long)
        for i, e in enumerate(enc):  # left padding
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        options = {
            "eos_token_id": eos_ids_with(self.model, self.tokenizer),
            "pad_token_id": pad,
            "tokenizer": self.tokenizer,
            **budget,
        }
        if options.get("max_new_tokens") is None and options.get("max_length") is None:
            options["max_new_tokens"] = 50
        n = options.get("num_return_sequences", 1)
        out = generate(self.model, ids, attention_mask=mask, **options)
        results = []
        for i, item in enumerate(batch):
            row = []
            for j in range(n):
                new = self.tokenizer.decode(out[i * n + j, width:].tolist(), skip_special_tokens=True)
                if chat[i]:
                    text: Any = [*item, {"role": "assistant", "content": new}] if return_full_text else new
                else:
                    text = item + new if return_full_text else new
                row.append({"generated_text": text})
            results.append(row)
        return results[0] if single else results


def pipeline(
    task: str = "text-generation",
    model: str | BambaForCausalLM | None = None,
    tokenizer: str | Tokenizer | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    quantization: str | None = None,
    **generate_defaults: Any,
) -> TextGenerationPipeline:
    """Build a text-generation pipeline from a checkpoint folder, hub repo id, or loaded model.

    `model=None` uses the embedded demo model. The tokenizer defaults to the one in the model's folder.
    A model loaded here is for inference: `pack=True` (see `bamba.linear.pack_for_cpu`).
    """
    if task != "text-generation":
        raise ValueError(f"task {task!r} is not supported; only 'text-generation'")
    if model is None:
        from .demo import demo_path

        model = demo_path()
    if isinstance(model, BambaForCausalLM):
        if tokenizer is None:
            raise ValueError("pass tokenizer= (a folder or a Tokenizer) with an already loaded model")
        lm = model
    else:
        lm = BambaForCausalLM.from_pretrained(
            model, dtype=dtype, device=device, quantization=quantization, pack=True
        )
        tokenizer = tokenizer if tokenizer is not None else model
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_pretrained(tokenizer)
    return TextGenerationPipeline(lm, tok, **generate_defaults)
