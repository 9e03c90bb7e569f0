"""Fuzz campaign (issue 21): hostile copies of a small saved checkpoint through every public reader.

    python benchmarks/fuzz_loader.py --cases 10000            # the campaign (tests/test_fuzz.py runs ~300)
    python benchmarks/fuzz_loader.py --cases 200 --targets header,config --verbose

Each case copies a small base folder (a tiny model, its tokenizer, a sharded copy, a quantized copy, a
training run with a checkpoint), mutates one file with a seeded random generator, and runs a public entry
point on it: `from_pretrained` + a forward, `bamba info`, `bamba generate`, `Tokenizer.from_pretrained` +
encode / chat template, `bamba train` (resume from the mutated trainer_state.pt, or fresh on a mutated data
file) and `bamba train-tokenizer`. Cases run in a forked worker under an address-space limit
(RLIMIT_AS) and a per-case timeout; a worker that hangs or dies is replaced. Each case is classified:

  error      a ValueError / OSError whose message names the file or folder (or `bamba ...: error:` on
             one line, naming it)
  loaded     it loaded and ran (a forward, a generation, an encode); where only metadata changed, the
             result equals the original; a safetensors file we read must read the same in the
             `safetensors` library (and one that library refuses must not load)
  failure    crash (any other exception, an error not naming the file, a worker killed by a signal),
             hang (past the timeout), over-limit (MemoryError or a failed allocation under RLIMIT_AS),
             wrong (loaded, but not what the files hold)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import pickle
import random
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

FAILURES = ("crash", "unnamed", "hang", "over-limit", "wrong")
OUTCOMES = ("error", "loaded", *FAILURES)

# Weight of each target in the campaign (cases are dealt round-robin over this list, so that a short run
# still covers every target).
TARGETS = {
    "header": 6,  # safetensors header: length, offsets, dtypes, shapes, JSON structure, encoding, metadata
    "body": 2,  # truncation, trailing bytes, flipped bytes
    "index": 3,  # model.safetensors.index.json and shard files (names, paths out of the folder)
    "config": 6,  # config.json: every field missing / mistyped / out of range / NaN / huge
    "generation": 2,  # generation_config.json
    "quantization": 2,  # quantization_config.json of a model saved quantized
    "tokenizer": 4,  # tokenizer.json, tokenizer_config.json, special_tokens_map.json
    "template": 3,  # chat templates that raise, loop, recurse or render huge output
    "trainer_state": 2,  # trainer_state.pt of a run that resumes
    "data": 2,  # training data files: binary, empty, not UTF-8, one enormous line
}

TINY = dict(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    attn_layer_indices=[1],
    mamba_n_heads=4,
    mamba_d_state=8,
    mamba_chunk_size=8,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=True,
)
IDS = [[1, 5, 9, 17, 33, 65, 129, 257]]  # a forward's input: every loaded model must run it
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
TEXT = "ROMEO: Hello, world! ünïcödé 😀 \t tabs\n\nnew paragraph"
CORPUS_LINES = 400


# ----- the base folders ---------------------------------------------------------------------------------------
@dataclass
class Bases:
    root: str
    model: str  # model.safetensors + config + generation config + tokenizer files
    sharded: str  # the same model in shards + index
    quant: str  # the same model saved int8 weight-only
    run: str  # a training out_dir holding checkpoint-last (2 steps)
    corpus: str  # the training text
    outside: str  # a valid checkpoint outside every case folder (a path escaping a case must not reach it)
    train_opts: dict[str, Any] = field(default_factory=dict)


def _corpus(path: str) -> None:
    rng = random.Random(0)
    words = "the king queen of and to a in my thou art love night day sweet death fair".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(CORPUS_LINES):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))).capitalize() + ".\n")
            if i % 4 == 3:
                f.write("\n")


def build_bases(root: str) -> Bases:
    """Write the base folders every case copies and mutates."""
    from bamba import BambaConfig, BambaForCausalLM
    from bamba.quantize import quantize
    from bamba.tokenizer import train_tokenizer
    from bamba.train import train

    os.makedirs(root, exist_ok=True)
    corpus = os.path.join(root, "corpus.txt")
    _corpus(corpus)
    model_dir = os.path.join(root, "model")
    train_tokenizer([corpus], TINY["vocab_size"], model_dir)
    torch.manual_seed(0)
    model = BambaForCausalLM(BambaConfig(**TINY)).eval()
    model.save_pretrained(model_dir)
    sharded = os.path.join(root, "sharded")
    shutil.copytree(model_dir, sharded)
    os.remove(os.path.join(sharded, "model.safetensors"))
    model.save_pretrained(sharded, max_shard_size=24_000)
    quant = os.path.join(root, "quant")
    shutil.copytree(model_dir, quant)
    quantize(model, "int8_weight_only")
    model.save_pretrained(quant)
    outside = os.path.join(root, "outside")
    shutil.copytree(model_dir, outside)
    run = os.path.join(root, "run")
    opts = dict(
        data=[corpus],
        tokenizer=model_dir,
        config=os.path.join(model_dir, "config.json"),
        row_tokens=64,
        batch_rows=2,
        eval_fraction=0.0,
        eval_every=0,
        progress=False,
        seed=0,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        train(out_dir=run, max_steps=2, save_every=2, **opts)
    shutil.rmtree(os.path.join(run, "final"))
    return Bases(root, model_dir, sharded, quant, run, corpus, outside, opts)


# ----- a case -----------------------------------------------------------------------------------------------
@dataclass
class Case:
    index: int
    target: str
    entry: str  # api, info, generate, tokenizer, template, resume, train, train-tokenizer
    what: str  # the mutation, in words
    folder: str  # the folder the entry point reads
    file: str  # the file that was mutated (its name must appear in an error)
    same: bool = False  # only metadata changed: the result must equal the original's
    extra: dict[str, Any] = field(default_factory=dict)


def schedule(targets: list[str]) -> list[str]:
    """Targets interleaved by weight: case i goes to schedule[i % len]."""
    out: list[str] = []
    weights = {t: TARGETS[t] for t in targets}
    for r in range(max(weights.values())):
        out += [t for t, w in weights.items() if r < w]
    return out


def make_case(bases: Bases, index: int, seed: int, work: str, targets: list[str]) -> Case:
    """Case `index` of the campaign with `seed`: a mutated copy of a base folder under `work`."""
    order = schedule(targets)
    target = order[index % len(order)]
    rng = random.Random(f"{seed}-{index}")
    return MUTATORS[target](bases, rng, index, work)


def _copy(src: str, work: str, index: int) -> str:
    dst = os.path.join(work, f"case-{index}")
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _entry(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


# ----- safetensors header and body ----------------------------------------------------------------------------
ST_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64"]
ST_DTYPES += ["F8_E4M3", "F8_E5M2", "F4", "C64", "f32", "F32 ", "", "float32"]
NASTY_INTS = [0, 1, -1, 2, 7, 2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64, 10**30, 2**64 + 8]


def read_st(path: str) -> tuple[dict[str, Any], bytes, bytes]:
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 : 8 + n], data[8 + n :]


def write_st(path: str, header: bytes, body: bytes, n: int | None = None) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header) if n is None else n % 2**64) + header + body)


def _tensor_names(header: dict[str, Any]) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _nasty_value(rng: random.Random, like: Any = None) -> Any:
    """A JSON value of a wrong type or range."""
    choices = [
        None,
        True,
        False,
        "",
        "x" * rng.randint(1, 50),
        rng.choice(NASTY_INTS),
        -rng.choice(NASTY_INTS),
        0.5,
        -1e300,
        1e308,
        float("nan"),
        float("inf"),
        float("-inf"),
        [],
        {},
        [None],
        [1, 2, 3],
        {"a": 1},
        _deep(rng.randint(50, 5000)),
    ]
    if isinstance(like, int) and not isinstance(like, bool):
        choices += [like + 1, like - 1, like * 2, like * 1000, float(like), str(like), -like]
    if isinstance(like, float):
        choices += [like * 10, -like, 0.0, int(like), str(like)]
    if isinstance(like, list):
        choices += [like[:-1], like + like[-1:], [str(v) for v in like], list(reversed(like))]
    return rng.choice(choices)


class Deep:
    """A JSON value nested `depth` deep, too deep for json.dumps: written by `_dumps`."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def text(self) -> str:
        return "[" * self.depth + "1" + "]" * self.depth


