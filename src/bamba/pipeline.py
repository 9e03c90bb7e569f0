"""`bamba.pipeline("text-generation", model=...)`: strings or chats in, generated text out, like transformers."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from .demo import demo_path
from .generation import generate, generation_config_fields
from .hub import HUB_KEYWORDS
from .model import BambaForCausalLM
from .sampling import eos_ids_with
from .tokenizer import Tokenizer

Chat = list[dict[str, str]]
_INPUT_FORMS = (
    "a string, a list of strings, a chat (a list of {'role': ..., 'content': ...} dicts) or a list of chats"
)


def _is_chat(x: Any) -> bool:
    return isinstance(x, list | tuple) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def _check_chat(chat: Any, where: str) -> None:
    for i, m in enumerate(chat):
        if "role" not in m or "content" not in m:
            raise ValueError(
                f"{where}[{i}]: a chat message needs 'role' and 'content' keys, found {sorted(m)}"
            )


def _as_batch(inputs: Any) -> tuple[bool, list]:
    """(single, items): the pipeline's input as a list of prompts (str) and chats, checked."""
    if isinstance(inputs, str):
        return True, [inputs]
    if isinstance(inputs, dict):
        raise TypeError(
            "pipeline inputs: a single message dict is not a chat; pass a list of messages, "
            f"[{{'role': ..., 'content': ...}}]. The pipeline takes {_INPUT_FORMS}"
        )
    if not isinstance(inputs, list | tuple):
        raise TypeError(f"pipeline inputs must be {_INPUT_FORMS}; found {type(inputs).__name__}")
    if not inputs:
        raise ValueError("the pipeline got an empty list of inputs")
    if _is_chat(inputs):
        _check_chat(inputs, "inputs")
        return True, [list(inputs)]
    for i, item in enumerate(inputs):
        if _is_chat(item):
            _check_chat(item, f"inputs[{i}]")
        elif not isinstance(item, str):
            raise ValueError(
                f"pipeline inputs[{i}] must be a string or a list of chat messages ({{'role', 'content'}} "
                f"dicts), found {type(item).__name__}"
            )
    return False, list(inputs)


