"""Writes that never leave a half-written file, and checksums that catch damage.

Every file rosetta writes for a user (checkpoints, model directories, prepared
data, translations) goes through here:

- ``open_replacing`` (and ``atomic_write_bytes`` / ``atomic_write_text`` on it):
  the bytes go to a temporary file beside the target, are flushed and fsync'ed,
  and only then renamed over the target. A crash or a kill leaves either the old
  file or the new one. What cannot be replaced is written through instead (a
  device, a named pipe, ``-`` for standard output); a symbolic link is followed.
- Files and folders get the permissions of what they replace, or the user's
  umask when new, as any other program's output would.
- ``replace_directory``: a folder is built in full beside its target and then
  swapped in, so a failed build leaves the previous folder untouched.
- ``one_writer``: one process at a time writes an experiment (an OS lock held
  for the run's life; a second is refused with the first one's pid).
- ``sha256_file``: the digest recorded beside what a file was written with and
  checked when it is read back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"  # every temporary file or folder rosetta makes starts with this
STDOUT = "-"  # an output path that means standard output


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


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it
    (``/proc/self/status``), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow(path: Path) -> Path:
    """The file a write to ``path`` lands in: a symbolic link is followed to its
    final target (which is then replaced, the link kept), as a shell's ``>`` does."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _written_through(path: Path, existing: os.stat_result | None) -> bool:
    """Whether ``path`` is written in place rather than replaced: a device, a named
    pipe or a socket, and any name of an open descriptor (``/dev/stdout``,
    ``/dev/fd/N``, ``/proc/self/fd/N``), which only the process holding it may replace."""
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        return True
    absolute = os.path.abspath(path)
    return absolute.startswith("/dev/") or os.path.realpath(path).startswith("/proc/")


def _adopt_mode(tmp: Path, existing: os.stat_result | None, base: int) -> None:
    """Gives a temporary file or folder the permissions of what it will replace, or
    ``base`` less the umask when it is new (``mkstemp`` makes them 0600/0700)."""
    if existing is None:
        os.chmod(tmp, base & ~current_umask())
        return
    os.chmod(tmp, stat.S_IMODE(existing.st_mode))
    if (existing.st_uid, existing.st_gid) != (os.getuid(), os.getgid()):
        with contextlib.suppress(OSError):  # only root may give a file away
            os.chown(tmp, existing.st_uid, existing.st_gid)


@contextmanager
def open_replacing(path: str | Path) -> Iterator[BinaryIO]:
    """Opens ``path`` for writing so that a failure never leaves it half-written.

    - ``-`` is standard output;
    - a device, named pipe or socket that exists is written through in place (it
      cannot be replaced: ``-o /dev/null`` stays a device, a pipe's reader reads);
    - a symbolic link is followed and its target replaced; the link stays;
    - anything else (a regular file or a new path) is written to a temporary file
      beside it, flushed, fsync'ed and renamed over it only when the body
      succeeds; it keeps the permissions of the file it replaces, and a new file
      gets the user's umask.
    """
    if str(path) == STDOUT:
        sys.stdout.flush()
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with _named(path):
        yield from _replacing(Path(path))


def _replacing(path: Path) -> Iterator[BinaryIO]:
    """``open_replacing``'s body for a path (not ``-``), as a generator."""
    try:
        existing = path.stat()  # of what a symbolic link points to
    except FileNotFoundError:
        existing = None
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    if _written_through(path, existing):
        with open(path, "wb") as handle:
            yield handle
        return
    target = _follow(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{target.name}.")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _adopt_mode(tmp, existing, 0o666)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


@contextmanager
def _named(path: str | Path) -> Iterator[None]:
    """Gives an operating-system error without a file name (a write's ENOSPC) the
    name of the output it was writing, so its message says where."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from None


def write_chunks_atomic(path: str | Path, chunks: Iterable[bytes]) -> None:
    """Writes byte strings to ``path`` through ``open_replacing``: all or nothing."""
    with open_replacing(path) as handle:
        for chunk in chunks:
            handle.write(chunk)


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
        _adopt_mode(staging, target.stat() if target.is_dir() else None, 0o777)
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


def remove_stale_staging(target: Path) -> int:
    """Deletes the staging folders an interrupted ``replace_directory(target)`` left
    beside ``target`` (call it while holding ``one_writer``). A staging folder is
    never the only copy of anything (the swap renames it away); the ``.old.``
    folder of a swap cut short may be, and is left alone. Returns how many."""
    target = Path(target)
    removed = 0
    for path in target.parent.glob(f"{TEMP_PREFIX}{target.name}.*"):
        if path.is_dir() and "." not in path.name.removeprefix(f"{TEMP_PREFIX}{target.name}."):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


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


class DirectoryBusy(RuntimeError):
    """Another process holds the one-writer lock of a directory; names it."""


LOCK_FILE = ".lock"
_held: dict[str, list[int]] = {}  # real path -> [lock file descriptor, nesting depth]
_held_guard = threading.Lock()


def check_writable(directory: Path) -> None:
    """Creates and removes a file in ``directory`` (made if missing), so that a
    read-only or full location is a one-line error before any work starts."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=TEMP_PREFIX):
            pass
    except OSError as error:
        reason = f"cannot write here ({error.strerror})"
        raise OSError(error.errno, reason, str(directory)) from None


@contextmanager
def one_writer(directory: Path, purpose: str) -> Iterator[None]:
    """Holds ``directory``'s one-writer lock (an OS lock on ``directory/.lock``) for
    the body: a second process asking for it gets ``DirectoryBusy`` naming the
    first, at once. The lock goes with the process (a crash or ``kill -9`` frees
    it), and the same process may take it again inside (``prepare`` in ``train``).
    While held, the file names the holder; released, it is empty again.
    """
    directory = Path(directory)
    check_writable(directory)
    key = os.path.realpath(directory)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 1000, 0).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        raise DirectoryBusy(
            f"{directory} is in use by another process ({holder}): one writer at a time; "
            "wait for it to finish, or use another directory"
        ) from None
    command = " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, {purpose}, since {started}: {command[:300]}\n".encode(), 0)
    with _held_guard:
        _held[key] = [fd, 1]
    try:
        yield
    finally:
        with _held_guard:
            _held[key][1] -= 1
            last = _held[key][1] == 0
            if last:
                del _held[key]
        if last:
            os.ftruncate(fd, 0)  # no holder now: a run leaves the lock file as it found it
            os.close(fd)  # releases the lock