def _deep(depth: int) -> Deep:
    return Deep(depth)


def _dumps(value: Any, **kwargs: Any) -> str:
    """JSON text; Deep values inside are written as their text."""
    deep: list[Deep] = []

    def default(v: Any) -> str:
        if isinstance(v, Deep):
            deep.append(v)
            return f"@@DEEP{len(deep) - 1}@@"
        raise TypeError(type(v).__name__)

    text = json.dumps(value, default=default, **kwargs)
    for i, d in enumerate(deep):
        text = text.replace(f'"@@DEEP{i}@@"', d.text())
    return text


def _st_file(bases: Bases, rng: random.Random, index: int, work: str) -> tuple[str, str]:
    """(folder, file) of a case's safetensors file: the single file, one shard of the sharded copy (a sharded
    load reads it), or the int8 copy's (a quantized load)."""
    base = rng.choice(["model"] * 4 + ["sharded", "quant"])
    folder = _copy(getattr(bases, base), work, index)
    if base != "sharded":
        return folder, os.path.join(folder, "model.safetensors")
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    return folder, os.path.join(folder, rng.choice(shards))


def mutate_header(bases: Bases, rng: random.Random, index: int, work: str) -> Case:
    folder, path = _st_file(bases, rng, index, work)
    header, raw, body = read_st(path)
    names = _tensor_names(header)
    kinds = [
        "length",
        "offsets",
        "overlap",
        "swap",
        "gap",
        "dtype",
        "shape",
        "entry",
        "structure",
        "encoding",
        "metadata",
        "reformat",
        "bytes",
    ]
    kind = rng.choice(kinds)
    n = None
    same = False
    name = rng.choice(names)
    what = kind
    h = copy.deepcopy(header)
    if kind == "length":
        n = rng.choice(
            [0, 1, 2, len(raw) - 1, len(raw) + 1, len(raw) + len(body), 2**63, 2**64 - 1, 10**8 + 1]
        )
        n = rng.choice([n, rng.randint(0, len(raw) + len(body) + 100)])
        what = f"header length {n} (really {len(raw)})"
    elif kind == "offsets":
        start, end = h[name]["data_offsets"]
        h[name]["data_offsets"] = rng.choice(
            [
                [start + rng.randint(-9, 9), end],
                [start, end + rng.randint(-9, 9)],
                [end, start],
                [start],
                [start, end, end],
                _nasty_value(rng, [start, end]),
                [start, rng.choice(NASTY_INTS)],
                [-start - 1, end],
                [float(start), float(end)],
                None,
            ]
        )
        what = f"data_offsets of {name} -> {_dumps(h[name]['data_offsets'])[:80]}"
    elif kind == "overlap":  # a tensor's offsets pointing into another's bytes (same size: shapes fit)
        other = rng.choice(names)
        size = lambda t: h[t]["data_offsets"][1] - h[t]["data_offsets"][0]  # noqa: E731
        same_size = [t for t in names if size(t) == size(name) and t != name]
        if same_size:
            other = rng.choice(same_size)
        h[name]["data_offsets"] = list(h[other]["data_offsets"])
        what = f"data_offsets of {name} = those of {other}"
    elif kind == "swap":  # two tensors of the same size trade places (a valid file: different weights)
        size = lambda t: h[t]["data_offsets"][1] - h[t]["data_offsets"][0]  # noqa: E731
        pairs = [(a, b) for a in names for b in names if a < b and size(a) == size(b)]
        a, b = rng.choice(pairs) if pairs else (name, name)  # (a shard may hold no two of one size)
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
        what = f"offsets of {a} and {b} swapped"
    elif kind == "gap":  # every tensor after one shifted: a gap, and the body no longer covered
        start = h[name]["data_offsets"][0]
        k = rng.choice([1, 2, 4, 8, 64])
        for t in names:
            s, e = h[t]["data_offsets"]
            if s >= start:
                h[t]["data_offsets"] = [s + k, e + k]
        if rng.random() < 0.5:
            body = body + b"\0" * k
        what = f"gap of {k} bytes before {name}"
    elif kind == "dtype":
        h[name]["dtype"] = rng.choice([*ST_DTYPES, _nasty_value(rng)])
        what = f"dtype of {name} -> {_dumps(h[name]['dtype'])[:60]}"
    elif kind == "shape":
        shape = list(h[name]["shape"])
        options = [
            shape + [1],
            [1] + shape,
            [math.prod(shape)],
            list(reversed(shape)),
            shape[:-1],
            [],
            [0] + shape,
            [d * 2 for d in shape],
            [rng.choice(NASTY_INTS)] + shape[1:],
            [2**62, 2**62, 0],
            [10**30, 0],
            [-d for d in shape],
            [float(d) for d in shape],
            [str(d) for d in shape],
            [True] * len(shape),
            _nasty_value(rng, shape),
        ]
        h[name]["shape"] = rng.choice(options)
        what = f"shape of {name} -> {_dumps(h[name]['shape'])[:80]}"
    elif kind == "entry":
        op = rng.choice(["drop", "add", "extra-field", "not-object", "rename", "duplicate"])
        if op == "drop":
            del h[name]
        elif op == "add":
            h[rng.choice(["model.layers.99.x.weight", "junk", "model.layers.0.mixer.A_log2"])] = {
                "dtype": "F32",
                "shape": [0],
                "data_offsets": [0, 0],
            }
        elif op == "extra-field":
            h[name]["extra"] = _nasty_value(rng)
        elif op == "not-object":
            h[name] = _nasty_value(rng)
        elif op == "rename":
            h[name + rng.choice(["x", ".", " ", "\u0000"])] = h.pop(name)
        what = f"entry {op}: {name}"
        if op == "duplicate":  # the same name twice in the JSON text
            text = json.dumps(h)
            entry = json.dumps({name: h[name]})[1:-1]
            other = dict(h[name], data_offsets=[0, h[name]["data_offsets"][1] - h[name]["data_offsets"][0]])
            raw2 = text[:-1] + ", " + json.dumps({name: other})[1:-1] + "}"
            if rng.random() < 0.5:
                raw2 = "{" + entry + ", " + text[1:]
            return _st_case(bases, index, folder, path, raw2.encode(), body, None, what, False)
    elif kind == "structure":
        op = rng.choice(["deep-value", "deep-header", "array", "string", "number", "empty", "null", "nested"])
        if op == "deep-value":
            h[name]["shape"] = _deep(rng.choice([100, 1000, 10_000, 100_000]))
        elif op == "nested":
            h["__metadata__"] = {"x": _deep(rng.choice([10, 500, 5000]))}
        text = {
            "deep-header": "[" * rng.choice([1000, 100_000, 1_000_000]) + "]" * 3,
            "array": "[]",
            "string": '"x"',
            "number": "1",
            "empty": "",
            "null": "null",
        }.get(op)
        raw2 = text.encode() if text is not None else _dumps(h).encode()
        return _st_case(bases, index, folder, path, raw2, body, None, f"structure: {op}", False)
    elif kind == "encoding":
        op = rng.choice(
            ["utf16", "bom", "invalid-utf8", "nul", "leading-space", "trailing-garbage", "latin1"]
        )
        text = json.dumps(h)
        raw2 = {
            "utf16": text.encode("utf-16"),
            "bom": b"\xef\xbb\xbf" + text.encode(),
            "invalid-utf8": text[:-2].encode() + b"\xff\xfe" + text[-2:].encode(),
            "nul": text.encode() + b"\0\0\0\0",
            "leading-space": b"   " + text.encode(),
            "trailing-garbage": text.encode() + b"}garbage",
            "latin1": text.replace('"format"', '"f\u00f6rmat"').encode("latin-1"),
        }[op]
        return _st_case(bases, index, folder, path, raw2, body, None, f"encoding: {op}", False)
    elif kind == "metadata":
        h["__metadata__"] = rng.choice(
            [
                None,
                {},
                {"format": "pt", "note": "x" * rng.randint(0, 10_000)},
                {"format": 1},
                [],
                "pt",
                {"format": None},
                _nasty_value(rng),
            ]
        )
        what = f"metadata -> {_dumps(h['__metadata__'])[:60]}"
        same = isinstance(h["__metadata__"], dict) and all(
            isinstance(v, str) for v in h["__metadata__"].values()
        )
    elif kind == "reformat":  # the same header, written otherwise: keys reordered, escapes, spaces
        items = list(h.items())
        rng.shuffle(items)
        text = json.dumps(dict(items), indent=rng.choice([None, 1, 4]), ensure_ascii=rng.random() < 0.5)
        text = text.replace("model.", "model\\u002e", rng.randint(0, 3))
        text += " " * rng.randint(0, 64)
        return _st_case(bases, index, folder, path, text.encode(), body, None, "reformat", True)
    else:  # bytes: random bytes of the header flipped
        raw2 = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            raw2[rng.randrange(len(raw2))] = rng.randrange(256)
        return _st_case(bases, index, folder, path, bytes(raw2), body, None, "header bytes flipped", False)
    return _st_case(bases, index, folder, path, _dumps(h).encode(), body, n, what, same)


def _st_case(
    bases: Bases,
    index: int,
    folder: str,
    path: str,
    raw: bytes,
    body: bytes,
    n: int | None,
    what: str,
    same: bool,
) -> Case:
    write_st(path, raw, body, n)
    rng = random.Random(index)
    entry = _entry(rng, {"api": 8, "info": 1, "generate": 1})
    quant = os.path.exists(os.path.join(folder, "quantization_config.json"))
    what = f"{os.path.basename(path)}{' (int8)' if quant else ''}: {what}"
    return Case(index, "header", entry, what, folder, path, same=same, extra={"oracle": True, "quant": quant})


def mutate_body(bases: Bases, rng: random.Random, index: int, work: str) -> Case:
    folder, path = _st_file(bases, rng, index, work)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    op = rng.choice(["truncate", "truncate-header", "append", "flip", "zero"])
    if op == "truncate":
        data = data[: rng.randrange(len(data))]
    elif op == "truncate-header":
        data = data[: rng.randrange(0, 16)]
    elif op == "append":
        data += os.urandom(rng.choice([1, 7, 64, 4096]))
    elif op == "flip":  # new values: the file is valid, its weights differ (the library reads the same)
        (n,) = struct.unpack("<Q", data[:8])
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(8 + n, len(data))] = rng.randrange(256)
    else:
        data = bytearray(len(data))
    with open(path, "wb") as f:
        f.write(data)
    entry = _entry(rng, {"api": 8, "info": 1, "generate": 1})
    what = f"{os.path.basename(path)} body: {op} ({len(data)} bytes)"
    return Case(index, "body", entry, what, folder, path, extra={"oracle": True})


# ----- shard index ----------------------------------------------------------------------------------------------
def mutate_index(bases: Bases, rng: random.Random, index: int, work: str) -> Case:
    folder = _copy(bases.sharded, work, index)
    path = os.path.join(folder, "model.safetensors.index.json")
    with open(path) as f:
        idx = json.load(f)
    wmap = idx["weight_map"]
    shards = sorted(set(wmap.values()))
    name = rng.choice(sorted(wmap))
    outside = os.path.join(bases.outside, "model.safetensors")
    ops = [
        "drop-name",
        "extra-name",
        "wrong-shard",
        "parent",
        "absolute",
        "dot-dot-inside",
        "empty",
        "dot",
        "folder",
        "not-string",
        "map-type",
        "no-map",
        "drop-shard-file",
        "extra-shard-copy",
        "also-single",
        "text",
        "metadata",
        "reformat",
        "symlink-out",
        "backslash",
        "duplicate-key",
    ]
    op = rng.choice(ops)
    same = op in ("drop-name", "extra-name", "wrong-shard", "metadata", "reformat", "also-single")
    text = None
    if op == "drop-name":
        del wmap[name]
    elif op == "extra-name":
        wmap["model.layers.0.not_a_tensor"] = rng.choice(shards)
    elif op == "wrong-shard":
        wmap[name] = rng.choice(shards)
    elif op == "parent":
        wmap[name] = rng.choice(
            ["../outside/model.safetensors", os.path.relpath(outside, folder), "../" * 12 + "etc/passwd"]
        )
    elif op == "absolute":
        wmap[name] = rng.choice([outside, "/etc/passwd", "/dev/zero", "/proc/self/mem"])
    elif op == "dot-dot-inside":
        wmap[name] = f"sub/../{wmap[name]}"
    elif op == "empty":
        wmap[name] = ""
    elif op == "dot":
        wmap[name] = rng.choice([".", "..", "./"])
    elif op == "folder":
        os.mkdir(os.path.join(folder, "sub"))
        wmap[name] = "sub"
    elif op == "not-string":
        wmap[name] = _nasty_value(rng)
    elif op == "map-type":
        idx["weight_map"] = _nasty_value(rng)
    elif op == "no-map":
        del idx["weight_map"]
    elif op == "drop-shard-file":
        os.remove(os.path.join(folder, rng.choice(shards)))
    elif op == "extra-shard-copy":  # a second shard holding the same tensors: which one would win?
        shutil.copy(os.path.join(folder, shards[0]), os.path.join(folder, "copy.safetensors"))
        wmap["model.layers.0.not_a_tensor"] = "copy.safetensors"
    elif op == "also-single":  # an index beside a model.safetensors: the index wins, as in transformers
        shutil.copy(os.path.join(bases.model, "model.safetensors"), os.path.join(folder, "model.safetensors"))
    elif op == "text":
        text = rng.choice(["", "{", "[]", "null", '{"weight_map": ' + _dumps(_deep(100_000)) + "}", "\xff"])
    elif op == "metadata":
        idx["metadata"] = _nasty_value(rng)
    elif op == "symlink-out":
        target = shards[0]
        os.remove(os.path.join(folder, target))
        os.symlink(outside, os.path.join(folder, target))
        same = True  # (a link the folder's owner made: followed, as any file; same tensors, here)
    elif op == "backslash":
        wmap[name] = "..\\outside\\model.safetensors"
    elif op == "duplicate-key":  # a tensor named twice in the weight_map's JSON text, with two shards
        other = next(s for s in shards if s != wmap[name])
        text = json.dumps(idx)[:-2] + ", " + json.dumps({name: other})[1:-1] + "}}"
    with open(path, "w") as f:
        f.write(
            text if text is not None else _dumps(idx) if op != "reformat" else json.dumps(idx, indent=None)
        )
    entry = _entry(rng, {"api": 8, "info": 1, "generate": 1})
    return Case(index, "index", entry, f"index: {op}", folder, path, same=same)


# ----- config.json, generation_config.json, quantization_config.json ------------------------------------------
NEUTRAL_CONFIG_FIELDS = {  # fields that do not change what a forward computes
    "architectures",
    "use_cache",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "time_step_min",
    "time_step_max",
    "z_loss_coefficient",
    "attention_dropout",
    "num_logits_to_keep",
    "max_position_embeddings",
    "dtype",
    "transformers_version",
    "torch_dtype",
}


def _mutate_json_file(
    rng: random.Random, data: dict[str, Any], extra_fields: list[str]
) -> tuple[Any, str, str | None]:
    """(mutated JSON value, description, raw text if the mutation is below JSON) for a JSON object file."""
    op = rng.choice(["field"] * 8 + ["missing", "add", "file", "reformat"])
    data = copy.deepcopy(data)
    key = rng.choice(sorted(set(data) | set(extra_fields)))
    if op == "field":
        data[key] = _nasty_value(rng, data.get(key))
        return data, f"{key} -> {_dumps(data[key])[:60]}", None
    if op == "missing":
        data.pop(key, None)
        return data, f"{key} missing", None
    if op == "add":
        data["not_a_field_" + str(rng.randint(0, 9))] = _nasty_value(rng)
        return data, "unknown field added", None
    if op == "reformat":
        items = list(data.items())
        rng.shuffle(items)
        return (
            dict(items),
            "reformat",
            json.dumps(dict(items), indent=rng.choice([None, 2]), ensure_ascii=True),
        )
    text = rng.choice(
        [
            "",
            "{",
            "[]",
            '"x"',
            "null",
            "{}",
            "\xff\xfe{}",
            "[" * 100_000 + "]" * 100_000,
            '{"a": ' + "[" * 50_000 + "]" * 50_000 + "}",
            json.dumps(data)[:-1] + ', "x": "' + "y" * 1_000_000 + '"}',
            json.dumps(data) + "garbage",
            "\ufeff" + json.dumps(data),
            json.dumps(data).encode("utf-16").decode("latin-1"),
        ]
    )
    return None, f"file: {text[:30]!r}", text


def _write_json(path: str, value: Any, text: str | None) -> None:
    with open(
        path,
        "w",
        encoding="latin-1" if text is not None and not text.isascii() else "utf-8",
        errors="replace",
    ) as f:
        f.write(text if text is not None else _dumps(value))


def mutate_config(bases: Bases, rng: random.Random, index: int, work: str) -> Case:
    folder = _copy(bases.model, work, index)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        data = json.load(f)
    op = rng.random()
    if op < 0.15:  # far more layers than the weights hold (a build of all of them would take minutes)
        data["num_hidden_layers"] = rng.choice([4, 50, 5000, 50_000, 10**6, 10**9, 2**40])
        fields, same, text = ["num_hidden_layers"], False, None
        what = f"num_hidden_layers -> {data['num_hidden_layers']}"
    elif op < 0.25:  # sizes huge or zero in several fields at once
        sizes = ["vocab_size", "hidden_size", "intermediate_size", "mamba_n_heads", "mamba_d_state"]
        sizes += ["num_attention_heads", "mamba_expand", "mamba_chunk_size", "max_position_embeddings"]
        fields = rng.sample([*sizes, "head_dim", "mamba_d_conv"], 2)
        for key in fields:
            data[key] = rng.choice([0, 1, 3, 2**31, 2**40, 10**12, 2**63, 2**80])
        what, same, text = "sizes " + _dumps({k: data[k] for k in fields}), False, None
    else:
        extra = ["rope_parameters", "time_step_limit", "attn_layer_indices", "model_type", "mamba_d_head"]
        value, what, text = _mutate_json_file(rng, data, [*extra, "head_dim", "torch_dtype", "dtype"])
        data = value
        fields = [what.split(" ")[0]]
        same = (text is not None and what == "reformat") or what == "unknown field added"
        same = same or (what.startswith(tuple(NEUTRAL_CONFIG_FIELDS)) and fields[0] in NEUTRAL_CONFIG_FIELDS)
    _write_json(path, data, text)
    entry = _entry(rng, {"api": 6, "info": 2, "generate": 2})
    case = Case(index, "config", entry, f"config.json {what}", folder, path, same=same)
    case.extra["fields"] = fields  # (a prompt too long for the context it sets: an error naming the field)
    return case


def mutate_generation(bases: Bases, rng: random.Random, index: int, work: str) -> Case:
    folder = _copy(bases.model, work, index)
    path = os.path.join(folder, "generation_config.json")
    with open(path) as f:
        data = json.load(f)
    fields = [
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "max_length",
        "decoder_start_token_id",
    ]
    value, what, text = _mutate_json_file(rng, data, fields)
    if rng.random() < 0.3 and value is not None:
        value[rng.choice(["eos_token_id", "pad_token_id", "bos_token_id"])] = rng.choice(
            [-1, 320, 10**9, 2**63, [2, -5], [2] * 10_000, [], [2, 3.0], 2.0]
        )
        what, text = "token id " + _dumps(value)[:80], None
    _write_json(path, value, text)
    entry = _entry(rng, {"api": 5, "generate": 5})
    return Case(index, "generation", entry, f"generation_config.json {what}", folder, path)


def mutate_quantization(bases: Bases, rng: random.Random, index: int, work: str) -> Case:
    folder = _copy(bases.quant, work, index)
    path = os.path.join(folder, "quantization_config.json")
    with open(path) as f:
        data = json.load(f)
    if rng.random() < 0.4:
        key = rng.choice(["format", "group_size", "modules", "quant_method"])
        modules = list(data["modules"])
        data[key] = rng.choice(
            {
                "format": ["int4_weight_only", "int8_dynamic_activation_int8_weight", "int8", "", None, 3],
                "group_size": [0, -1, 7, 32, 2**40, "128", 1.5, None, float("nan")],
                "modules": [
                    modules[:-1],
                    modules + modules[:1],
                    modules + ["model.embed_tokens"],
                    modules + ["model.layers.0.mixer.A_log"],
                    modules + ["model.layers.99.mlp.gate_proj"],
                    modules + ["", ".", "..", "model..layers"],
                    [],
                    [m.replace("model.", "") for m in modules],
                    modules + ["lm_head"],
                ],
                "quant_method": ["gptq", "", None, 1],
            }[key]
        )
        what = f"{key} -> {_dumps(data[key])[:80]}"
        text = None
    else:
        data, what, text = _mutate_json_file(rng, data, ["group_size", "format"])
    _write_json(path, data, text)
    entry = _entry(rng, {"api": 6, "info": 2, "generate": 2})
    return Case(
        index,
        "quantization",
        entry,
        f"quantization_config.json {what}",
        folder,
        path,
        same=what == "reformat",
    )


# ----- tokenizer files and chat templates ---------------------------------------------------------------------
def mutate_tokenizer(bases: Bases, rng: random.Random, index: int, work: str) -> Case:
    folder = _copy(bases.model, work, index)
    name = rng.choice(["tokenizer.json"] * 2 + ["tokenizer_config.json"] * 2 + ["special_tokens_map.json"])
    path = os.path.join(folder, name)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    fields = {
        "tokenizer.json": [
            "model",
            "added_tokens",
            "normalizer",
            "pre_tokenizer",
            "post_processor",
            "decoder",
            "truncation",
            "padding",
            "version",
        ],
        "tokenizer_config.json": [
            "model_max_length",
            "added_tokens_decoder",
            "chat_template",
            "extra_special_tokens",
            "additional_special_tokens",
            "split_special_tokens",
            "padding_side",
            "clean_up_tokenization_spaces",
            "bos_token",
            "unk_token",
            "mask_token",
        ],
        "special_tokens_map.json": [
            "bos_token",
            "eos_token",
            "pad_token",
            "additional_special_tokens",
            "unk_token",
        ],
    }[name]
    if name == "tokenizer.json" and rng.random() < 0.5:
        what = _mutate_tokenizer_model(rng, data)
        text = None
    else:
        data, what, text = _mutate_json_file(rng, data, fields)
        if name != "tokenizer.json" and rng.random() < 0.3 and data is not None:
            data["added_tokens_decoder"] = rng.choice(
                [
                    {"x": {"content": "a"}},
                    {"5": "a"},
                    {"5": {"content": 5}},
                    {"-1": {"content": "<z>"}},
                    {"99999999999": {"content": "<z>", "special": True}},
                    {"5": {}},
                    [1],
                ]
            )
            what, text = "added_tokens_decoder " + _dumps(data["added_tokens_decoder"])[:60], None
    _write_json(path, data, text)
    entry = _entry(rng, {"tokenizer": 8, "generate": 2})
    return Case(index, "tokenizer", entry, f"{name} {what}", folder, path, same=what == "reformat")


def _mutate_tokenizer_model(rng: random.Random, data: dict[str, Any]) -> str:
    model = data["model"]
    vocab, merges = model["vocab"], model["merges"]
    token = rng.choice(sorted(vocab))
    op = rng.choice(
        [
            "id-huge",
            "id-negative",
            "id-dup",
            "merge-unknown",
            "merge-shape",
            "type",
            "added-huge",
            "added-weird",
            "drop-vocab",
            "regex",
            "dropout",
        ]
    )
    if op == "id-huge":
        vocab[token] = rng.choice([2**31, 2**32 + 3, 10**9, 2**63 - 1])
    elif op == "id-negative":
        vocab[token] = -rng.randint(1, 100)
    elif op == "id-dup":
        vocab[token] = vocab[rng.choice(sorted(vocab))]
    elif op == "merge-unknown":
        merges.append(["zzz_not_a_token", "qqq"])
    elif op == "merge-shape":
        merges[0] = rng.choice([["a"], "a b c", 5, [], ["a", "b", "c"]])
    elif op == "type":
        model["type"] = rng.choice(["WordPiece", "Unigram", "WordLevel", "Nope", 3])
    elif op == "added-huge":
        data["added_tokens"].append(
            {
                "id": rng.choice([10**6, 2**32, 2**40]),
                "content": "<huge>",
                "special": True,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
            }
        )
    elif op == "added-weird":
        data["added_tokens"].append(
            rng.choice([{"id": 3}, {"content": "<x>"}, {"id": "3", "content": 5}, None])
        )
    elif op == "drop-vocab":
        for t in rng.sample(sorted(vocab), 50):
            del vocab[t]
    elif op == "regex":
        data["pre_tokenizer"] = {
            "type": "Split",
            "pattern": {"Regex": rng.choice(["(", "(a+)+$", "\\", "[", "(?<=a+)b", ".*" * 30])},
            "behavior": "Isolated",
            "invert": False,
        }
    else:
        model["dropout"] = _nasty_value(rng)
    return f"model {op}"


NASTY_TEMPLATES = [
    "{% for %}",
    "{{",
    "{% unknown_tag %}",
    "{{ raise_exception('refused by the template') }}",
    "{{ 1 / 0 }}",
    "{{ messages[99]['content'] }}",
    "{{ messages[0]['content'].nope() }}",
    "{{ undefined_function() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append(1) }}",
    "{{ cycler.__init__.__globals__ }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
    "{% for c in 'x' * 100000 %}{% for d in 'y' * 100000 %}{% endfor %}{% endfor %}",
    "{{ 'x' * 10000000000 }}",
    "{{ 'x' * 100000000 }}",
    "{{ ['x'] * 10000000000 }}",
    "{{ 'x'|center(10000000000) }}",
    "{{ 'x'.ljust(10000000000) }}",
    "{{ 'x'.zfill(10000000000) }}",
    "{{ '%010000000000d'|format(1) }}",
    "{{ '%010000000000d' % 1 }}",
    "{{ '%*d' % (10000000000, 1) }}",
    "{{ '{:>10000000000}'.format(1) }}",
    "{{ 'ab'|indent(10000000000, true) }}",
    "{{ 'ab cd'|wordwrap(3) * 100000000 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "{% set ns = namespace(s=['x']) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = [ns.s, ns.s]|join %}{% endfor %}{{ ns.s|length }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s.replace('x', 'xx') %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = '%s%s' % (ns.s, ns.s) %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = '{}{}'.format(ns.s, ns.s) %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = (ns.s, ns.s)|join('') %}{% endfor %}",
    "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
    "{{ lipsum(10000000) }}",
    "{{ 9 ** 9 ** 9 }}",
    "{{ 2 ** 100000000 }}",
    "{{ (10 ** 5000)|string }}",
    "{{ range(100000)|join(',') }}",
    "{{ range(10000000000) }}",
    "{{ messages * 100000000 }}",
    "{{ strftime_now('%Y' * 1000000) }}",
    "{{ messages|tojson(indent=10000000000) }}",
    "{{ (messages|tojson) * 100000000 }}",
    "{{ dict(a=1) * 5 }}",
    "{{ range(100000)|list|sum * 10 ** 100000 }}",
    "{{ '%s' % (messages,) * 100000000 }}",
    "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}",
    "{{ " + "(" * 100_000 + "1" + ")" * 100_000 + " }}",  # nesting past the parser's recursion
    "{{ " + "[" * 5_000 + "]" * 5_000 + " }}",
    "{{ 1" + " + 1" * 200_000 + " }}",
    "{% if true %}" * 20_000 + "x" + "{% endif %}" * 20_000,
    "x" * 30_000_000,  # a 30 MB template: its text alone is past the output bound
    "{% raw %}" + "y" * 5_000_000,
]
NASTY_TEMPLATE_BYTES = [  # template files that are not UTF-8
    b"\xff\xfe{\x00{\x00 \x00x\x00 \x00}\x00}\x00",
    b"caf\xe9 {{ messages[0]['content'] }}",
    b"\xef\xbb\xbf{{ bos_token }}",
    b"{{ '\x00' }}\x00\x00",
    b"\x80\x81\x82",
]


