"""A node's private folders: its state (keys, anchors) and its cache (embeddings, converted
models), both readable by their owner only and never sent."""

from __future__ import annotations

import functools
import os
import secrets
import uuid
from pathlib import Path

import torch


def state_root() -> Path:
    """The node's own state outside any ledger or run folder: signing keys, anchors and the
    cache secret (``PRIVATUNE_STATE``, default ``~/.local/state/privatune``)."""
    default = Path.home() / ".local" / "state" / "privatune"
    return Path(os.environ.get("PRIVATUNE_STATE") or default)


def cache_root() -> Path:
    return Path(os.environ.get("PRIVATUNE_CACHE") or Path.home() / ".cache" / "privatune")


def private_dir(folder: Path) -> Path:
    """``folder`` and every folder of it below the cache root, readable by the owner only."""
    root = cache_root()
    chain = [folder, *folder.parents]
    for path in reversed(chain[: chain.index(root) + 1] if root in chain else [folder]):
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)  # a folder made before this rule
    return folder


@functools.cache
def cache_secret(path: Path) -> bytes:
    """The node-local HMAC key of the cache's text keys, made once (0600)."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path.read_bytes()


def private_save(obj: object, folder: Path) -> None:
    """``torch.save`` into a new 0600 file of ``folder``, atomically (readers never see a
    part)."""
    tmp = folder / f".{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        torch.save(obj, f)
    tmp.rename(folder / f"{uuid.uuid4().hex}.pt")
