"""One line reader for the whole project: what a line is, BOMs, bad UTF-8, atomic output."""

from __future__ import annotations

import io

import pytest

from rosetta.data.corpus import CorpusError, read_parallel
from rosetta.data.text import (
    TextError,
    check_output,
    clean_line,
    iter_lines,
    one_line,
    read_lines,
    write_lines_atomic,
)

# \r alone, \f, \v, U+0085, U+2028 and U+2029 are inside lines; only \n ends one
AWKWARD = "\ufeffone\r\ntwo \r inner\nthree\u2028four\x0cfive\x0bsix\u0085seven\u2029\n\nlast"
EXPECTED = ["one", "two \r inner", "three\u2028four\x0cfive\x0bsix\u0085seven\u2029", "", "last"]


def test_lines_end_at_newline_only_and_a_leading_bom_is_dropped(tmp_path):
    path = tmp_path / "awkward.txt"
    path.write_bytes(AWKWARD.encode("utf-8"))
    assert read_lines(path) == EXPECTED
    assert list(iter_lines(io.BytesIO(AWKWARD.encode("utf-8")))) == EXPECTED
    # str.splitlines, which evaluate used to call, counts this file differently
    assert len(AWKWARD.splitlines()) != len(EXPECTED)


def test_a_final_newline_adds_no_line_and_only_the_first_bom_is_dropped(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"a\n\xef\xbb\xbfb\n")
    assert read_lines(path) == ["a", "\ufeffb"]  # a BOM inside the text is clean_line's job
    path.write_bytes(b"")
    assert read_lines(path) == []
    path.write_bytes(b"\n")
    assert read_lines(path) == [""]


@pytest.mark.parametrize("reader", ["file", "stream"])
def test_invalid_utf8_names_the_file_and_line(tmp_path, reader):
    data = b"fine\nstill fine\nbroken \xff here\n"
    path = tmp_path / "input.en"
    path.write_bytes(data)
    with pytest.raises(TextError, match=r"input\.en, line 3: invalid UTF-8 \(byte 8 of the line\)"):
        if reader == "file":
            read_lines(path)
        else:
            with open(path, "rb") as stream:
                list(iter_lines(stream, str(path)))
    with pytest.raises(TextError, match=r"^<stdin>, line 3: invalid UTF-8"):
        list(iter_lines(io.BytesIO(data)))


def test_the_corpus_reader_is_the_same_reader(tmp_path):
    src, tgt = tmp_path / "c.en", tmp_path / "c.de"
    src.write_bytes("\ufeffA dog\r barks.\r\nA cat\u2028sleeps.\n".encode())
    tgt.write_bytes(b"Ein Hund bellt.\nEine Katze schl\xc3\xa4ft.\n")
    # two lines each; the BOM and control characters become no pieces of vocabulary
    assert read_parallel(src, tgt) == [
        ("A dog  barks.", "Ein Hund bellt."),
        ("A cat sleeps.", "Eine Katze schläft."),
    ]
    tgt.write_bytes(b"ok\n\xc3\n")
    with pytest.raises(CorpusError, match=r"c\.de, line 2: invalid UTF-8"):
        read_parallel(src, tgt)


def test_clean_line_turns_control_characters_into_spaces():
    assert (
        clean_line("\ufeff a\tb\rc\x0cd\x0be\u0085f\u2028g\u2029h\x00i \n") == "a b c d e f g h i"
    )
    assert clean_line("e\u0301") == "é"  # NFC
    assert clean_line("\ufeff") == ""
    assert one_line("two\nlines\r") == "two lines "


def test_write_lines_atomic_keeps_the_old_file_when_producing_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("previous\n")

    def failing():
        yield "first"
        raise TextError("<stdin>, line 2: invalid UTF-8")

    with pytest.raises(TextError):
        write_lines_atomic(target, failing())
    assert target.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary left
    assert write_lines_atomic(target, ["a", "", "c"]) == 3
    assert target.read_bytes() == b"a\n\nc\n"


def test_check_output_refuses_directories_and_inputs(tmp_path):
    source = tmp_path / "in.en"
    source.write_text("x\n")
    with pytest.raises(TextError, match="is a directory"):
        check_output(tmp_path)
    with pytest.raises(TextError, match="is the input file"):
        check_output(tmp_path / "." / "in.en", [source])
    link = tmp_path / "link.en"
    link.symlink_to(source)
    with pytest.raises(TextError, match="is the input file"):
        check_output(link, [source])
    assert check_output(tmp_path / "new.txt", [source]) == tmp_path / "new.txt"
