"""Tokenizer: a thin layer over Hugging Face `tokenizers` that reads and writes the Hugging Face folder layout.

Its behaviour follows transformers' `PreTrainedTokenizerFast` (v5: `TokenizersBackend`) loaded from a
tokenizer.json, which is what the tests compare against:

- tokenizer.json's post-processor alone decides whether BOS / EOS are added. transformers drops
  `add_bos_token` / `add_eos_token` from tokenizer_config.json when a tokenizer.json exists, and so do we;
  a tokenizer.json without a post-processor adds nothing.
- Special tokens come from tokenizer_config.json, overridden by special_tokens_map.json unless the config has
  `added_tokens_decoder`. Named special tokens missing from the added vocabulary are added as special tokens
  (new ids at the end when they are not in the model's vocabulary either).
- `clean_up_tokenization_spaces` is applied on decode only for non-BPE models: transformers skips it for BPE,
  where it would delete real spaces before punctuation.
- Chat templates in files (chat_template.jinja, additional_chat_templates/<name>.jinja) replace the
  `chat_template` of tokenizer_config.json; saving into a folder that keeps its templates in files rewrites
  those files (stale ones removed), else the config holds them (a list when there are named ones).
"""

from __future__ import annotations

import codecs
import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from . import hub, templates
from .checkpoint import read_json
from .files import MAX_JSON_BYTES, atomic_write, remove_dead_staging
from .textfiles import check_files, iter_text_files

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
ADDITIONAL_TEMPLATES_DIR = "additional_chat_templates"

# The named special tokens of transformers, in the order it registers them.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_NO_MAX_LENGTH = int(1e30)  # transformers' model_max_length when the config has none
MAX_TRAINED_VOCAB_SIZE = 1 << 24  # train_tokenizer's limit (the BPE trainer preallocates per token)

# Role header, content, EOS; BOS once at the start, because chat text is encoded without special tokens.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# transformers' apply_chat_template arguments that have no counterpart here: an error when set, rather
# than being passed to the template as variables.
_UNSUPPORTED_CHAT_ARGS = (
    "truncation",
    "max_length",
    "return_assistant_tokens_mask",
    "sanitize_control_tokens",
)
_CONTINUE_MARKER = "BAMBA_CONTINUE_FINAL_MESSAGE "


def _read_json_object(path: str) -> dict[str, Any]:
    """A tokenizer_config.json or special_tokens_map.json, its entries that we read checked."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found a JSON {type(value).__name__}")
    problem = _config_problem(value)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return value


def _is_token(value: Any) -> bool:
    """A special token as a config stores it: a string, or an AddedToken dict with a string `content`."""
    return isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str))


def _config_problem(config: dict[str, Any]) -> str | None:
    """What is wrong with the entries of a tokenizer config that loading reads, or None."""
    for name in SPECIAL_TOKEN_NAMES:
        if config.get(name) is not None and not _is_token(config[name]):
            return f"{name}={json.dumps(config[name])[:80]} is invalid: expected a string or {{'content': string}}"
    for name in ("extra_special_tokens", "additional_special_tokens"):
        value = config.get(name)
        tokens = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if value is not None and (tokens is None or not all(map(_is_token, tokens))):
            return (
                f"{name} is invalid: expected a list (or an object) of tokens, found {json.dumps(value)[:80]}"
            )
    decoder = config.get("added_tokens_decoder")
    if decoder is not None and not (
        isinstance(decoder, dict)
        and all(
            k.isdigit() and len(k) < 10 and _is_token(v) and isinstance(v, dict) for k, v in decoder.items()
        )
    ):
        return f"added_tokens_decoder is invalid: expected {{id: {{'content': ...}}}}, found {json.dumps(decoder)[:80]}"
    template = config.get("chat_template")
    if template is not None and not (
        isinstance(template, str)
        or (isinstance(template, dict) and all(isinstance(v, str) for v in template.values()))
        or (
            isinstance(template, list)
            and all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                for t in template
            )
        )
    ):
        return "chat_template is invalid: expected a string, {name: template} or [{name, template}]"
    length = config.get("model_max_length")
    if length is not None and not (
        isinstance(length, int | float)
        and not isinstance(length, bool)
        and math.isfinite(length)
        and length >= 0
    ):
        return f"model_max_length={json.dumps(length)[:40]} is invalid: expected a number >= 0"
    for name in ("split_special_tokens", "clean_up_tokenization_spaces"):
        if name in config and not isinstance(config[name], bool):
            return f"{name}={json.dumps(config[name])[:40]} is invalid: expected true or false"
    if config.get("padding_side", "right") not in ("left", "right"):
        return (
            f"padding_side={json.dumps(config['padding_side'])[:40]} is invalid: expected 'left' or 'right'"
        )
    return None


def _resolve(path: str | os.PathLike, filename: str, required: bool, **hub_kwargs: Any) -> str | None:
    """Path of `filename` in a local folder or a Hub repo id (via the shared checkpoint resolver);
    None when optional and absent."""
    folder = hub.resolve_folder(path, **hub_kwargs)
    file = os.path.join(folder, filename)
    if os.path.isfile(file):
        return file
    if required:
        raise FileNotFoundError(f"tokenizer folder {folder!r} has no {filename}")
    return None


def _token_content(value: Any) -> str | None:
    """A special token as stored in a config: a string, or an AddedToken dict with a `content` key."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token should be a string or a dict with 'content', got {value!r}")


