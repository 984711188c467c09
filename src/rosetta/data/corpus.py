"""Reading a parallel corpus: two aligned files or one TSV, cleaned and checked.

Files are split into lines by ``rosetta.data.text`` (``\n`` only, a leading BOM
and CRLF endings dropped; ``.gz``/``.xz``/``.bz2``/``.zst`` files decompressed as
they are read) and every side goes through its ``clean_line`` (control
characters to spaces, stripped, NFC). Problems that would silently corrupt
training are errors that name the file and line (files of different lengths,
invalid UTF-8, truncated compressed data, a TSV line without exactly one tab);
pairs with an empty side are skipped and counted in ``ReadStats``.

``iter_split`` streams a corpus pair by pair, so a corpus of any size is read in
constant memory; ``read_split`` is the same as a list, for small splits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rosetta.data.text import COMPRESSED_SUFFIXES, TextError, clean_line, iter_lines, open_input


class CorpusError(ValueError):
    """A corpus file that cannot be read as parallel text."""


@dataclass
class ReadStats:
    """What happened to the pairs of one split: kept and skipped, by reason."""

    read: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, count: int = 1) -> None:
        """Counts ``count`` pairs skipped before they were kept."""
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    def drop(self, reason: str, count: int = 1) -> None:
        """Counts ``count`` kept pairs removed by a later filter."""
        self.skip(reason, count)
        self.kept -= count

    def add(self, other: ReadStats) -> None:
        self.read += other.read
        self.kept += other.kept
        for reason, count in other.skipped.items():
            self.skip(reason, count)

    def summary(self) -> str:
        parts = [f"{self.kept:,} of {self.read:,} pairs kept"]
        parts += [f"{count:,} skipped ({reason})" for reason, count in sorted(self.skipped.items())]
        return ", ".join(parts)


def _lines(path: Path) -> Iterator[str]:
    try:
        with open_input(path) as stream:
            yield from iter_lines(stream, str(path))
    except TextError as error:
        raise CorpusError(str(error)) from None


def iter_parallel(source: str | Path, target: str | Path) -> Iterator[tuple[str, str]]:
    """Streams two line-aligned files as raw (source, target) lines.

    A ``CorpusError`` when the files differ in line count (found when the
    shorter one ends: both counts are given), hold invalid UTF-8 or damaged
    compressed data."""
    source, target = Path(source), Path(target)
    src_lines, tgt_lines = _lines(source), _lines(target)
    count = 0
    for count, src in enumerate(src_lines, start=1):
        tgt = next(tgt_lines, None)
        if tgt is None:
            rest = 1 + sum(1 for _ in src_lines)
            _unequal(source, count - 1 + rest, target, count - 1)
        yield src, tgt
    rest = sum(1 for _ in tgt_lines)
    if rest:
        _unequal(source, count, target, count + rest)


def _unequal(source: Path, src_count: int, target: Path, tgt_count: int) -> None:
    raise CorpusError(
        f"{source} has {src_count:,} lines but {target} has {tgt_count:,} "
        f"(line {min(src_count, tgt_count) + 1:,} has no partner): a parallel corpus "
        "needs one target line per source line"
    )


def iter_tsv(path: str | Path) -> Iterator[tuple[str, str]]:
    """Streams ``source<TAB>target`` lines; a line without exactly one tab is an error."""
    path = Path(path)
    for number, line in enumerate(_lines(path), start=1):
        fields = line.split("\t")
        if len(fields) != 2:
            raise CorpusError(
                f"{path}, line {number:,}: expected 2 tab-separated fields, found {len(fields)}"
            )
        yield fields[0], fields[1]


def clean_pairs(
    raw_pairs: Iterable[tuple[str, str]], stats: ReadStats | None = None
) -> Iterator[tuple[str, str]]:
    """Cleans both sides of each pair; pairs with an empty side are skipped and counted."""
    stats = stats if stats is not None else ReadStats()
    for src, tgt in raw_pairs:
        stats.read += 1
        src, tgt = clean_line(src), clean_line(tgt)
        if not src or not tgt:
            stats.skip("empty side")
            continue
        stats.kept += 1
        yield src, tgt


def read_parallel(
    source: str | Path, target: str | Path, stats: ReadStats | None = None
) -> list[tuple[str, str]]:
    """Reads two line-aligned files into cleaned (source, target) pairs."""
    return list(clean_pairs(iter_parallel(source, target), stats))


def read_tsv(path: str | Path, stats: ReadStats | None = None) -> list[tuple[str, str]]:
    """Reads ``source<TAB>target`` lines into cleaned pairs."""
    return list(clean_pairs(iter_tsv(path), stats))


def _existing(path: Path) -> Path:
    """``path``, or the compressed file beside it (``path.gz``, ...) when only that exists."""
    if path.exists():
        return path
    for suffix in COMPRESSED_SUFFIXES:
        compressed = path.with_name(path.name + suffix)
        if compressed.exists():
            return compressed
    return path


def is_tsv(name: str) -> bool:
    """Whether a split name is a TSV file (``x.tsv``, or compressed: ``x.tsv.gz``)."""
    stem = name
    for suffix in COMPRESSED_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return stem.endswith(".tsv")


def split_paths(root: Path, name: str, src_lang: str, tgt_lang: str) -> tuple[Path, ...]:
    """Files of one split: ``root/name`` if it is a TSV, else ``root/name.{src,tgt}``;
    each may be compressed (``.gz``, ``.xz``, ``.bz2``, ``.zst``). An absolute
    ``name`` ignores ``root``."""
    if is_tsv(name):
        return (root / name,)
    return (_existing(root / f"{name}.{src_lang}"), _existing(root / f"{name}.{tgt_lang}"))


def iter_split(
    root: Path, name: str, src_lang: str, tgt_lang: str, stats: ReadStats | None = None
) -> Iterator[tuple[str, str]]:
    """Streams the cleaned pairs of one split of a corpus folder (aligned files or a TSV)."""
    paths = split_paths(root, name, src_lang, tgt_lang)
    raw = iter_tsv(paths[0]) if len(paths) == 1 else iter_parallel(*paths)
    return clean_pairs(raw, stats)


def read_split(
    root: Path, name: str, src_lang: str, tgt_lang: str, stats: ReadStats | None = None
) -> list[tuple[str, str]]:
    """Reads one split of a corpus folder (aligned files or a TSV) into a list."""
    return list(iter_split(root, name, src_lang, tgt_lang, stats))