class TextGenerationPipeline:
    """Callable on a prompt, a list of prompts, a chat (list of {"role", "content"}), or a list of chats.

    Returns, per input, a list of `{"generated_text": ...}` (one per returned sequence): the prompt plus
    its continuation when `return_full_text` (default), else the continuation alone; for a chat, the
    messages with the assistant's reply appended, or, when the chat ends with an assistant message
    (`continue_final_message`, default: whether the last role is "assistant"), that message continued.
    `return_tensors=True` gives `{"generated_token_ids": [...]}` (prompt and continuation) instead.
    A single input gives the list alone, as transformers. Also as in transformers' pipeline: `prefix`
    (text put before each string prompt, not shown in the output), `stop_sequence` (stop strings),
    `skip_special_tokens` (default True) and `clean_up_tokenization_spaces` for decoding,
    `add_special_tokens` for string prompts, `tools` / `documents` for chat templates, `batch_size`
    (prompts generated together, left-padded; default: all of them, with each prompt's output as if it
    ran alone; one by one when sampling, as transformers, so that a seed gives each prompt its draws,
    and with a `streamer`, which then streams them one after the other), and `generation_config` (a
    GenerationConfig or a dict, its fields below explicit arguments). Other keyword arguments are those of `bamba.generation.generate` (default
    max_new_tokens=50, greedy unless do_sample=True; transformers 5's pipeline samples 256 tokens at
    temperature 0.7 by default).
    """

    def __init__(self, model: BambaForCausalLM, tokenizer: Tokenizer, **generate_defaults: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.generate_defaults = generate_defaults

    def __call__(
        self, inputs: str | list[str] | Chat | list[Chat], return_full_text: bool | None = None, **kwargs: Any
    ) -> list:
        single, batch = _as_batch(inputs)
        options = {**self.generate_defaults, **kwargs}
        if return_full_text is not None:
            options["return_full_text"] = return_full_text
        config = options.pop("generation_config", None)
        if config is not None:  # its fields below the explicit arguments
            options = {**generation_config_fields(config), **options}
        pop = options.pop
        return_full_text, return_tensors, return_text = (
            pop("return_full_text", None),
            pop("return_tensors", None),
            pop("return_text", None),
        )
        # transformers' rules: return_tensors (any value but None) asks for ids; the three exclude each other
        if return_full_text is not None and (return_text is not None or return_tensors is not None):
            other = "return_text" if return_text is not None else "return_tensors"
            raise ValueError(f"return_full_text and {other} exclude each other")
        if return_tensors is not None and return_text is not None:
            raise ValueError("return_text and return_tensors exclude each other")
        output = (
            "ids" if return_tensors is not None else "full" if return_full_text in (None, True) else "new"
        )
        run = _Run(
            output=output,
            prefix=pop("prefix", None) or "",
            continue_final_message=pop("continue_final_message", None),
            add_special_tokens=pop("add_special_tokens", True),
            skip_special_tokens=pop("skip_special_tokens", None),
            clean_up_tokenization_spaces=pop("clean_up_tokenization_spaces", None),
            template_kwargs={k: v for k in ("tools", "documents") if (v := pop(k, None)) is not None},
        )
        stop_sequence = pop("stop_sequence", None)
        if stop_sequence is not None:  # as transformers: stop strings (the stop text stays in the output)
            options["stop_strings"] = stop_sequence
        batch_size = pop("batch_size", None)
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
        unknown = sorted(set(options) - set(inspect.signature(generate).parameters))
        if unknown:
            raise TypeError(
                f"pipeline: unknown argument(s) {unknown}; it takes transformers' pipeline arguments (see "
                "TextGenerationPipeline) and those of bamba.generation.generate"
            )
        if batch_size is None:
            # All prompts at once, unless a row's output would depend on the others: max_length counts each
            # prompt's own tokens, token ids would carry the batch's padding, and sampled rows would share
            # one random stream (transformers runs prompts one by one by default: with these, so do we, and
            # a seeded torch.manual_seed gives its draws).
            alone = (
                output == "ids"
                or bool(options.get("do_sample"))
                or options.get("streamer") is not None  # (a streamer takes one row at a time)
                or (options.get("max_new_tokens") is None and options.get("max_length") is not None)
            )
            batch_size = 1 if alone else len(batch)
        results = []
        for i in range(0, len(batch), batch_size):
            results += self._generate(batch[i : i + batch_size], run, options)
        return results[0] if single else results

    def _generate(self, batch: list, run: _Run, options: dict[str, Any]) -> list[list[dict[str, Any]]]:
        """One left-padded `generate` over `batch`; per item, its list of outputs."""
        tok = self.tokenizer
        enc, continued = [], []
        for item in batch:
            if isinstance(item, str):
                enc.append(tok.encode(run.prefix + item, add_special_tokens=run.add_special_tokens))
                continued.append(False)
                continue
            cont = run.continue_final_message
            cont = item[-1]["role"] == "assistant" if cont is None else cont
            text = tok.apply_chat_template(
                item,
                add_generation_prompt=not cont,
                continue_final_message=cont,
                tokenize=False,
                **run.template_kwargs,
            )
            enc.append(tok.encode(text, add_special_tokens=False))
            continued.append(bool(cont))
        if any(len(e) == 0 for e in enc):
            raise ValueError("a prompt encodes to zero tokens")
        width = max(len(e) for e in enc)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(enc), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros(len(enc), width, dtype=torch.long)
        for i, e in enumerate(enc):  # left padding
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        options = {
            "eos_token_id": eos_ids_with(self.model, tok),
            **({"pad_token_id": pad} if pad is not None else {}),  # (None given would mean none)
            "tokenizer": tok,
            **options,
        }
        if options.get("max_new_tokens") is None and options.get("max_length") is None:
            options["max_new_tokens"] = 50
        if run.prefix:  # as transformers: a total length counts the prefix's tokens too
            prefix_len = len(tok.encode(run.prefix, add_special_tokens=False))
            for length, new_tokens in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
                if options.get(length) is not None and options.get(new_tokens) is None:
                    options[length] += prefix_len
        n = options.get("num_return_sequences", 1)
        out = generate(self.model, ids, attention_mask=mask, **options)
        # (len(batch) * n, width + new) ids; also with return_dict_in_generate
        out = getattr(out, "sequences", out)
        skip = True if run.skip_special_tokens is None else run.skip_special_tokens
        results = []
        for i, item in enumerate(batch):
            row: list[dict[str, Any]] = []
            for seq in out[i * n : (i + 1) * n]:
                if run.output == "ids":
                    row.append({"generated_token_ids": seq.tolist()})
                    continue
                new = tok.decode(
                    seq[width:],
                    skip_special_tokens=skip,
                    clean_up_tokenization_spaces=run.clean_up_tokenization_spaces,
                )
                text: Any = new
                if run.output == "full" and isinstance(item, str):
                    text = item + new
                elif run.output == "full" and continued[i]:
                    text = [*item[:-1], {"role": item[-1]["role"], "content": item[-1]["content"] + new}]
                elif run.output == "full":
                    text = [*item, {"role": "assistant", "content": new}]
                row.append({"generated_text": text})
            results.append(row)
        return results


@dataclass
class _Run:
    """The pipeline's own options for one call (the rest go to `generate`)."""

    output: str  # "full" (prompt + new text), "new" (new text), "ids" (token ids)
    prefix: str
    continue_final_message: bool | None
    add_special_tokens: bool
    skip_special_tokens: bool | None
    clean_up_tokenization_spaces: bool | None
    template_kwargs: dict[str, Any]


def pipeline(
    task: str = "text-generation",
    model: str | BambaForCausalLM | None = None,
    tokenizer: str | Tokenizer | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    quantization: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    revision: str | None = None,
    token: str | bool | None = None,
    **generate_defaults: Any,
) -> TextGenerationPipeline:
    """Build a text-generation pipeline from a checkpoint folder, hub repo id, or loaded model.

    `model=None` uses the embedded demo model. The tokenizer defaults to the one in the model's folder.
    A model loaded here is for inference: `pack=True` (see `bamba.linear.pack_for_cpu`). As in
    transformers, `model_kwargs`, `torch_dtype`, `device_map`, `revision` and `token` go to
    `from_pretrained` (see `bamba.checkpoint.load_pretrained`), and the hub's keywords among them
    (`revision`, `token`, `cache_dir`, ...) also to the tokenizer's; other keywords are `generate`'s
    defaults.
    """
    direct = {
        "dtype": dtype,
        "device": device,
        "quantization": quantization,
        "torch_dtype": torch_dtype,
        "device_map": device_map,
        "revision": revision,
        "token": token,
    }
    direct = {k: v for k, v in direct.items() if v is not None}
    both = sorted(set(direct) & set(model_kwargs or {}))
    if both:
        raise ValueError(f"pipeline: {both} given both directly and in model_kwargs")
    load_kwargs = {**(model_kwargs or {}), **direct}
    if task != "text-generation":
        raise ValueError(f"task {task!r} is not supported; only 'text-generation'")
    if model is None:
        model = demo_path()
    tokenizer_keywords = HUB_KEYWORDS | {"revision"}  # how a tokenizer is fetched
    if isinstance(model, BambaForCausalLM):
        if tokenizer is None:
            raise ValueError("pass tokenizer= (a folder or a Tokenizer) with an already loaded model")
        loading = sorted(set(load_kwargs) - tokenizer_keywords)  # (those go to the tokenizer alone)
        if loading:
            raise ValueError(f"pipeline: {loading} set how a model loads; the model given is already loaded")
        lm = model
    else:
        lm = BambaForCausalLM.from_pretrained(model, **{"pack": True, **load_kwargs})
        tokenizer = tokenizer if tokenizer is not None else model
    hub = {k: v for k, v in load_kwargs.items() if k in tokenizer_keywords}
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_pretrained(tokenizer, **hub)
    return TextGenerationPipeline(lm, tok, **generate_defaults)
