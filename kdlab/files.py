"""Atomic file writes and kdlab's cache folder: nothing half-written is ever read back."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def replace_folder(source: Path, target: Path) -> None:
    """Rename folder ``source`` to ``target``; an existing ``target`` is first moved aside (to
    ``.<name>.old-*``) and deleted after. A crash in between leaves that copy for
    :func:`restore_replaced_folder`, never a half-written ``target``."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def restore_replaced_folder(target: Path) -> None:
    """Put back the copy :func:`replace_folder` moved aside if a crash kept its successor from
    arriving (several processes may race here: the first rename wins)."""
    if target.exists():
        return
    for old in sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            os.replace(old, target)
            return
        except FileNotFoundError:
            continue


def cache_dir() -> Path:
    """``$KDLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdlab``, else ``~/.cache/kdlab``."""
    if "KDLAB_CACHE_DIR" in os.environ:
        return Path(os.environ["KDLAB_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "kdlab"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Content hash of a file, read in chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
