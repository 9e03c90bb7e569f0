"""Training data: text files -> token ids -> packed rows in a reproducible order -> padding-free batches.

Padding-free training concatenates a batch into one row of shape (1, total_tokens) and tells the model where
each sequence starts: attention reads `position_ids` / `cu_seq_lens_*`, the Mamba-2 scan reads `seq_idx`.
`DataCollatorWithFlattening` returns what transformers' collator of the same name (v5.24) returns, so a
Hugging Face trainer and ours feed the model the same batch. `pad_batch` is the padded baseline that packing
is compared with.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .textfiles import iter_text_files
from .tokenizer import Tokenizer

IGNORE_INDEX = -100  # label value that cross-entropy skips

# Keys that get a leading batch dim of 1, keys stored as int64 (the rest are int32), keys kept as Python ints.
_BATCH_DIM_KEYS = frozenset({"input_ids", "labels", "position_ids", "seq_idx"})
_INT64_KEYS = frozenset({"input_ids", "labels", "position_ids"})
_PY_INT_KEYS = frozenset({"max_length_q", "max_length_k"})


def _as_list(values: Any, what: str) -> list[int]:
    """A Python list of ints from a 1-D list, tuple, tensor or numpy array; `what` names it in errors."""
    out = values.tolist() if hasattr(values, "tolist") else list(values)
    if any(isinstance(v, (list, tuple)) for v in out):
        raise ValueError(f"{what} must be one sequence of token ids (1-D), found nested values: {out!r:.60}")
    return out


class DataCollatorWithFlattening:
    """Flatten a batch of examples into one row, with no padding.

    Returns (T = total tokens of the non-empty examples, N = their number):
      input_ids     (1, T) int64   the examples, concatenated
      labels        (1, T) int64   each example's `labels` (or its `input_ids`), first token -> separator_id
      position_ids  (1, T) int64   restart at `position_ids_start` for every example  [return_position_ids]
      seq_idx       (1, T) int32   index of the example each token belongs to          [return_seq_idx]
      cu_seq_lens_q/k  (N + 1,) int32   cumulative lengths, starting at 0              [return_flash_attn_kwargs]
      max_length_q/k   int              longest example                                [return_flash_attn_kwargs]

    Empty examples are dropped (and do not count in `seq_idx`); a batch with no tokens raises ValueError.
    Unlike transformers, a batch where only some examples have `labels` raises ValueError instead of
    raising KeyError or ignoring the later labels.
    """

    def __init__(
        self,
        return_position_ids: bool = True,
        separator_id: int = IGNORE_INDEX,
        return_flash_attn_kwargs: bool = False,
        return_seq_idx: bool = False,
        position_ids_start: int = 0,
        return_tensors: str = "pt",
    ):
        self.return_tensors = return_tensors
        self.return_position_ids = return_position_ids
        self.separator_id = separator_id
        self.return_flash_attn_kwargs = return_flash_attn_kwargs
        self.return_seq_idx = return_seq_idx
        self.position_ids_start = position_ids_start

    def __call__(
        self,
        features: list[dict[str, Any]],
        return_tensors: str | None = None,
        separator_id: int | None = None,
    ) -> dict[str, Any]:
        if return_tensors is None:
            return_tensors = self.return_tensors
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        if separator_id is None:
            separator_id = self.separator_id
        examples = [(i, f) for i, f in enumerate(features) if len(f["input_ids"]) > 0]
        if not examples:
            raise ValueError(f"DataCollatorWithFlattening got a batch of {len(features)} examples, all empty")
        first_index, first = examples[0]
        has_labels = "labels" in first

        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        seq_idx: list[int] = []
        cu_seq_lens = [0]
        max_length = 0
        for seq, (i, feature) in enumerate(examples):
            if ("labels" in feature) != has_labels:
                raise ValueError(
                    f"example {i} {'lacks' if has_labels else 'has'} 'labels' but example {first_index} "
                    f"{'has' if has_labels else 'lacks'} them; give labels to all examples or to none"
                )
            ids = _as_list(feature["input_ids"], f"example {i}'s input_ids")
            target = _as_list(feature["labels"], f"example {i}'s labels") if has_labels else ids
            n = len(ids)
            input_ids += ids
            labels += [separator_id] + target[1:]  # the first token has no previous token to predict it
            position_ids += range(self.position_ids_start, self.position_ids_start + n)
            seq_idx += [seq] * n
            cu_seq_lens.append(cu_seq_lens[-1] + n)
            max_length = max(max_length, n)

        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels}
        if self.return_position_ids:
            batch["position_ids"] = position_ids
        if self.return_seq_idx:
            batch["seq_idx"] = seq_idx
        if self.return_flash_attn_kwargs:
            batch["cu_seq_lens_q"] = cu_seq_lens
            batch["cu_seq_lens_k"] = list(cu_seq_lens)  # a separate tensor, as in transformers
            batch["max_length_q"] = batch["max_length_k"] = max_length
        return {k: _to_array(k, v, return_tensors) for k, v in batch.items()}


def _to_array(key: str, value: Any, return_tensors: str) -> Any:
    """The collator's output for one key: (1, T) rows for per-token keys, int64 or int32, max lengths as ints."""
    if key in _PY_INT_KEYS:
        return value
    if key in _BATCH_DIM_KEYS:
        value = [value]
    if return_tensors == "np":
        import numpy as np  # only needed for this output type

        return np.array(value, dtype=np.int64 if key in _INT64_KEYS else np.int32)
    return torch.tensor(value, dtype=torch.int64 if key in _INT64_KEYS else torch.int32)


def pack_examples(examples: Iterable[Sequence[int]], max_tokens: int) -> Iterator[list[list[int]]]:
    """Greedily group examples, in order, into rows of at most `max_tokens` tokens.

    Each row is a list of examples; a row is yielded as soon as the next example does not fit, so every
    token comes out once, in input order. An example longer than `max_tokens` is split into pieces of
    `max_tokens` tokens (the last one shorter), and each piece is packed as a separate example. Empty
    examples are skipped. Streams: `examples` may be a generator.
    """
    if max_tokens < 1:
        raise ValueError(f"pack_examples: max_tokens must be >= 1, got {max_tokens}")
    row: list[list[int]] = []
    row_tokens = 0
    for i, example in enumerate(examples):
        ids = _as_list(example, f"pack_examples: example {i}")
        for start in range(0, len(ids), max_tokens):
            piece = ids[start : start + max_tokens]
            if row_tokens + len(piece) > max_tokens:
                yield row
                row, row_tokens = [], 0
            row.append(piece)
            row_tokens += len(piece)
    if row:
        yield row


def pad_batch(
    examples: list[list[int]], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad examples to the longest one: the padded baseline for packing.

    Returns LongTensors of shape (B, T), T = longest example: `input_ids`, `attention_mask` (1 on tokens,
    0 on padding) and `labels` (input_ids, with IGNORE_INDEX on padding).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"pad_batch: padding_side must be 'right' or 'left', got {padding_side!r}")
    if not examples:
        raise ValueError("pad_batch: got no examples")
    rows = [_as_list(e, f"pad_batch: example {i}") for i, e in enumerate(examples)]
    b, t = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((b, t), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        if not r:
            continue
        span = slice(0, len(r)) if padding_side == "right" else slice(t - len(r), t)
        input_ids[i, span] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, span] = 1
    # Mask by attention_mask, not by pad_token_id: a pad id that also occurs as a real token keeps its label.
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # (B, T)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ----- training data: text -> packed rows, the order they are read in, the batch of a step ------------------
Row = list[list[int]]  # a packed row: a list of examples (token id lists)


def load_tokenizer(path: str | None) -> Tokenizer:
    """The tokenizer of a folder holding tokenizer.json, with a clear error when there is none."""
    if not path:
        raise ValueError(
            "train: a tokenizer is required (a folder with tokenizer.json; see `bamba train-tokenizer`)"
        )
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(
            f"train: tokenizer folder {path!r} has no tokenizer.json (train one with `bamba train-tokenizer`)"
        )
    return Tokenizer.from_pretrained(path)


def tokenize_documents(texts: list[str], tokenizer: Any, batch: int = 1024) -> list[list[int]]:
    """BOS + tokens + EOS for every document (BOS / EOS left out when the tokenizer has none)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for i in range(0, len(texts), batch):
        encoded = tokenizer(
            texts[i : i + batch], padding=False, return_tensors=None, add_special_tokens=False
        )
        out += [bos + ids + eos for ids in encoded["input_ids"]]
    return out


def split_eval(docs: list[list[int]], fraction: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(train, eval): a seeded random `fraction` of the documents (at least one) is held out, order kept."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"train: eval_fraction={fraction} must be in [0, 1)")
    # at least one; the 1e-9: 0.07 * 100 is 7.000000000000001, which must hold out 7, not 8
    n_eval = max(1, math.ceil(fraction * len(docs) - 1e-9)) if fraction > 0 else 0
    if n_eval == 0:
        return docs, []
    if n_eval >= len(docs):
        raise ValueError(
            f"train: eval_fraction={fraction} holds out all {len(docs)} documents; give more data, a smaller "
            "eval_fraction, or eval_data files"
        )
    held = set(torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    train = [d for i, d in enumerate(docs) if i not in held]
    return train, [d for i, d in enumerate(docs) if i in held]


def fingerprint(rows: list[Row]) -> str:
    """A short hash of the packed rows: a resumed run must read the same data."""
    h = hashlib.sha1()
    for row in rows:
        for example in row:
            h.update(torch.tensor(example, dtype=torch.int32).numpy().tobytes())
            h.update(b"|")
        h.update(b"#")
    return h.hexdigest()[:16]


class RowOrder:
    """The row index at every position of the endless training stream: each epoch is a permutation whose
    generator is seeded from (seed, epoch).

    version 2 (runs started now) seeds it with a hash of both; version 1 (trainer_state.pt files without
    "row_order", which resume as they began) with seed + epoch, so that nearby seeds shared orders (seed
    1's first epoch was seed 0's second)."""

    VERSIONS = (1, 2)
    VERSION = VERSIONS[-1]  # of runs started now

    def __init__(self, n_rows: int, seed: int, version: int = VERSION) -> None:
        if version not in self.VERSIONS:
            raise ValueError(f"train: row_order={version!r}: expected one of {self.VERSIONS}")
        self.n_rows, self.seed, self.version = n_rows, seed, version
        self._epoch, self._perm = -1, []

    def __getitem__(self, position: int) -> int:
        epoch = position // self.n_rows
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self._epoch_seed(epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n_rows, generator=g).tolist()
        return self._perm[position % self.n_rows]

    def _epoch_seed(self, epoch: int) -> int:
        if self.version == 1:
            return self.seed + epoch
        digest = hashlib.sha256(f"bamba row order {self.seed} {epoch}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1  # (a seed below 2**63)


def stream_positions(step: int, micro: int, rank: int, batch_rows: int, world: int, grad_accum: int) -> range:
    """Positions in the row stream that `rank` reads for micro-batch `micro` of optimizer step `step`.

    A step reads the next batch_rows * world * grad_accum positions; each micro-batch a contiguous slice of
    them, cut into one piece per rank. So 1 row x 2 ranks reads what 2 rows x 1 rank read, and
    grad_accum 2 x 1 row what grad_accum 1 x 2 rows read.
    """
    first = ((step * grad_accum + micro) * world + rank) * batch_rows
    return range(first, first + batch_rows)


_COLLATOR = DataCollatorWithFlattening(return_position_ids=True, return_seq_idx=True)


def flatten_rows(rows: list[Row]) -> dict[str, Tensor]:
    """The examples of `rows` as one padding-free row: input_ids, labels, position_ids (1, T) int64,
    seq_idx (1, T) int32."""
    return _COLLATOR([{"input_ids": ex} for row in rows for ex in row])


def count_targets(labels: Tensor) -> int:
    """Tokens the loss predicts: labels (b, l) are shifted by one inside the loss, so position 0 never counts."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class TrainData:
    """What `prepare_data` gives a run: its packed rows and their sizes."""

    rows: list[Row]  # packed training rows
    eval_rows: list[Row]  # packed held-out rows (may be empty)
    n_docs: int  # training documents
    n_tokens: int  # training tokens


def prepare_data(
    data: list[str],
    tokenizer: Any,
    row_tokens: int,
    eval_fraction: float,
    eval_data: list[str] | None,
    seed: int,
    max_examples: int | None,
) -> TrainData:
    """Read, tokenize, split off eval documents and pack into rows of at most `row_tokens` tokens."""
    texts = list(itertools.islice(iter_text_files(data), max_examples))  # reads no further than needed
    docs = tokenize_documents(texts, tokenizer)
    if eval_data:
        eval_docs = tokenize_documents(list(iter_text_files(eval_data)), tokenizer)
    else:
        docs, eval_docs = split_eval(docs, eval_fraction, seed)
    rows = list(pack_examples(docs, row_tokens))
    if not rows:
        raise ValueError(f"train: the data files {data} hold no documents (empty files, or only blank lines)")
    return TrainData(rows, list(pack_examples(eval_docs, row_tokens)), len(docs), sum(map(len, docs)))