def _added_token(value: str | dict[str, Any], special: bool = True) -> AddedToken:
    """AddedToken from a string or a serialized AddedToken dict (its flags kept)."""
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=not special)
    fields = {k: value[k] for k in ("lstrip", "rstrip", "single_word", "normalized") if k in value}
    fields["special"] = value.get("special", special)
    return AddedToken(value["content"], **fields)


def _extra_special_tokens(config: dict[str, Any]) -> list[Any]:
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    return list(extra.values()) if isinstance(extra, dict) else list(extra)


def _named_templates(value: Any) -> dict[str, str]:
    """Chat templates by name from a config entry: a string (the default), {name: template} or
    [{name, template}]."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        value = {t["name"]: t["template"] for t in value}
    return dict(value)


def _read_text(path: str) -> str:
    """A template file's text; one that is not UTF-8, or too large to be a template, is named."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > MAX_JSON_BYTES:
            raise ValueError(f"{path}: larger than {MAX_JSON_BYTES} bytes, too large for a chat template")
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _read_named_templates(folder: str) -> dict[str, str]:
    """{name: template} from the <name>.jinja files of `folder` (none when it does not exist)."""
    named = {}
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".jinja"):
                named[name.removesuffix(".jinja")] = _read_text(os.path.join(folder, name))
    return named


def _template_files(
    template_file: str, extra_dir: str, default: str | None, named: dict[str, str]
) -> dict[str, str | None]:
    """path -> text of the template files that hold `default` (chat_template.jinja) and `named` (one
    extra_dir/<name>.jinja each); None for a file to remove (a default that is gone, stale named ones)."""
    files: dict[str, str | None] = {template_file: default}
    if os.path.isdir(extra_dir):
        files.update(
            {os.path.join(extra_dir, n): None for n in os.listdir(extra_dir) if n.endswith(".jinja")}
        )
    files.update({os.path.join(extra_dir, f"{name}.jinja"): template for name, template in named.items()})
    return files


def _write_files(files: dict[str, str | None], extra_dir: str) -> None:
    """Write each file whole (atomically) or remove it (None); extra_dir goes when it is left empty."""
    for path, text in files.items():
        if text is None:
            if os.path.exists(path):
                os.remove(path)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f, text=text: f.write(text))
    if os.path.isdir(extra_dir) and not os.listdir(extra_dir):
        os.rmdir(extra_dir)


def _file_text(path: str) -> str | None:
    """The text of a file, or None when it is absent or unreadable as UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


_PIECE_CHARS = 1 << 16  # a longer text is encoded in pieces of about this many characters (see _encode_rows)


def _piece_ends(text: str) -> Iterator[int]:
    """Where to cut `text` into pieces of about _PIECE_CHARS characters: before a space that has a
    non-space on each side (where the GPT-2 pattern starts a new pre-token: " ?\\p{L}+" and its siblings
    take the space, and nothing before it reaches past it); the last end is len(text)."""
    start = 0
    while len(text) - start > _PIECE_CHARS:
        cut = text.find(" ", start + _PIECE_CHARS)
        while cut != -1 and (text[cut - 1].isspace() or cut + 1 >= len(text) or text[cut + 1].isspace()):
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        yield cut
        start = cut
    yield len(text)


@contextlib.contextmanager
def _backend_errors(what: str) -> Iterator[None]:
    """The tokenizers library's errors (a bare Exception, or a Rust panic: a BaseException) as a
    ValueError that starts with `what`."""
    try:
        yield
    except (ValueError, OSError):
        raise
    except BaseException as e:
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit, MemoryError (a BaseException too, here: not caught)
        raise ValueError(f"{what} ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None


# transformers' clean_up_tokenization: drop the space a word-piece decoder puts before punctuation.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"))
_CLEAN_UP += ((" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _clean_up_spaces(text: str) -> str:
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


# The names a message's reasoning goes by; templates read one or another (transformers 5 fills them all).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """`message` with its reasoning (the first of _REASONING_FIELDS it has) also under reasoning_content and,
    unless it has its own, thinking, as transformers 5 passes messages to chat templates."""
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _check_chat_arguments(
    messages: Any,
    add_generation_prompt: bool,
    continue_final_message: bool | str,
    tools: Sequence[dict[str, Any]] | None,
) -> None:
    """apply_chat_template's messages and flags: a chat (or a list of chats), not empty, flags that agree."""
    if isinstance(messages, str | bytes | dict) or not isinstance(messages, Sequence):
        raise TypeError(
            "apply_chat_template: messages must be a list of {'role', 'content'} dicts (or a list of such "
            f"lists), found {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("cannot apply a chat template to an empty list of messages")
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt exclude each other: the first continues the "
            "last message, the second starts a new assistant message"
        )
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise TypeError("apply_chat_template: tools should be JSON-schema dicts")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens, chat template and settings of tokenizer_config.json.

    `config` is the tokenizer_config.json dict (already merged with special_tokens_map.json); keys we do not use
    are kept and written back by `save_pretrained`.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        config: dict[str, Any] | None = None,
        chat_template: str | None = None,
        name_or_path: str = "",
        named_chat_templates: dict[str, str] | None = None,
    ):
        self.backend = backend
        self.config = dict(config or {})
        self.name_or_path = name_or_path
        # Padding is done here; encode never truncates (transformers ignores both settings of tokenizer.json too).
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = bool(self.config.get("split_special_tokens", False))

        self._special = {name: _token_content(self.config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        self.extra_special_tokens = [_token_content(t) for t in _extra_special_tokens(self.config)]
        extra = self.config.get("extra_special_tokens")
        # named extra tokens ({"image_token": "<image>"}): attributes and template variables, as transformers
        self._named_extra = (
            {k: _token_content(v) for k, v in extra.items()} if isinstance(extra, dict) else {}
        )
        self._register_added_tokens()

        # the default template (chat_template.jinja, else the config's) and the named others
        templates = {**_named_templates(self.config.get("chat_template")), **(named_chat_templates or {})}
        if chat_template is not None:
            templates["default"] = chat_template
        self.chat_template = templates.pop("default", None)
        self.named_chat_templates = templates  # e.g. "tool_use", picked when tools are given
        self.model_max_length = int(self.config.get("model_max_length", _NO_MAX_LENGTH))
        self.clean_up_tokenization_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))

    def _templates(self) -> dict[str, str]:
        """Every chat template by name: the default one (if any) as "default", first, then the named."""
        default = {"default": self.chat_template} if self.chat_template is not None else {}
        return {**default, **self.named_chat_templates}

    def _register_added_tokens(self) -> None:
        """Add the config's added tokens and named special tokens that tokenizer.json lacks, as transformers does."""
        present = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        to_add: list[AddedToken] = []
        decoder = self.config.get("added_tokens_decoder") or {}
        for _, value in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            if value["content"] not in present:
                to_add.append(_added_token(value, special=value.get("special", False)))
                present.add(value["content"])
        named = [self.config.get(name) for name in SPECIAL_TOKEN_NAMES] + _extra_special_tokens(self.config)
        for value in named:
            if value is not None and _token_content(value) not in present:
                to_add.append(_added_token(value))
                present.add(_token_content(value))
        if to_add:
            self.backend.add_tokens(to_add)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> Tokenizer:
        """Load tokenizer.json (required), tokenizer_config.json, special_tokens_map.json, chat_template.jinja."""
        tokenizer_file = _resolve(path_or_repo_id, TOKENIZER_FILE, True, **hub_kwargs)
        config: dict[str, Any] = {}
        if config_file := _resolve(path_or_repo_id, CONFIG_FILE, False, **hub_kwargs):
            config = _read_json_object(config_file)
        # Like transformers: the legacy special_tokens_map.json only counts when the config has no
        # added_tokens_decoder, and then it overrides the config's entries.
        if "added_tokens_decoder" not in config:
            if map_file := _resolve(path_or_repo_id, SPECIAL_TOKENS_MAP_FILE, False, **hub_kwargs):
                config.update(_read_json_object(map_file))
        chat_template = None
        if template_file := _resolve(path_or_repo_id, CHAT_TEMPLATE_FILE, False, **hub_kwargs):
            chat_template = _read_text(template_file)
        # transformers 5 writes named templates as additional_chat_templates/<name>.jinja
        named = _read_named_templates(os.path.join(os.path.dirname(tokenizer_file), ADDITIONAL_TEMPLATES_DIR))
        if chat_template is not None or named:  # as transformers: template files replace the config's
            config.pop("chat_template", None)
        with _backend_errors(f"{tokenizer_file}: not a valid tokenizer.json"):
            backend = BackendTokenizer.from_file(tokenizer_file)
        folder = os.path.dirname(tokenizer_file)
        with _backend_errors(f"{folder}: tokenizer.json and the tokenizer's config do not fit together"):
            return cls(
                backend,
                config,
                chat_template=chat_template,
                name_or_path=os.fspath(path_or_repo_id),
                named_chat_templates=named,
            )

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (and the template files
        of a folder that keeps its templates in files) into `folder`.

        Each file is written whole (a temporary file, renamed). tokenizer.json, which loading requires,
        goes last; where the folder holds another tokenizer, its tokenizer.json is removed first, so a save
        cut short leaves a folder that fails to load (no tokenizer.json) rather than one that mixes two."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        config = dict(self.config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for name in SPECIAL_TOKEN_NAMES:
            if self._special[name] is not None or name in config:
                config[name] = self._special[name]
        config["model_max_length"] = self.model_max_length
        config["clean_up_tokenization_spaces"] = self.clean_up_tokenization_spaces
        template_file = os.path.join(folder, CHAT_TEMPLATE_FILE)
        extra_dir = os.path.join(folder, ADDITIONAL_TEMPLATES_DIR)
        files: dict[str, str | None] = {}
        if os.path.exists(template_file) or os.path.isdir(extra_dir):
            # The folder keeps its templates in files, which loading prefers to the config's entry: they
            # are rewritten to hold exactly these templates (none stale), and the config holds none.
            files = _template_files(template_file, extra_dir, self.chat_template, self.named_chat_templates)
            config.pop("chat_template", None)
        elif self.named_chat_templates:  # the list form, which transformers reads too
            config["chat_template"] = [{"name": k, "template": v} for k, v in self._templates().items()]
        elif self.chat_template is not None:
            config["chat_template"] = self.chat_template
        else:
            config.pop("chat_template", None)  # removed since loading: not written back
        special_map: dict[str, Any] = dict(self.special_tokens_map)
        if self.extra_special_tokens:
            special_map["additional_special_tokens"] = list(self.extra_special_tokens)
        files[os.path.join(folder, CONFIG_FILE)] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        files[os.path.join(folder, SPECIAL_TOKENS_MAP_FILE)] = (
            json.dumps(special_map, indent=2, ensure_ascii=False) + "\n"
        )
        tokenizer_path = os.path.join(folder, TOKENIZER_FILE)
        files[tokenizer_path] = self.backend.to_str(pretty=True)
        if os.path.exists(tokenizer_path) and any(_file_text(p) != text for p, text in files.items()):
            os.remove(tokenizer_path)  # another tokenizer's: gone before any of its files is replaced
        _write_files(files, extra_dir)  # (tokenizer.json last: dicts keep their order)
        # what a tokenizer save of this machine that was killed left (not a checkpoint's staged shards)
        remove_dead_staging(
            folder, (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_FILE)
        )

    # ---- special tokens -------------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        """The config's named extra special tokens: `tok.image_token`, `tok.image_token_id`."""
        named = self.__dict__.get("_named_extra") or {}
        if name in named:
            return named[name]
        if name.endswith("_id") and name[:-3] in named:
            return self.token_to_id(named[name[:-3]])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def bos_token(self) -> str | None:
        return self._special["bos_token"]

    @property
    def eos_token(self) -> str | None:
        return self._special["eos_token"]

    @property
    def pad_token(self) -> str | None:
        return self._special["pad_token"]

    @property
    def unk_token(self) -> str | None:
        return self._special["unk_token"]

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, e.g. {"bos_token": "<|bos|>", ...} (chat template variables)."""
        return {name: token for name, token in self._special.items() if token is not None}

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` starts with BOS (decided by the post-processor)."""
        bos = self.bos_token_id
        return bos is not None and self.backend.encode("", add_special_tokens=True).ids[:1] == [bos]

    @property
    def vocab_size(self) -> int:
        """Size of the full vocabulary, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"special_tokens={self.special_tokens_map})"
        )

    # ---- encode / decode ------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a string, found {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(
        self,
        texts: str | Sequence[str],
        text_pair: Any = None,
        *,
        padding: bool | str = True,
        padding_side: str = "left",
        return_tensors: str | None = "pt",
        add_special_tokens: bool = True,
    ) -> dict[str, Any]:
        """Encode a batch: {"input_ids", "attention_mask"}, padded to the longest row (pad id, else EOS id).

        `padding`: True / "longest" (default) or False / "do_not_pad". `return_tensors="pt"` gives (B, L)
        LongTensors, None gives lists of lists (also for a single string). Text pairs are not supported.
        """
        if text_pair is not None:
            raise TypeError(
                "text pairs are not supported (a second positional argument was given); pass one text or a "
                "list of texts, and the options by keyword (padding=...)"
            )
        if padding in (True, "longest", False, "do_not_pad"):
            padding = padding in (True, "longest")
        elif padding == "max_length":
            raise ValueError(
                "padding='max_length' needs max_length, which is not supported here; use padding=True (to "
                "the longest row)"
            )
        else:
            raise ValueError(f"padding={padding!r}: expected True / 'longest' or False / 'do_not_pad'")
        if not (
            isinstance(texts, str) or (isinstance(texts, Sequence) and all(isinstance(t, str) for t in texts))
        ):
            raise TypeError(f"texts must be a string or a list of strings, found {type(texts).__name__}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side should be 'left' or 'right', got {padding_side!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors should be 'pt' or None, got {return_tensors!r}")
        batch = [texts] if isinstance(texts, str) else list(texts)
        rows = self._encode_rows(batch, add_special_tokens)
        masks = [[1] * len(row) for row in rows]
        width = max(map(len, rows), default=0)
        ragged = any(len(row) != width for row in rows)
        if padding and ragged:
            pad_id = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
            if pad_id is None:
                raise ValueError(
                    f"cannot pad: tokenizer {self.name_or_path!r} has neither pad_token nor eos_token"
                )
            for i, row in enumerate(rows):
                n = width - len(row)
                if padding_side == "left":
                    rows[i], masks[i] = [pad_id] * n + row, [0] * n + masks[i]
                else:
                    rows[i], masks[i] = row + [pad_id] * n, masks[i] + [0] * n
        if return_tensors is None:
            return {"input_ids": rows, "attention_mask": masks}
        if ragged and not padding:
            raise ValueError("rows have different lengths: use padding=True or return_tensors=None")
        return {
            "input_ids": torch.tensor(rows, dtype=torch.long).view(len(rows), width),  # (B, L)
            "attention_mask": torch.tensor(masks, dtype=torch.long).view(len(rows), width),  # (B, L)
        }

    def _encode_rows(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """The ids of each text. A long text is encoded in pieces cut where the tokenizer is known to cut
        anyway (see `_piece_ends`), so that the tokenizers library's per-token records (about 250 bytes a
        token) are held for one piece at a time: the ids are the same as the whole text's."""
        if add_special_tokens or all(len(t) <= _PIECE_CHARS for t in texts) or not self._cuts_at_spaces():
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        rows = []
        for text in texts:
            ids: list[int] = []
            start = 0
            for end in _piece_ends(text):
                ids += self.backend.encode(text[start:end], add_special_tokens=False).ids
                start = end
            rows.append(ids)
        return rows

    def _cuts_at_spaces(self) -> bool:
        """Does encoding split a text at every space between two non-spaces, whatever surrounds it? True
        for byte-level BPE with the GPT-2 pattern, no normalizer and no added token holding whitespace
        (what `train_tokenizer` makes)."""
        pre = self.backend.pre_tokenizer
        return (
            self.backend.normalizer is None
            and isinstance(pre, pre_tokenizers.ByteLevel)
            and pre.use_regex
            and not pre.add_prefix_space
            and not any(re.search(r"\s", t.content) for t in self.backend.get_added_tokens_decoder().values())
        )

    def decode(
        self,
        ids: int | Iterable[int] | Iterable[Iterable[int]] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str | list[str]:
        """Text of one sequence of ids; a batch (2-d tensor, list of lists) gives a list of texts, as transformers.

        `clean_up_tokenization_spaces` (None: the tokenizer's setting) never applies to BPE models.
        """
        if hasattr(ids, "tolist"):  # a tensor or an array, 0-d included
            ids = ids.tolist()
        ids = [ids] if isinstance(ids, int) else list(ids)
        if ids and (isinstance(ids[0], list | tuple) or (hasattr(ids[0], "tolist") and ids[0].ndim > 0)):
            return self.batch_decode(ids, skip_special_tokens, clean_up_tokenization_spaces)  # rows: any form
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = (
            self.clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is None
            else clean_up_tokenization_spaces
        )
        if clean and not isinstance(self.backend.model, models.BPE):
            text = _clean_up_spaces(text)
        return text

    def batch_decode(
        self,
        batch: Iterable[Iterable[int]] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        if isinstance(batch, torch.Tensor):
            batch = batch.tolist()
        return [self.decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in batch]

    def stream_decoder(self, skip_special_tokens: bool = False) -> DecodeStream:
        """A `DecodeStream` over this tokenizer, for printing generated tokens as they come."""
        return DecodeStream(self, skip_special_tokens=skip_special_tokens)

    # ---- chat -----------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        *,
        continue_final_message: bool | str = False,
        tools: Sequence[dict[str, Any]] | None = None,
        documents: Sequence[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        padding: bool | str = False,
        return_tensors: str | None = None,
        return_dict: bool = True,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str | list[str] | list[int] | list[list[int]] | torch.Tensor | dict[str, Any]:
        """Render a chat (or a list of chats) with the chat template; the defaults and outputs of transformers 5.

        `tokenize=False` gives the text (a list of texts for a list of chats). `tokenize=True` (default)
        encodes it without special tokens (the template writes its own BOS) and gives, with `return_dict`
        (default), {"input_ids", "attention_mask"}, else the ids alone: lists, or (B, L) tensors with
        `return_tensors="pt"`. A list of chats of different lengths needs `padding=True` for tensors (padded
        on the config's `padding_side`, default right). `continue_final_message` leaves the last message
        open (no end-of-turn after it) so that generation continues it; a string names the field to
        continue instead of "content". Other keyword arguments are template variables, as in transformers.
        """
        unsupported = sorted(k for k in _UNSUPPORTED_CHAT_ARGS if kwargs.get(k))
        if unsupported:
            raise ValueError(f"apply_chat_template: {', '.join(unsupported)} is not supported here")
        for k in _UNSUPPORTED_CHAT_ARGS:
            kwargs.pop(k, None)  # passed as False / None: the default, nothing to do
        template = self._pick_chat_template(chat_template, tools)
        _check_chat_arguments(messages, add_generation_prompt, continue_final_message, tools)
        batched = isinstance(messages[0], list | tuple)
        chats = list(messages) if batched else [messages]
        variables = {**self.special_tokens_map, **self._named_extra, **kwargs}
        texts = [
            self._render_chat(
                chat, template, add_generation_prompt, continue_final_message, tools, documents, variables
            )
            for chat in chats
        ]
        if not tokenize:
            return texts if batched else texts[0]
        enc = self._encode_chats(texts, padding, return_tensors, tokenizer_kwargs)
        if not batched and return_tensors is None:
            enc = {k: v[0] for k, v in enc.items()}  # one chat: flat lists
        return enc if return_dict else enc["input_ids"]

    def _pick_chat_template(self, chat_template: str | None, tools: Sequence[dict[str, Any]] | None) -> str:
        """The template's text: `chat_template` by name or as text, else "tool_use" when tools are given
        and there is one (as transformers picks it), else the default."""
        named = self._templates()
        if chat_template is None and tools is not None and "tool_use" in named:
            chat_template = "tool_use"
        if chat_template is None:
            template = self.chat_template
        else:  # a template's name, else its text
            template = named.get(chat_template, chat_template)
        if template is None:
            raise ValueError(
                f"tokenizer {self.name_or_path!r} has no chat template (no default): neither a 'chat_template' "
                f"entry in {CONFIG_FILE} nor a {CHAT_TEMPLATE_FILE} file"
                + (f"; name one of {sorted(named)} with chat_template=" if named else "")
            )
        return template

    def _encode_chats(
        self,
        texts: list[str],
        padding: bool | str,
        return_tensors: str | None,
        tokenizer_kwargs: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Rendered chats encoded without special tokens unless `tokenizer_kwargs` say otherwise (the
        template writes its own BOS), padded on the config's `padding_side`."""
        call_kwargs = {"padding_side": self.config.get("padding_side", "right"), **(tokenizer_kwargs or {})}
        unknown = set(call_kwargs) - {"padding_side", "add_special_tokens"}
        if unknown:
            raise ValueError(
                f"apply_chat_template: tokenizer_kwargs {sorted(unknown)} are not supported here"
            )
        if padding not in (True, False, "longest", "do_not_pad"):
            raise ValueError(f"apply_chat_template: padding={padding!r} is not supported; use True or False")
        call_kwargs.setdefault("add_special_tokens", False)
        return self(texts, padding=padding in (True, "longest"), return_tensors=return_tensors, **call_kwargs)

    def _render_chat(
        self,
        chat: Sequence[dict[str, Any]],
        template: str,
        add_generation_prompt: bool,
        continue_final_message: bool | str,
        tools: Sequence[dict[str, Any]] | None,
        documents: Sequence[dict[str, Any]] | None,
        variables: dict[str, Any],
    ) -> str:
        """One chat rendered; with `continue_final_message`, cut right after the final message's text."""
        if not chat:
            raise ValueError("cannot apply a chat template to an empty list of messages")
        # transformers drops None-valued keys (templates test `'key' in message`, not `is none`), and passes a
        # message's reasoning under each of its names (templates read one or another)
        chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in chat]
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        copies = 1  # marked copies of the final text in the chat
        if continue_final_message:
            final = chat[-1].get(field)
            texts = (
                [i for i, b in enumerate(final) if isinstance(b, dict) and "text" in b]
                if isinstance(final, list | tuple)
                else []
            )  # content blocks with a text
            # A marker after the final text shows where it ends in the rendered chat. Its trailing space
            # tells whether the template trimmed the message: then the text is cut with its spaces trimmed.
            if isinstance(final, str):  # every copy of the field (reasoning has several names)
                names = (
                    [n for n in _REASONING_FIELDS if chat[-1].get(n) == final]
                    if field in _REASONING_FIELDS
                    else [field]
                )
                chat[-1] = {**chat[-1], **{n: final + _CONTINUE_MARKER for n in names}}
                copies = len(names)
            elif texts:  # the last text block
                blocks = list(final)
                final = blocks[texts[-1]]["text"]
                blocks[texts[-1]] = {**blocks[texts[-1]], "text": final + _CONTINUE_MARKER}
                chat[-1] = {**chat[-1], field: blocks}
            else:
                raise ValueError(
                    f"continue_final_message: the final message has no text in {field!r} to continue (a string, "
                    "or content blocks with a 'text')"
                )
        text = templates.render(
            template,
            repr(self.name_or_path),
            messages=chat,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        if not continue_final_message:
            return text
        # the final text's last rendering; with several copies (reasoning), the first (transformers cuts at
        # the last and leaves its marker in the earlier ones)
        at = (text.find if copies > 1 else text.rfind)(_CONTINUE_MARKER.strip())
        if at < 0 or final.strip() not in text:
            raise ValueError(
                f"continue_final_message: the chat template does not write the final message's {field!r} as "
                f"it is, so it cannot be continued (rendered: {text[:200]!r})"
            )
        return text[:at] if text.startswith(_CONTINUE_MARKER, at) else text[:at].rstrip()


class DecodeStream:
    """Incremental decoding: feed token ids one at a time, get back the newly completed text.

    Text is emitted only once it no longer ends in U+FFFD, so a multi-byte character split over several
    byte-level tokens comes out whole, after its last byte. Each step decodes a short window: the ids emitted
    last time (as context, so decoders that strip a leading space see the same neighbours as a full decode) plus
    the ids not yet emitted. The concatenation of all `step` results and `flush()` equals `decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] were emitted by the last step that emitted text
        self._read = 0  # ids[:_read] have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        done = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of the stream (an incomplete character decodes to U+FFFD)."""
        done = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done) :]


def train_tokenizer(
    files: list[str],
    vocab_size: int,
    out_dir: str,
    special_tokens: Sequence[str] = ("<|pad|>", "<|bos|>", "<|eos|>"),
    min_frequency: int = 2,
    *,
    model_max_length: int = 262144,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on text `files` and save it to `out_dir` in the Hugging Face layout.

    `special_tokens` are (pad, bos, eos, *extra) and get ids 0, 1, 2, ... in that order. Every encoded sequence
    starts with BOS. The result loads with transformers' AutoTokenizer and encodes identically. Training is
    deterministic for the same files and settings.
    """
    if len(special_tokens) < 3:
        raise ValueError(f"special_tokens should be (pad, bos, eos, *extra), got {tuple(special_tokens)}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if not isinstance(min_frequency, int) or min_frequency < 0:
        raise ValueError(
            f"min_frequency={min_frequency!r} must be an integer >= 0 (merges seen fewer times are not learnt)"
        )
    if not isinstance(vocab_size, int) or vocab_size > MAX_TRAINED_VOCAB_SIZE:
        # the trainer allocates memory for every requested token up front: a huge value aborts the process
        raise ValueError(f"vocab_size={vocab_size!r} must be an integer <= {MAX_TRAINED_VOCAB_SIZE}")
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(
            f"vocab_size={vocab_size} is below the {len(alphabet)} byte tokens + {len(special_tokens)} special tokens"
        )
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"training file {file!r} does not exist")
        _check_utf8(file)
    pad, bos, eos = special_tokens[:3]
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(_training_sequences(files), trainer)
    bos_id = backend.token_to_id(bos)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": None,  # byte-level BPE covers every byte: nothing is unknown
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    if len(special_tokens) > 3:
        config["additional_special_tokens"] = list(special_tokens[3:])
    tokenizer = Tokenizer(backend, config, chat_template=chat_template, name_or_path=out_dir)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


_TRAIN_RUN_CHARS = 1000  # longer runs of non-space characters are cut (see _training_sequences)


def _training_sequences(files: list[str]) -> Iterator[str]:
    """The files' lines (split at \\n, kept), as the tokenizers library reads files for training, except
    that a run of more than _TRAIN_RUN_CHARS non-space characters is cut into pieces of that many, each
    a sequence of its own: the BPE trainer's time grows with the square of a word's length (a run of
    250,000 letters took two minutes), and no word that long is ever learnt as a token."""
    long_run = re.compile(rf"\S{{{_TRAIN_RUN_CHARS + 1},}}")
    for path in files:
        with open(path, "rb") as f:
            for raw in f:
                line = raw.decode("utf-8")  # (checked to be UTF-8 before training)
                start = 0
                for m in long_run.finditer(line):
                    for cut in range(m.start() + _TRAIN_RUN_CHARS, m.end(), _TRAIN_RUN_CHARS):
                        yield line[start:cut]
                        start = cut
                yield line[start:]


def train_tokenizer_files(
    files: list[str], vocab_size: int, out_dir: str, min_frequency: int = 2
) -> dict[str, object]:
    """`train_tokenizer` on .txt and .jsonl `files` (`bamba train-tokenizer`); returns a summary.

    .txt files are read as they are; the documents of .jsonl files (their `text` fields) are first written
    to a temporary text file, one blank line between documents, so the tokenizer never learns JSON syntax.
    """
    if not files:
        raise ValueError("give at least one .txt or .jsonl file")
    check_files(files)
    with tempfile.TemporaryDirectory(prefix="bamba-tok-") as tmp:
        plain = []
        for i, path in enumerate(files):
            if Path(path).suffix.lower() == ".jsonl":
                text_path = os.path.join(tmp, f"{i}.txt")
                with open(text_path, "w", encoding="utf-8") as f:
                    for doc in iter_text_files([path]):
                        f.write(doc + "\n\n")
                plain.append(text_path)
            else:
                plain.append(path)
        tokenizer = train_tokenizer(plain, vocab_size, out_dir, min_frequency=min_frequency)
    return {"out_dir": out_dir, "vocab_size": len(tokenizer)}


def _check_utf8(path: str) -> None:
    """Raise ValueError naming `path` unless it is UTF-8 text (read in 1 MB blocks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"training file {path}: not UTF-8 text (near byte {offset + e.start}: {e.reason}); convert it"
                ) from None
            if not block:
                return
            offset += len(block)
