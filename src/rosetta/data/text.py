"""Text lines in and out: one definition of a line for the whole project.

Every file or stream of sentences rosetta reads (corpora, ``translate`` input,
``evaluate`` sources and references) goes through ``read_lines`` or
``iter_lines``, so all of them count the same lines:

- a line ends at ``\\n`` and nowhere else: a lone ``\\r``, ``\\f``, ``\\v``,
  U+0085, U+2028 or U+2029 stays inside its line (``str.splitlines`` would
  split there), and the ``\\r`` of a CRLF ending is dropped;
- a UTF-8 byte order mark at the start of the first line is dropped;
- invalid UTF-8 is a ``TextError`` naming the file (or ``<stdin>``) and the
  1-based line number;
- a final line without ``\\n`` is a line; a file ending in ``\\n`` has no
  extra empty line after it.
- a file named ``*.gz``, ``*.xz``, ``*.bz2`` or ``*.zst`` is decompressed as it
  is read; compressed data that ends early or is damaged is a ``TextError``
  naming the file and the last line read.

``clean_line`` is what every sentence goes through before the tokenizer, in
training and in translation alike; ``write_lines_atomic`` writes output so that
a failure leaves any earlier file untouched.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from rosetta.safeio import write_chunks_atomic

BOM = "\ufeff"
_UTF8_BOM = BOM.encode("utf-8")
STDIN = "<stdin>"

# C0 and C1 control characters (tab, \r, \f, \v, U+0085 among them) and the
# Unicode line and paragraph separators: whitespace to a reader, but each one a
# line break to some tools and a vocabulary piece of its own to SentencePiece
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class TextError(ValueError):
    """A text file or stream that cannot be read as lines of UTF-8; names file and line."""


def _decode(raw: bytes, name: str, number: int) -> str:
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if number == 1 and raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TextError(
            f"{name}, line {number}: invalid UTF-8 (byte {error.start + 1} of the line)"
        ) from None


def iter_lines(stream: BinaryIO, name: str = STDIN) -> Iterator[str]:
    """Yields the lines of a binary stream (e.g. ``sys.stdin.buffer``) one at a time,
    decoded and without their line ending; ``name`` is used in error messages."""
    number = 0
    try:
        for number, raw in enumerate(stream, start=1):  # a binary stream splits at b"\n" only
            yield _decode(raw[:-1] if raw.endswith(b"\n") else raw, name, number)
    except _DECOMPRESSION_ERRORS as error:
        reason = str(error) or type(error).__name__
        raise TextError(f"cannot read {name} past line {number:,}: {reason}") from None


def read_lines(path: str | Path) -> list[str]:
    """All lines of a UTF-8 text file, compressed or not (see the module docstring
    for what a line is)."""
    with open_input(path) as stream:
        return list(iter_lines(stream, str(path)))


def check_lines(path: str | Path) -> int:
    """Reads a whole file through ``iter_lines`` without keeping it; returns the line
    count, or raises the ``TextError`` its first bad line would give."""
    with open_input(path) as stream:
        return sum(1 for _ in iter_lines(stream, str(path)))


def clean_line(line: str) -> str:
    """The form every sentence has before the tokenizer: control characters and
    line/paragraph separators become spaces, byte order marks are removed,
    surrounding whitespace is stripped and the text is NFC-normalised."""
    line = _CONTROLS.sub(" ", line.replace(BOM, ""))
    return unicodedata.normalize("NFC", line.strip())


def one_line(text: str) -> str:
    """``text`` with every control character and line separator made a space, so that
    it prints as exactly one line (a model's output may hold a byte piece for ``\\n``)."""
    return _CONTROLS.sub(" ", text)


def _zstd_open(path: Path) -> BinaryIO:
    try:
        from compression import zstd  # Python >= 3.14

        return zstd.open(path, "rb")
    except ImportError:
        import zstandard  # a dependency below Python 3.14

        raw = open(path, "rb")  # noqa: SIM115 -- the stream is what this returns
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))


# what each compressed file suffix is opened with (the plain file otherwise); each
# returns the open stream, which its caller closes
_OPENERS = {
    ".gz": lambda path: gzip.open(path, "rb"),  # noqa: SIM115
    ".xz": lambda path: lzma.open(path, "rb"),  # noqa: SIM115
    ".bz2": lambda path: bz2.open(path, "rb"),  # noqa: SIM115
    ".zst": _zstd_open,
}
COMPRESSED_SUFFIXES = tuple(_OPENERS)


def _zstd_errors() -> tuple[type[BaseException], ...]:
    try:
        from compression.zstd import ZstdError
    except ImportError:
        try:
            from zstandard import ZstdError
        except ImportError:
            return ()
    return (ZstdError,)


# truncated or damaged compressed input: gzip raises EOFError or BadGzipFile (an
# OSError), lzma LZMAError, zlib/bz2 their errors while reading
_DECOMPRESSION_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, *_zstd_errors())


def open_input(path: str | Path) -> BinaryIO:
    """Opens an input file for ``iter_lines``, decompressing ``.gz``/``.xz``/``.bz2``/
    ``.zst`` files, with a one-line error if it is missing, a directory or unreadable."""
    path = Path(path)
    if not path.exists():
        raise TextError(f"input file {path} does not exist")
    if path.is_dir():
        raise TextError(f"input {path} is a directory, not a file")
    opener = _OPENERS.get(path.suffix.lower(), lambda path: open(path, "rb"))  # noqa: SIM115
    try:
        return opener(path)
    except OSError as error:
        raise TextError(f"cannot read {path}: {error.strerror or error}") from None


def check_output(path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuses an output path that is a directory, one of ``inputs`` (writing it would
    destroy what is being read) or in a folder that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise TextError(f"output {path} is a directory; give a file name")
    for source in inputs:
        if _same_file(path, Path(source)):
            raise TextError(f"output {path} is the input file {source}; write elsewhere")
    folder = path.parent if str(path.parent) else Path(".")
    if folder.exists() and not os.access(folder, os.W_OK):
        raise TextError(f"cannot write {path}: its folder is not writable")
    return path


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def write_lines_atomic(path: str | Path, lines: Iterable[str]) -> int:
    """Writes ``lines`` (each followed by ``\\n``) to ``path`` through a temporary file
    beside it that is renamed over ``path`` only once all lines are written: if
    producing a line fails, ``path`` keeps its earlier content. Returns the count."""
    count = 0

    def chunks() -> Iterator[bytes]:
        nonlocal count
        for line in lines:
            count += 1
            yield (line + "\n").encode("utf-8")

    write_chunks_atomic(Path(path), chunks())
    return count
