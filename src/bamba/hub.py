"""Where a checkpoint's files are: a local folder as is, or a hub repo id through huggingface_hub's cache."""

from __future__ import annotations

import os
from typing import Any

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


# huggingface_hub.snapshot_download's keywords that loading passes on (the rest are set here)
HUB_KEYWORDS = frozenset(
    {
        "cache_dir",
        "force_download",
        "local_files_only",
        "token",
        "etag_timeout",
        "user_agent",
        "headers",
        "endpoint",
        "max_workers",
        "proxies",
    }
)


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot give a correct model."""


def resolve_folder(path_or_repo_id: str | os.PathLike, revision: str | None = None, **hub_kwargs: Any) -> str:
    """A local folder as is; otherwise a hub repo id fetched through huggingface_hub's cache.

    Offline mode (HF_HUB_OFFLINE=1 or local_files_only=True) is honoured: a repo that is not cached then
    raises a FileNotFoundError that says so.
    """
    unknown = sorted(set(hub_kwargs) - HUB_KEYWORDS)
    if unknown:
        raise TypeError(
            f"unknown keyword argument(s) {unknown}; loading takes revision and huggingface_hub's "
            f"{sorted(HUB_KEYWORDS)}"
        )
    path = os.fspath(path_or_repo_id)
    if not path:
        raise FileNotFoundError("an empty path is not a checkpoint folder")
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path}: expected a checkpoint folder, found a file")
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or not path:
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(path, revision=revision, allow_patterns=_HUB_PATTERNS, **hub_kwargs)
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{path}: not a local folder, and not in the Hugging Face cache while offline (or the hub is "
            f"unreachable); download it first (hf download {path}) or pass a folder. ({e})"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{path}: not a local folder, and no such repository on the hub") from None


def resolve_file(path_or_repo_id: str | os.PathLike, filename: str, **hub_kwargs: Any) -> str:
    folder = resolve_folder(path_or_repo_id, **hub_kwargs)
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: missing {filename}")
    return path
