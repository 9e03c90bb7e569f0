"""Files written so that a reader never sees half of one: staged beside the target, flushed, renamed."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
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


def remove_dead_staging(folder: str) -> list[str]:
    """Remove the staged files that writers on this machine left in `folder` when they were killed (their
    process is gone); returns their names. Those of live writers, and of other machines, stay."""
    host_prefix = _staging_host_prefix()
    removed = []
    for name in os.listdir(folder):
        pid = name.removeprefix(host_prefix).split("-", 1)[0]
        if not name.startswith(host_prefix) or not pid.isdigit() or int(pid) == os.getpid():
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
