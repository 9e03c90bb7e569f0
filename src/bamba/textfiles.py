"""Reading training text: .txt files (paragraphs) and .jsonl files (a "text" field), checked and streamed."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_SUPPORTED_SUFFIXES = (".txt", ".jsonl")


# A newline followed by one or more blank lines (lines that are empty or hold only spaces and tabs).
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")


def check_files(paths: list[str | os.PathLike[str]], where: str = "") -> None:
    """Every path names an existing file: a folder raises ValueError, a missing file FileNotFoundError,
    each naming the path (after `where`)."""
    for path in map(Path, paths):
        if path.is_dir():
            raise ValueError(f"{where}{path} is a folder; give the .txt or .jsonl files in it")
        if not path.is_file():
            raise FileNotFoundError(f"{where}{path}: no such file")


def iter_text_files(paths: list[str | os.PathLike[str]]) -> Iterator[str]:
    """Yield the documents in text files, file by file, in order.

    .txt:   the file is split on blank lines (two or more consecutive newlines; lines holding only spaces
            or tabs count as blank); each document is stripped of surrounding whitespace, empty ones are dropped.
    .jsonl: one JSON object per line; its string field `text` is yielded unchanged. Blank lines are skipped;
            a line that is not an object with a string `text` raises ValueError naming the file and line.
    Every path is checked before anything is read: a missing file raises FileNotFoundError and another
    extension raises ValueError, both naming the path.
    """
    files = [Path(p) for p in paths]
    check_files(files, "iter_text_files: ")
    for path in files:
        if path.suffix.lower() not in _SUPPORTED_SUFFIXES:
            raise ValueError(
                f"iter_text_files: {path}: unsupported extension {path.suffix!r}, expected one of "
                f"{', '.join(_SUPPORTED_SUFFIXES)}"
            )
    return _iter_documents(files)


def _iter_documents(files: list[Path]) -> Iterator[str]:
    for path in files:
        if path.suffix.lower() == ".txt":
            yield from _iter_txt(path)
        else:
            yield from _iter_jsonl(path)


def _read_utf8(path: Path) -> str:
    """The file's text (a UTF-8 byte-order mark dropped; universal newlines: \r\n and \r read as \n)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from e


def _iter_txt(path: Path) -> Iterator[str]:
    text = _read_utf8(path)
    for doc in _PARAGRAPH_BREAK.split(text):
        doc = doc.strip()
        if doc:
            yield doc


def _iter_jsonl(path: Path) -> Iterator[str]:
    line_no = 0
    with path.open("rb") as f:  # streamed: a .jsonl file can be large
        for raw in f:
            try:
                text = raw.decode("utf-8-sig" if line_no == 0 else "utf-8")  # a byte-order mark dropped
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{line_no + 1}: not UTF-8 text ({e.reason}); convert it to UTF-8"
                ) from e
            # \r\n and lone \r end lines too, but not U+2028, U+2029 or U+0085, which JSON strings may hold
            # (the file's lines end at \n; within one, lone \r end lines too)
            for line in text.removesuffix("\n").removesuffix("\r").split("\r"):
                line_no += 1
                if line.strip():
                    yield _jsonl_text(path, line_no, line)


def _jsonl_text(path: Path, line_no: int, line: str) -> str:
    """The 'text' field of one JSONL record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from e
    except RecursionError:
        raise ValueError(f"{path}:{line_no}: JSON nested too deeply to read") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        if not isinstance(record, dict):
            found = f"a JSON {_json_type(record)}"
        elif "text" not in record:
            found = "no 'text' field"
        else:
            found = f"a 'text' field of JSON type {_json_type(text)}"
        raise ValueError(
            f"{path}:{line_no}: expected a JSON object with a string 'text' field, found {found}"
        )
    return text


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number"}
    return names.get(type(value), type(value).__name__)
