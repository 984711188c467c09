"""Fuzzing the readers of user input: any bytes or text gives a clear error or a correct
result, never another exception; N lines in, N lines out."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rosetta.config import ConfigError, ExperimentConfig, load_config, packaged_config
from rosetta.data.corpus import CorpusError, ReadStats, read_parallel, read_tsv
from rosetta.data.text import TextError, clean_line, iter_lines, read_lines
from rosetta.decode.translator import Translator

# what has tripped line readers before: BOMs, lone \r, Unicode line breaks, controls
AWKWARD = ["\ufeff", "\r", "\u2028", "\u2029", "\x0c", "\x0b", "\x85", "\x00", "\t", " "]
CHARACTERS = st.one_of(
    st.characters(exclude_characters="\n", exclude_categories=("Cs",)),  # UTF-8 can't hold Cs
    st.sampled_from(AWKWARD),
    st.just("a"),
)
LINE = st.one_of(
    st.text(CHARACTERS, max_size=40),
    st.text(CHARACTERS, min_size=300, max_size=2000),  # very long lines
)
LINES = st.lists(LINE, max_size=12)
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write(directory: str, name: str, data: bytes) -> Path:
    path = Path(directory) / name
    path.write_bytes(data)
    return path


def encode(lines: list[str], final_newline: bool = True) -> bytes:
    text = "\n".join(lines) + ("\n" if final_newline and lines else "")
    return text.encode("utf-8")


@FUZZ
@given(lines=LINES, final_newline=st.booleans())
def test_the_readers_count_lines_as_joined(lines, final_newline):
    data = encode(lines, final_newline)
    expected = [line.removesuffix("\r") for line in lines]
    if expected and expected[0].startswith("\ufeff"):
        expected[0] = expected[0][1:]
    if not final_newline and lines and lines[-1] == "":
        expected.pop()  # "a\n" + "" is "a\n": one line (and "" alone is no line)
    with tempfile.TemporaryDirectory() as tmp:
        assert read_lines(write(tmp, "x.txt", data)) == expected
    assert list(iter_lines(io.BytesIO(data))) == expected


@FUZZ
@given(pairs=st.lists(st.tuples(LINE, LINE), max_size=8))
def test_read_parallel_keeps_every_pair_with_two_sides(pairs):
    stats = ReadStats()
    with tempfile.TemporaryDirectory() as tmp:
        src = write(tmp, "c.en", encode([s for s, _ in pairs]))
        tgt = write(tmp, "c.de", encode([t for _, t in pairs]))
        result = read_parallel(src, tgt, stats)
    expected = [(clean_line(s), clean_line(t)) for s, t in pairs]
    expected = [(s, t) for s, t in expected if s and t]
    assert result == expected  # the reader's BOM and \r removal agree with clean_line's
    assert stats.read == len(pairs) and stats.kept == len(result)
    for text in (side for pair in result for side in pair):
        assert text == text.strip() and "\ufeff" not in text
        assert not any(c in text for c in "\r\x0b\x0c\x85\u2028\u2029\x00\t")


@FUZZ
@given(source=st.binary(max_size=400), target=st.one_of(st.binary(max_size=400), LINES.map(encode)))
def test_read_parallel_of_any_bytes_gives_a_corpus_error_or_pairs(source, target):
    stats = ReadStats()
    with tempfile.TemporaryDirectory() as tmp:
        src, tgt = write(tmp, "c.en", source), write(tmp, "c.de", target)
        try:
            pairs = read_parallel(src, tgt, stats)
        except CorpusError as error:
            assert str(error).startswith(str(Path(tmp)))  # names a file
            return
        assert stats.read == len(read_lines(src)) == len(read_lines(tgt)) >= len(pairs)


@FUZZ
@given(data=st.one_of(st.binary(max_size=400), LINES.map(encode)))
def test_read_tsv_gives_a_corpus_error_or_two_fields_per_line(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = write(tmp, "c.tsv", data)
        try:
            pairs = read_tsv(path)
        except CorpusError as error:
            assert str(error).startswith(str(path))
            return
        assert len(pairs) <= len(read_lines(path))
    assert all(src and tgt and "\t" not in src + tgt for src, tgt in pairs)


BASE_CONFIG = yaml.safe_load(packaged_config("toy.yaml").read_text(encoding="utf-8"))
KEYS = st.sampled_from(
    ["train.lr", "train.betas", "model.heads", "data.toy", "decode.beam", "x", "model", ""]
)
VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["[0.9,", "{a: 1", "null", "-1", "0", "1e-3", "[0.9, 0.98]", "'", "&a *a"]),
)


@FUZZ
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=200)))
def test_load_config_gives_a_config_error_or_a_config(text):
    with tempfile.TemporaryDirectory() as tmp:
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
        path = write(tmp, "c.yaml", data)
        try:
            assert isinstance(load_config(path), ExperimentConfig)
        except ConfigError as error:
            assert str(error)


@FUZZ
@given(overrides=st.lists(st.one_of(st.text(max_size=40), st.tuples(KEYS, VALUES)), max_size=3))
def test_overrides_give_a_config_error_or_a_config(overrides):
    assignments = [o if isinstance(o, str) else f"{o[0]}={o[1]}" for o in overrides]
    with tempfile.TemporaryDirectory() as tmp:
        path = write(tmp, "c.yaml", yaml.safe_dump(BASE_CONFIG).encode("utf-8"))
        try:
            assert isinstance(load_config(path, assignments), ExperimentConfig)
        except ConfigError as error:
            assert str(error)


@pytest.fixture(scope="module")
def translator(untrained_model_dir) -> Translator:
    # greedy, two output tokens at most: the plumbing is under test, not the model
    return Translator.load(untrained_model_dir, beam=1, max_len_a=0.0, max_len_b=2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=LINES)
def test_translate_n_lines_in_n_lines_out(translator, lines):
    data = encode(lines)
    results = list(translator.translate_stream(iter_lines(io.BytesIO(data)), chunk=5))
    assert len(results) == len(lines)
    for line, result in zip(lines, results):
        assert "\n" not in result.text and "\r" not in result.text
        assert len(result.hypotheses) == 1
        if not clean_line(line):
            assert result.text == "" and result.hypotheses[0][1].log_prob == 0.0


@FUZZ
@given(data=st.binary(max_size=300))
def test_translate_input_is_utf8_or_a_named_line(data):
    try:
        lines = list(iter_lines(io.BytesIO(data)))
    except TextError as error:
        number = int(str(error).split("line ")[1].split(":")[0])
        assert str(error).startswith("<stdin>, line ")
        assert 1 <= number <= data.count(b"\n") + 1
        return
    assert len(lines) == data.count(b"\n") + (not data.endswith(b"\n") and bool(data))
