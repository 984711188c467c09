"""Reading parallel text: cleaning, and a clear error or a counted skip for bad input."""

from __future__ import annotations

import unicodedata

import pytest

from rosetta.data.corpus import CorpusError, ReadStats, read_parallel, read_split, read_tsv


def write(path, text: str | bytes):
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def test_lines_are_stripped_and_nfc_normalised(tmp_path):
    decomposed = unicodedata.normalize("NFD", "Mädchen")
    src = write(tmp_path / "a.en", "  A girl.  \nTwo dogs.\n")
    tgt = write(tmp_path / "a.de", f"Ein {decomposed}.\t\nZwei Hunde.\n")
    pairs = read_parallel(src, tgt)
    assert pairs == [("A girl.", "Ein Mädchen."), ("Two dogs.", "Zwei Hunde.")]
    assert pairs[0][1] == unicodedata.normalize("NFC", pairs[0][1])


def test_different_line_counts_name_both_files_and_counts(tmp_path):
    src = write(tmp_path / "train.en", "a\nb\nc\n")
    tgt = write(tmp_path / "train.de", "a\nb\n")
    with pytest.raises(CorpusError) as error:
        read_parallel(src, tgt)
    message = str(error.value)
    assert "train.en" in message and "train.de" in message
    assert "3" in message and "2" in message


def test_invalid_utf8_names_file_and_line(tmp_path):
    src = write(tmp_path / "x.en", "fine\nalso fine\n")
    tgt = write(tmp_path / "x.de", b"gut\nkaputt \xff\xfe\n")
    with pytest.raises(CorpusError, match=r"x\.de, line 2: invalid UTF-8"):
        read_parallel(src, tgt)


def test_empty_sides_are_skipped_and_counted(tmp_path):
    src = write(tmp_path / "e.en", "one\n\nthree\n   \n")
    tgt = write(tmp_path / "e.de", "eins\nzwei\n\nvier\n")
    stats = ReadStats()
    assert read_parallel(src, tgt, stats) == [("one", "eins")]
    assert (stats.read, stats.kept, stats.skipped) == (4, 1, {"empty side": 3})
    assert "3 skipped (empty side)" in stats.summary()


def test_tsv(tmp_path):
    path = write(tmp_path / "c.tsv", "Hello\tHallo\r\nBye\tTschüss\n")
    assert read_tsv(path) == [("Hello", "Hallo"), ("Bye", "Tschüss")]
    bad = write(tmp_path / "bad.tsv", "Hello\tHallo\nno tab here\n")
    with pytest.raises(CorpusError, match=r"bad\.tsv, line 2: expected 2 tab-separated"):
        read_tsv(bad)


def test_read_split_finds_aligned_files_or_tsv(tmp_path):
    write(tmp_path / "dev.en", "a\n")
    write(tmp_path / "dev.de", "b\n")
    write(tmp_path / "test.tsv", "c\td\n")
    assert read_split(tmp_path, "dev", "en", "de") == [("a", "b")]
    assert read_split(tmp_path, "test.tsv", "en", "de") == [("c", "d")]
    with pytest.raises(CorpusError, match=r"missing\.en does not exist"):
        read_split(tmp_path, "missing", "en", "de")