def mutate_template(bases: Bases, rng: random.Random, index: int, work: str) -> Case:
    folder = _copy(bases.model, work, index)
    template = rng.choice(NASTY_TEMPLATES)
    where = rng.choice(["file", "config", "named", "bytes"])
    if where == "bytes":
        raw = rng.choice(NASTY_TEMPLATE_BYTES)
        template = repr(raw)
        path = os.path.join(folder, "chat_template.jinja")
        with open(path, "wb") as f:
            f.write(raw)
    elif where == "file":
        path = os.path.join(folder, "chat_template.jinja")
        with open(path, "w", encoding="utf-8") as f:
            f.write(template)
    elif where == "named":
        os.mkdir(os.path.join(folder, "additional_chat_templates"))
        path = os.path.join(folder, "additional_chat_templates", "tool_use.jinja")
        with open(path, "w", encoding="utf-8") as f:
            f.write(template)
    else:
        path = os.path.join(folder, "tokenizer_config.json")
        with open(path) as f:
            data = json.load(f)
        data["chat_template"] = template
        with open(path, "w") as f:
            json.dump(data, f)
    return Case(
        index,
        "template",
        "template",
        f"template in {where}: {template[:70]}",
        folder,
        path,
        extra={"tools": where == "named"},
    )


# ----- trainer_state.pt and training data ----------------------------------------------------------------------
class _Payload:
    """A pickle that would run code when unpickled (it must never be)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (self.marker, "w"))


def mutate_trainer_state(bases: Bases, rng: random.Random, index: int, work: str) -> Case:
    out = _copy(bases.run, work, index)
    path = os.path.join(out, "checkpoint-last", "trainer_state.pt")
    marker = os.path.join(out, "PWNED")
    state = torch.load(path, weights_only=True)
    op = rng.choice(
        ["bytes", "truncate", "pickle", "legacy-pickle", "key", "field", "rng", "optimizer", "empty"]
    )
    what = op
    if op == "bytes":
        with open(path, "rb") as f:
            data = bytearray(f.read())
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        with open(path, "wb") as f:
            f.write(data)
    elif op == "truncate":
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: rng.randrange(len(data))])
    elif op == "pickle":
        state["step"] = _Payload(marker)
        torch.save(state, path)
    elif op == "legacy-pickle":
        with open(path, "wb") as f:
            pickle.dump({"step": _Payload(marker)}, f)
    elif op == "empty":
        open(path, "wb").close()
    elif op == "key":
        key = rng.choice(sorted(state))
        del state[key]
        what = f"{key} missing"
        torch.save(state, path)
    elif op == "field":
        key = rng.choice(sorted(state))
        state[key] = rng.choice(
            [None, -1, 10**12, 2**63 - 1, "x", 1.5, [], {}, torch.tensor(3), True, float("nan")]
        )
        what = f"{key} -> {state[key]!r:.40}"
        torch.save(state, path)
    elif op == "rng":
        r = state["rng"]
        part = rng.choice(["torch", "python", "cuda"])
        r[part] = rng.choice(
            [
                torch.zeros(3, dtype=torch.uint8),
                torch.zeros(5056, dtype=torch.float32),
                (3, (1, 2), None),
                (3, tuple(range(625)), None),
                (3, tuple([2**40] * 625), None),
                None,
                "x",
                torch.zeros(5056, dtype=torch.uint8),
            ]
        )
        what = f"rng {part}"
        torch.save(state, path)
    else:
        what = _mutate_optimizer(rng, state["optimizer"])
        torch.save(state, path)
    return Case(
        index, "trainer_state", "resume", f"trainer_state.pt {what}", out, path, extra={"marker": marker}
    )


def _mutate_optimizer(rng: random.Random, opt: dict[str, Any]) -> str:
    op = rng.choice(["shape", "dtype", "drop-state", "extra-state", "groups", "params", "step", "lr", "nan"])
    pid = rng.choice(sorted(opt["state"]))
    st = opt["state"][pid]
    if op == "shape":
        st["exp_avg"] = torch.zeros(rng.choice([(1,), (3, 3), (0,), (1000,)]))
    elif op == "dtype":
        st["exp_avg_sq"] = st["exp_avg_sq"].to(rng.choice([torch.int64, torch.float64, torch.bool]))
    elif op == "drop-state":
        del opt["state"][pid]
    elif op == "extra-state":
        opt["state"][10_000] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.zeros(2),
            "exp_avg_sq": torch.zeros(2),
        }
    elif op == "groups":
        opt["param_groups"] = rng.choice([[], opt["param_groups"][:1], opt["param_groups"] * 2, "x"])
    elif op == "params":
        opt["param_groups"][0]["params"] = rng.choice([[], [0, 0], ["a"], list(range(10_000))])
    elif op == "step":
        st["step"] = rng.choice([torch.tensor(-1.0), torch.tensor(float("nan")), "x", None, torch.zeros(3)])
    elif op == "lr":
        opt["param_groups"][0]["lr"] = rng.choice([float("nan"), -1.0, "x", None])
    else:
        st["exp_avg"] = torch.full_like(st["exp_avg"], float("nan"))
    return f"optimizer {op}"


def _huge(suffix: str, text: str) -> bytes:
    return (text if suffix == ".txt" else json.dumps({"text": text})).encode()


def mutate_data(bases: Bases, rng: random.Random, index: int, work: str) -> Case:
    folder = os.path.join(work, f"case-{index}")
    os.makedirs(folder)
    suffix = rng.choice([".txt", ".txt", ".jsonl"])
    path = os.path.join(folder, "data" + suffix)
    op = rng.choice(
        [
            "binary",
            "empty",
            "latin1",
            "bom",
            "nul",
            "huge-line",
            "huge-word",
            "blank",
            "cr",
            "jsonl-bad",
            "jsonl-deep",
        ]
    )
    with open(bases.corpus, encoding="utf-8") as f:
        text = f.read()
    if suffix == ".jsonl" and op not in (
        "binary",
        "empty",
        "jsonl-bad",
        "jsonl-deep",
        "huge-line",
        "huge-word",
    ):
        text = "\n".join(json.dumps({"text": p}) for p in text.split("\n\n") if p.strip())
    content = {
        "binary": os.urandom(rng.choice([10, 1000, 100_000])),
        "empty": b"",
        "latin1": ("caf\xe9 " + text).encode("latin-1", errors="replace"),
        "bom": b"\xef\xbb\xbf" + text.encode(),
        "nul": text.replace("the", "t\0e").encode(),
        "huge-line": _huge(suffix, " ".join(["word"] * 200_000)),  # one line of 1 MB
        "huge-word": _huge(suffix, "a" * 1_000_000),  # one word of a million letters
        "blank": b"\n \n\t\n" * 1000,
        "cr": text.replace("\n", "\r").encode(),
        "jsonl-bad": rng.choice([b"{", b"[1]\n", b'{"text": 5}\n', b'{"txt": "a"}\n', b'"x"\n', b"\xff\n"]),
        "jsonl-deep": ("[" * 100_000 + "]" * 100_000 + "\n").encode(),
    }[op]
    with open(path, "wb") as f:
        f.write(content)
    entry = _entry(rng, {"train": 1, "train-tokenizer": 1})
    return Case(index, "data", entry, f"{os.path.basename(path)}: {op}", folder, path)


MUTATORS = {
    "header": mutate_header,
    "body": mutate_body,
    "index": mutate_index,
    "config": mutate_config,
    "generation": mutate_generation,
    "quantization": mutate_quantization,
    "tokenizer": mutate_tokenizer,
    "template": mutate_template,
    "trainer_state": mutate_trainer_state,
    "data": mutate_data,
}


# ----- running a case ---------------------------------------------------------------------------------------------
class Wrong(Exception):
    """Loaded, but not what the files hold."""


@dataclass
class Reference:
    """The base model's tensors and logits, to compare loaded models with."""

    state: dict[str, torch.Tensor]
    logits: torch.Tensor
    quant_logits: torch.Tensor
    encoded: list[int]


def reference(bases: Bases) -> Reference:
    from bamba import BambaForCausalLM, Tokenizer

    model = BambaForCausalLM.from_pretrained(bases.model)
    quant = BambaForCausalLM.from_pretrained(bases.quant)
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits
        quant_logits = quant(torch.tensor(IDS)).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return Reference(state, logits, quant_logits, Tokenizer.from_pretrained(bases.model).encode(TEXT))


def _forward(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal (a NaN, as a flipped byte can make, equals itself)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _check_same_weights(model: Any, ref: Reference, case: Case) -> None:
    state = model.state_dict()
    for k, v in ref.state.items():
        if k not in state or not _same(state[k], v):
            raise Wrong(f"tensor {k} differs from the file's")


def run_api(case: Case, ref: Reference) -> None:
    from bamba import BambaForCausalLM

    model = BambaForCausalLM.from_pretrained(case.folder)
    logits = _forward(model)
    if case.extra.get("oracle"):
        _check_oracle(model, case)
    elif case.target in ("index", "config", "generation"):
        _check_same_weights(model, ref, case)
    if case.target == "generation":
        model.generate(torch.tensor(IDS), max_new_tokens=3, do_sample=False)
    if case.same:
        quant = case.target == "quantization" or case.extra.get("quant")
        want = ref.quant_logits if quant else ref.logits
        if not torch.equal(logits, want):
            raise Wrong(f"logits differ by {(logits - want).abs().max().item():.3g}, only metadata changed")


def _check_oracle(model: Any, case: Case) -> None:
    """What we loaded must be what the safetensors library reads from the same file."""
    from safetensors.torch import load_file

    try:
        lib = load_file(case.file)
    except Exception as e:
        raise Wrong(
            f"loaded a file the safetensors library refuses ({' '.join(str(e).split())[:120]})"
        ) from None
    state = model.state_dict()
    for k, v in lib.items():
        if k not in state or not _same(state[k], v):
            raise Wrong(f"tensor {k} differs from what the safetensors library reads")
    if (
        case.same
        and not case.extra.get("quant")
        and not all(_same(state[k], v) for k, v in _ref_state().items())
    ):
        raise Wrong("a reformatted header gave other tensors")


_REF: list[Reference] = []


def _ref_state() -> dict[str, torch.Tensor]:
    return _REF[0].state


def run_cli(case: Case, argv: list[str]) -> None:
    """`bamba ...` in this process: exit 0, or 2 with one line on stderr that names the file."""
    from bamba.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    if rc == 0:
        return
    lines = err.getvalue().strip().splitlines()
    raise CliError(rc, lines)


class CliError(Exception):
    def __init__(self, rc: int, lines: list[str]) -> None:
        super().__init__(" | ".join(lines))
        self.rc, self.lines = rc, lines


def run_tokenizer(case: Case, ref: Reference) -> None:
    from bamba import Tokenizer

    tok = Tokenizer.from_pretrained(case.folder)
    ids = tok.encode(TEXT)
    tok.decode(ids)
    tok(["a", TEXT], padding=True)
    if case.same and ids != ref.encoded:
        raise Wrong("a reformatted tokenizer file encodes otherwise")
    if tok.chat_template is not None:
        tok.apply_chat_template(MESSAGES, add_generation_prompt=True)


def run_template(case: Case, ref: Reference) -> None:
    from bamba import Tokenizer

    tok = Tokenizer.from_pretrained(case.folder)
    tools = [{"type": "function", "function": {"name": "f"}}] if case.extra.get("tools") else None
    out = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False, tools=tools)
    tok.encode(out)


def _train_argv(out: str, data: str, opts: dict[str, Any], max_steps: int) -> list[str]:
    """`bamba train ...` with the options of `opts` (the base run's)."""
    return [
        "train",
        *("--out", out, "--data", data, "--tokenizer", opts["tokenizer"], "--config", opts["config"]),
        *("--row-tokens", str(opts["row_tokens"]), "--batch-rows", str(opts["batch_rows"])),
        *("--eval-fraction", "0", "--eval-every", "0", "--save-every", "0", "--seed", "0"),
        *("--max-steps", str(max_steps), "--no-progress"),
    ]


def run_resume(case: Case, bases: Bases) -> None:
    """`bamba train` (half the cases: the command, else the function) resuming from the mutated state."""
    from bamba.train import train

    try:
        if case.index % 2:
            run_cli(case, _train_argv(case.folder, bases.corpus, bases.train_opts, 3))
        else:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                train(out_dir=case.folder, max_steps=3, save_every=0, **bases.train_opts)
    finally:
        if os.path.exists(case.extra["marker"]):
            raise Wrong("unpickling trainer_state.pt ran code from the file")


def run_data(case: Case, bases: Bases) -> None:
    """`bamba train` (a fresh run of one step) or `bamba train-tokenizer` on the mutated data file."""
    if case.entry == "train":
        run_cli(case, _train_argv(os.path.join(case.folder, "out"), case.file, bases.train_opts, 1))
    else:
        out = os.path.join(case.folder, "tok")
        run_cli(case, ["train-tokenizer", case.file, "--vocab-size", "300", "--out", out])


def run_case(case: Case, bases: Bases, ref: Reference) -> None:
    if case.entry == "api":
        run_api(case, ref)
    elif case.entry == "info":
        run_cli(case, ["info", case.folder])
    elif case.entry == "generate":
        run_cli(case, ["generate", "--model", case.folder, "--max-new-tokens", "3", "--seed", "0", "ROMEO:"])
    elif case.entry == "tokenizer":
        run_tokenizer(case, ref)
    elif case.entry == "template":
        run_template(case, ref)
    elif case.entry == "resume":
        run_resume(case, bases)
    else:
        run_data(case, bases)


def _names_file(message: str, case: Case) -> bool:
    places = {case.folder, case.file, os.path.basename(case.file)}
    if case.target == "template":
        places.add("template")
    return any(p and p in message for p in places)


_ALLOC_FAILED = ("can't allocate memory", "out of memory", "Cannot allocate memory", "std::bad_alloc")


