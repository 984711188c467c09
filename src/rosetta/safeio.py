"""Writes that never leave a half-written file, and checksums that catch damage.

Every file rosetta writes for a user (checkpoints, model directories, prepared
data, translations) goes through here:

- ``atomic_write_bytes`` / ``atomic_write_text``: the bytes go to a temporary
  file beside the target, are flushed and fsync'ed, and only then renamed over
  the target. A crash or a kill leaves either the old file or the new one.
- ``replace_directory``: a folder is built in full beside its target and then
  swapped in, so a failed build leaves the previous folder untouched.
- ``sha256_file``: the digest recorded beside what a file was written with and
  checked when it is read back.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # every temporary file or folder rosetta makes starts with this


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_chunks_atomic(path: Path, chunks) -> None:
    """Writes an iterable of byte strings to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see the old file or the new one, never part."""
    write_chunks_atomic(path, [data])


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's contents, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def replace_directory(target: Path) -> Iterator[Path]:
    """Yields an empty staging folder beside ``target``; on success it replaces ``target``.

    If the body raises, the staging folder is removed and ``target`` is left
    exactly as it was. On success the old ``target`` (if any) is moved aside,
    the staging folder renamed into place, and only then is the old one deleted.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{target.name}."))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{target.name}.old."))
        os.replace(target, old / target.name)
    os.replace(staging, target)
    _fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(directory: Path) -> int:
    """Deletes the temporary files an interrupted atomic write left in ``directory``.

    Folders are left alone: one may hold the only copy of a model directory
    whose swap was interrupted. Returns how many files were removed.
    """
    removed = 0
    if not Path(directory).is_dir():
        return 0
    for path in Path(directory).glob(f"{TEMP_PREFIX}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed
