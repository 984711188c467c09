"""Reading a parallel corpus: two aligned files or one TSV, cleaned and checked.

Files are split into lines by ``rosetta.data.text`` (``\n`` only, a leading BOM
and CRLF endings dropped) and every side goes through its ``clean_line``
(control characters to spaces, stripped, NFC). Problems that would silently
corrupt training are errors that name the file and line (files of different
lengths, invalid UTF-8, a TSV line without exactly one tab); pairs with an empty
side are skipped and counted in ``ReadStats``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rosetta.data.text import TextError, clean_line, read_lines


class CorpusError(ValueError):
    """A corpus file that cannot be read as parallel text."""


@dataclass
class ReadStats:
    """What happened to the pairs of one split: kept and skipped, by reason."""

    read: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self) -> str:
        parts = [f"{self.kept:,} of {self.read:,} pairs kept"]
        parts += [f"{count:,} skipped ({reason})" for reason, count in sorted(self.skipped.items())]
        return ", ".join(parts)


def _read_lines(path: Path) -> list[str]:
    try:
        return read_lines(path)
    except TextError as error:
        raise CorpusError(str(error)) from None


def read_parallel(
    source: str | Path, target: str | Path, stats: ReadStats | None = None
) -> list[tuple[str, str]]:
    """Reads two line-aligned files into cleaned (source, target) pairs.

    Raises ``CorpusError`` when the files differ in line count or hold invalid
    UTF-8; pairs with an empty side are skipped and counted in ``stats``.
    """
    source, target = Path(source), Path(target)
    src_lines, tgt_lines = _read_lines(source), _read_lines(target)
    if len(src_lines) != len(tgt_lines):
        raise CorpusError(
            f"{source} has {len(src_lines):,} lines but {target} has {len(tgt_lines):,}: "
            "a parallel corpus needs one target line per source line"
        )
    return _clean_pairs(zip(src_lines, tgt_lines), stats)


def read_tsv(path: str | Path, stats: ReadStats | None = None) -> list[tuple[str, str]]:
    """Reads ``source<TAB>target`` lines; a line without exactly one tab is an error."""
    path = Path(path)
    raw_pairs = []
    for number, line in enumerate(_read_lines(path), start=1):
        fields = line.split("\t")
        if len(fields) != 2:
            raise CorpusError(
                f"{path}, line {number}: expected 2 tab-separated fields, found {len(fields)}"
            )
        raw_pairs.append((fields[0], fields[1]))
    return _clean_pairs(raw_pairs, stats)


def _clean_pairs(raw_pairs, stats: ReadStats | None) -> list[tuple[str, str]]:
    stats = stats if stats is not None else ReadStats()
    pairs = []
    for src, tgt in raw_pairs:
        stats.read += 1
        src, tgt = clean_line(src), clean_line(tgt)
        if not src or not tgt:
            stats.skip("empty side")
            continue
        pairs.append((src, tgt))
        stats.kept += 1
    return pairs


def split_paths(root: Path, name: str, src_lang: str, tgt_lang: str) -> tuple[Path, ...]:
    """Files of one split: ``root/name`` if it is a TSV, else ``root/name.{src,tgt}``."""
    if name.endswith(".tsv"):
        return (root / name,)
    return (root / f"{name}.{src_lang}", root / f"{name}.{tgt_lang}")


def read_split(
    root: Path, name: str, src_lang: str, tgt_lang: str, stats: ReadStats | None = None
) -> list[tuple[str, str]]:
    """Reads one split of a corpus folder (aligned files or a TSV)."""
    paths = split_paths(root, name, src_lang, tgt_lang)
    if len(paths) == 1:
        return read_tsv(paths[0], stats)
    return read_parallel(paths[0], paths[1], stats)