def classify(case: Case, bases: Bases, ref: Reference) -> tuple[str, str]:
    """(outcome, detail) of one case, run in this process."""
    try:
        run_case(case, bases, ref)
    except Wrong as e:
        return "wrong", str(e)
    except CliError as e:
        line = " ".join(e.lines)
        fields = case.extra.get("fields", ()) if case.entry == "generate" else ()
        if len(e.lines) == 1 and e.rc == 2 and (_names_file(line, case) or any(f in line for f in fields)):
            return "error", line
        if any(m in line for m in _ALLOC_FAILED):
            return "over-limit", line
        return "unnamed", f"rc {e.rc}: {line[:300]}"
    except MemoryError:
        return "over-limit", "MemoryError"
    except (ValueError, OSError) as e:
        message = " ".join(str(e).split())
        if _names_file(message, case):
            return "error", f"{type(e).__name__}: {message}"
        return "unnamed", f"{type(e).__name__}: {message[:300]}"
    except BaseException as e:  # noqa: BLE001 (a fuzz case may raise anything: that is the finding)
        if isinstance(e, KeyboardInterrupt):
            raise
        message = " ".join(str(e).split())
        if any(m in message for m in _ALLOC_FAILED):
            return "over-limit", f"{type(e).__name__}: {message[:200]}"
        where = traceback.extract_tb(e.__traceback__)[-1]
        return (
            "crash",
            f"{type(e).__name__}: {message[:300]} (at {os.path.basename(where.filename)}:{where.lineno})",
        )
    return "loaded", ""


# ----- the worker process and the campaign -------------------------------------------------------------------------
def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _worker(
    conn_in: int,
    conn_out: int,
    bases: Bases,
    ref: Reference,
    seed: int,
    work: str,
    memory: int,
    targets: list[str],
) -> None:
    """The forked worker: read case numbers, write one JSON line per case (a 'start' line first)."""
    torch.set_num_threads(1)
    _REF[:] = [ref]
    limit = _vm_size() + memory
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    fin = os.fdopen(conn_in, "r")
    fout = os.fdopen(conn_out, "w", buffering=1)
    for line in fin:
        index = int(line)
        try:
            case = make_case(bases, index, seed, work, targets)
        except Exception as e:  # a bug of the harness, not a finding: say so
            fout.write(json.dumps({"start": index, "target": "harness", "entry": "", "what": ""}) + "\n")
            fout.write(
                json.dumps(
                    {
                        "index": index,
                        "target": "harness",
                        "outcome": "crash",
                        "detail": f"harness: {e!r}",
                        "what": "",
                    }
                )
                + "\n"
            )
            continue
        print(f"--- case {index}: {case.what}", file=sys.stderr, flush=True)
        fout.write(
            json.dumps({"start": index, "target": case.target, "entry": case.entry, "what": case.what}) + "\n"
        )
        t = time.perf_counter()
        outcome, detail = classify(case, bases, ref)
        record = dict(
            index=index,
            target=case.target,
            entry=case.entry,
            what=case.what,
            outcome=outcome,
            detail=detail,
            seconds=round(time.perf_counter() - t, 3),
        )
        shutil.rmtree(case.folder, ignore_errors=True)
        fout.write(json.dumps(record) + "\n")
    os._exit(0)


class Worker:
    def __init__(
        self, bases: Bases, ref: Reference, seed: int, work: str, memory: int, targets: list[str], log: str
    ) -> None:
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child
            os.close(w1)
            os.close(r2)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 2)
            try:
                _worker(r1, w2, bases, ref, seed, work, memory, targets)
            finally:
                os._exit(1)
        os.close(r1)
        os.close(w2)
        self.to = os.fdopen(w1, "w", buffering=1)
        self.fd = r2
        self.buf = b""
        self.log = log

    def send(self, index: int) -> None:
        self.to.write(f"{index}\n")

    def read_line(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def stop(self) -> str:
        """Kill the worker; returns how it ended ('' if it was still running)."""
        with contextlib.suppress(ProcessLookupError):
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == 0:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                how = ""
            else:
                how = (
                    f"signal {os.WTERMSIG(status)}"
                    if os.WIFSIGNALED(status)
                    else f"exit {os.WEXITSTATUS(status)}"
                )
        with contextlib.suppress(OSError):
            self.to.close()
        os.close(self.fd)
        return how


def _log_tail(log: str) -> str:
    with contextlib.suppress(OSError), open(log, errors="replace") as f:
        lines = [line.strip() for line in f.read().splitlines()[-5:] if line.strip()]
        return " | ".join(lines)[-300:]
    return ""


def campaign(
    cases: int,
    seed: int = 0,
    timeout: float = 60.0,
    memory_gib: float = 2.0,
    targets: list[str] | None = None,
    root: str | None = None,
    verbose: bool = False,
    first: int = 0,
) -> list[dict[str, Any]]:
    """Run cases first..first+cases-1; returns one record per case."""
    targets = targets or list(TARGETS)
    torch.set_num_threads(1)
    own = root is None
    root = root or tempfile.mkdtemp(prefix="bamba-fuzz-")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            bases = build_bases(os.path.join(root, "bases"))
        ref = reference(bases)
        work = os.path.join(root, "cases")
        os.makedirs(work, exist_ok=True)
        log = os.path.join(root, "worker.log")
        return _run_cases(
            bases,
            ref,
            range(first, first + cases),
            seed,
            timeout,
            int(memory_gib * 2**30),
            targets,
            work,
            log,
            verbose,
        )
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def _run_cases(
    bases: Bases,
    ref: Reference,
    indices: range,
    seed: int,
    timeout: float,
    memory: int,
    targets: list[str],
    work: str,
    log: str,
    verbose: bool,
) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    todo = list(indices)
    while todo:
        worker = Worker(bases, ref, seed, work, memory, targets, log)
        for i in todo:
            worker.send(i)
        while todo:
            index = todo[0]
            start = worker.read_line(timeout)
            record = worker.read_line(timeout) if start is not None else None
            if record is None:
                how = worker.stop()
                outcome = "hang" if not how else "crash"
                if how == "signal 6" and "memory allocation" in _log_tail(log):
                    outcome = "over-limit"
                case_dir = os.path.join(work, f"case-{index}")
                shutil.rmtree(case_dir, ignore_errors=True)
                started = start or {"target": "?", "entry": "?", "what": "?"}
                record = dict(
                    index=index,
                    target=started["target"],
                    entry=started["entry"],
                    what=started["what"],
                    outcome=outcome,
                    detail=f"worker {how or 'killed after the timeout'}: {_log_tail(log)}",
                )
                todo.pop(0)
                records.append(record)
                if verbose:
                    print(json.dumps(record), flush=True)
                break
            todo.pop(0)
            records.append(record)
            if verbose and (record["outcome"] in FAILURES or verbose > 1):
                print(json.dumps(record), flush=True)
        else:
            worker.stop()
    return records


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    by_target: dict[str, Counter] = {}
    for r in records:
        by_target.setdefault(r["target"], Counter())[r["outcome"]] += 1
    totals = Counter(r["outcome"] for r in records)
    return {
        "cases": len(records),
        "outcomes": {o: totals[o] for o in OUTCOMES},
        "by_target": {t: dict(c) for t, c in sorted(by_target.items())},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--first", type=int, default=0, help="the first case's number (to rerun one case)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    p.add_argument("--memory-gib", type=float, default=2.0, help="address space a worker may add (RLIMIT_AS)")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--json", default=None, help="write every case's record here")
    p.add_argument("--verbose", "-v", action="count", default=0)
    args = p.parse_args(argv)
    t = time.perf_counter()
    records = campaign(
        args.cases,
        args.seed,
        args.timeout,
        args.memory_gib,
        args.targets.split(","),
        verbose=args.verbose,
        first=args.first,
    )
    s = summary(records)
    s["seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(s, indent=2))
    for r in records:
        if r["outcome"] in FAILURES:
            print(
                f"{r['outcome']:10} case {r['index']} [{r['target']}/{r.get('entry')}] {r['what']}: {r['detail']}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f)
    return 1 if any(r["outcome"] in FAILURES for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
