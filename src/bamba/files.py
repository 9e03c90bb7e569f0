"""Files and folders written so that a reader never sees half of one: staged beside the target, flushed,
renamed; and strict JSON for the records written."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from typing import Any


def atomic_write(path: str, write: Any, mode: str = "w") -> None:
    """Write a file through a temporary file in the same folder and a rename: never half written."""
    tmp = _write_staged(path, write, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def chmod_as_created(path: str, mode: int) -> None:
    """Give `path` the mode a plain open (0o666) or mkdir (0o777) would: `mode` less the process's umask.
    (Temporary files and folders are created private, 0600 / 0700.)"""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _staging_host_prefix() -> str:
    """Staged files are named .tmp-<host>-<pid>-...: a later save can tell those of a killed writer."""
    return f".tmp-{re.sub(r'[^A-Za-z0-9_.]', '_', socket.gethostname())}-"


def remove_dead_staging(folder: str, targets: tuple[str, ...] | None = None) -> list[str]:
    """Remove the staged files that writers on this machine left in `folder` when they were killed (their
    process is gone); returns their names. Those of live writers, and of other machines, stay; with
    `targets`, only those staged for files of these names."""
    host_prefix = _staging_host_prefix()
    removed = []
    for name in os.listdir(folder):
        pid = name.removeprefix(host_prefix).split("-", 1)[0]
        if not name.startswith(host_prefix) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if targets is not None and not name.endswith(targets):
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or another user's: PermissionError below)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def _write_staged(path: str, write: Any, mode: str = "w") -> str:
    """Call `write(f)` on a new temporary file beside `path`, flushed to disk; returns its path (the caller
    renames it into place). Nothing is left behind if `write` fails."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        dir=folder, prefix=f"{_staging_host_prefix()}{os.getpid()}-", suffix=os.path.basename(path)
    )
    chmod_as_created(tmp, 0o666)  # mkstemp's 0600 would make shared checkpoints unreadable to others
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def save_folder_atomically(out_dir: str, name: str, write: Callable[[str], None]) -> str:
    """Run `write(tmp_folder)`, then rename the folder to out_dir/name. The previous out_dir/name is moved
    aside first and deleted last, so a complete folder exists at every moment (see
    `bamba.train_state.find_checkpoint`)."""
    final = os.path.join(out_dir, name)
    old = os.path.join(out_dir, f".{name}.old")
    for entry in os.listdir(out_dir):  # left by a run killed while saving (this process is the only writer)
        if entry.startswith(f".{name}.tmp-"):
            shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=f".{name}.tmp-")
    try:
        chmod_as_created(tmp, 0o777)  # mkdtemp makes it 0700; the final folder reads like any other
        write(tmp)
        _fsync_folder(tmp)
        if os.path.isdir(old):
            if not os.path.isdir(final):  # a crash between the two renames: `old` is the only complete one
                os.rename(old, final)
            else:
                shutil.rmtree(old)
        if os.path.isdir(final):
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_folder(folder: str) -> None:
    """Flush the folder's files and the folder itself to disk, so that a rename never publishes data that
    a power loss could still take back."""
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        if os.path.isfile(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    with contextlib.suppress(OSError):  # directories cannot be opened for fsync on some platforms
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----- reading JSON that others wrote ---------------------------------------------------------------------
MAX_JSON_BYTES = 100_000_000  # the safetensors library's bound on a header; any JSON file we read is smaller


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {twice!r} appears twice in one object")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes | str, source: str, constants: bool = True) -> Any:
    """The JSON value in `data` (UTF-8 bytes or text), strictly: no key twice in an object (which of the
    two would count?), nesting no deeper than the parser's recursion allows (a RecursionError otherwise).
    Any fault is a ValueError that names `source` (a file, or a file and a part of it). constants=False
    also refuses NaN and Infinity (not JSON, but Python writes them, and old config.json files hold them)."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise ValueError(f"{source}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        hook = {} if constants else {"parse_constant": _no_constant}
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, **hook)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{source}: JSON nested too deeply to read") from None
    except ValueError as e:  # (from the hooks above)
        raise ValueError(f"{source}: not valid JSON ({e})") from None


def read_json_file(path: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value of the file at `path` (see `parse_json`); a file larger than `max_bytes` is refused
    before it is read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise ValueError(f"{path}: {size} bytes, more than the {max_bytes} a JSON file here may hold")
        data = f.read()
    return parse_json(data.removeprefix(b"\xef\xbb\xbf"), path)


def strict_json(record: dict[str, Any]) -> str:
    """`record` as one line of strict JSON: a float that is not finite (a nan loss) is written as null."""
    return json.dumps(
        {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    )
