"""Atomic file writes: write beside the target, fsync, rename. A reader (or a crash) never sees half a file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with open(..., "x") rather than mkstemp: the file gets the umask's permissions (mkstemp's
    # are 0600, which hides results from collaborators on a shared cluster).
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    open(tmp, "x").close()
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def fsync_file(path) -> None:
    """Flush a file's contents to the disk (a rename alone orders nothing after a power loss)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path) -> None:
    """Make a rename or a new entry in the folder `path` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
