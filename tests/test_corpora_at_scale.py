"""Corpora as people have them: several, compressed, of uneven quality, large.

Streaming preparation (``rosetta.data.prepare``), memory-mapped arrays
(``rosetta.data.arrays``), weighted corpora (``batching.mix``) and the
vectorised batching, each against what it must equal.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import MULTI30K
from rosetta.config import ConfigError, config_from_dict
from rosetta.data.arrays import ARRAYS, NpyAppender, TokenizedSplit
from rosetta.data.batching import BatchIterator, make_batches, mix, padded_size
from rosetta.data.corpus import CorpusError, read_split
from rosetta.data.prepare import PrepareError, corpus_mixture, load_split, prepare
from rosetta.data.tokenizer import Tokenizer, sample_sentences

COMPRESS = {
    ".gz": gzip.compress,
    ".xz": lzma.compress,
    ".bz2": bz2.compress,
    ".zst": lambda data: zstandard.ZstdCompressor().compress(data),
}


def sentences(n: int, seed: int, lang: str) -> list[str]:
    rng = np.random.default_rng(seed)
    words = {
        "en": ["a", "dog", "runs", "the", "red", "ball", "man", "sees"],
        "de": ["ein", "Hund", "läuft", "der", "rote", "Ball", "Mann", "sieht"],
    }[lang]
    return [" ".join(rng.choice(words, size=rng.integers(2, 9))) + f" {i}" for i in range(n)]


def write_pairs(folder, name: str, pairs, suffix: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for side, lang in ((0, "en"), (1, "de")):
        data = "".join(pair[side] + "\n" for pair in pairs).encode("utf-8")
        path = folder / f"{name}.{lang}{suffix}"
        path.write_bytes(COMPRESS[suffix](data) if suffix else data)


def corpus(n: int, seed: int = 0) -> list[tuple[str, str]]:
    return list(zip(sentences(n, seed, "en"), sentences(n, seed, "de")))


def config_for(tmp_path, train, **data):
    return config_from_dict(
        {
            "experiment_dir": str(tmp_path / "exp"),
            "data": {"root": str(tmp_path / "corpus"), "train": train, "test": None, **data},
            "tokenizer": {"vocab_size": 300},
        }
    )


def quiet(_: str) -> None:
    pass


# ---- reading ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", list(COMPRESS))
def test_compressed_corpora_read_as_the_plain_files(tmp_path, suffix):
    pairs = corpus(300)
    write_pairs(tmp_path / "plain", "train", pairs)
    write_pairs(tmp_path / "packed", "train", pairs, suffix)
    # the split name stays "train": the compressed files are found beside it
    assert read_split(tmp_path / "packed", "train", "en", "de") == pairs
    assert read_split(tmp_path / "plain", "train", "en", "de") == pairs
    tsv = "".join(f"{s}\t{t}\n" for s, t in pairs).encode()
    (tmp_path / f"all.tsv{suffix}").write_bytes(COMPRESS[suffix](tsv))
    assert read_split(tmp_path, f"all.tsv{suffix}", "en", "de") == pairs


def test_a_truncated_gzip_file_is_an_error_naming_file_and_line(tmp_path):
    pairs = corpus(5000)
    write_pairs(tmp_path, "train", pairs, ".gz")
    packed = (tmp_path / "train.de.gz").read_bytes()
    (tmp_path / "train.de.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(CorpusError, match=r"cannot read .*train\.de\.gz past line [\d,]+: "):
        read_split(tmp_path, "train", "en", "de")


def test_streamed_files_of_different_lengths_say_which_line(tmp_path):
    pairs = corpus(10)
    write_pairs(tmp_path, "train", pairs, ".gz")
    extra = gzip.compress("".join(t + "\n" for _, t in pairs[:7]).encode())
    (tmp_path / "train.de.gz").write_bytes(extra)
    with pytest.raises(CorpusError, match=r"has 10 lines but .* has 7 \(line 8 has no partner\)"):
        read_split(tmp_path, "train", "en", "de")
    (tmp_path / "train.de.gz").write_bytes(gzip.compress(b"x\n" * 12))
    with pytest.raises(CorpusError, match=r"has 10 lines but .* has 12 \(line 11 has no partner\)"):
        read_split(tmp_path, "train", "en", "de")


def test_invalid_utf8_inside_a_compressed_file_names_the_line(tmp_path):
    data = b"good\nstill good\nbad \xff here\n"
    (tmp_path / "train.en.xz").write_bytes(lzma.compress(data))
    (tmp_path / "train.de.xz").write_bytes(lzma.compress(b"a\nb\nc\n"))
    with pytest.raises(CorpusError, match=r"train\.en\.xz, line 3: invalid UTF-8"):
        read_split(tmp_path, "train", "en", "de")


# ---- preparation ---------------------------------------------------------------------


def test_several_corpora_layouts_and_filters_are_counted(tmp_path):
    news = corpus(400, seed=1)
    web = corpus(300, seed=2)
    web += web[:50]  # 50 exact duplicates
    web += [("Same text 1", "Same text 1"), ("Same text 2", "Same text 2")]  # copies
    write_pairs(tmp_path / "corpus", "news", news, ".gz")
    (tmp_path / "corpus" / "web.tsv.zst").write_bytes(
        COMPRESS[".zst"]("".join(f"{s}\t{t}\n" for s, t in web).encode())
    )
    write_pairs(tmp_path / "corpus", "valid", corpus(20, seed=3))
    config = config_for(
        tmp_path,
        [{"path": "news"}, {"path": "web.tsv.zst", "name": "web"}],
        remove_duplicates=True,
        remove_copies=True,
    )
    manifest = prepare(config, log=quiet)
    train = manifest["splits"]["train"]
    assert train["read"] == 400 + 352
    assert train["skipped"] == {"duplicate pair": 50, "source equals target": 2}
    assert train["kept"] == 700 == len(load_split(config, "train"))
    assert [(c["name"], c["pairs"]) for c in train["corpora"]] == [
        ("news", [0, 400]),
        ("web", [400, 700]),
    ]
    # the arrays are the pairs, in order, encoded one by one
    tokenizer = Tokenizer.load(tmp_path / "exp" / "tokenizer")
    split = load_split(config, "train")
    expected = news + web[:300]
    for i in (0, 399, 400, 699):
        assert split.source(i).tolist() == tokenizer.encode_source([expected[i][0]])[0]
        assert split.target(i).tolist() == tokenizer.encode_target([expected[i][1]])[0]
    assert manifest["tokenizer_sample"]["sentences"] == 1400


def test_prepared_arrays_are_memory_mapped(tmp_path):
    write_pairs(tmp_path / "corpus", "train", corpus(200))
    write_pairs(tmp_path / "corpus", "valid", corpus(20, seed=1))
    config = config_for(tmp_path, "train")
    prepare(config, log=quiet)
    split = load_split(config, "train")
    for name in ARRAYS:
        assert isinstance(getattr(split, name), np.memmap)
        assert not getattr(split, name).flags.writeable
    assert len(split) == 200 and split.src_offsets[-1] == len(split.src)


def test_the_sentencepiece_sample_is_bounded_and_reported(tmp_path):
    write_pairs(tmp_path / "corpus", "train", corpus(2000))
    write_pairs(tmp_path / "corpus", "valid", corpus(20, seed=1))
    config = config_from_dict(
        {
            "experiment_dir": str(tmp_path / "exp"),
            "data": {"root": str(tmp_path / "corpus"), "test": None},
            "tokenizer": {"vocab_size": 300, "input_sentence_size": 500},
        }
    )
    messages: list[str] = []
    sample = prepare(config, log=messages.append)["tokenizer_sample"]
    assert sample == {**sample, "sentences": 4000, "input_sentence_size": 500, "sampled": 500}
    assert any("on 500 of the 4,000 training sentences" in m for m in messages)


def test_the_sentencepiece_sample_is_uniform_seeded_and_in_corpus_order():
    pairs = [(f"s{i}", f"t{i}") for i in range(1000)]
    sample = list(sample_sentences(pairs, (0, 1), 300))
    assert len(sample) == 300 and sample == list(sample_sentences(pairs, (0, 1), 300))
    # whole pairs, both sides, in corpus order
    assert sample[0::2] == [text.replace("t", "s") for text in sample[1::2]]
    assert sorted(sample[0::2], key=lambda text: int(text[1:])) == sample[0::2]
    assert list(sample_sentences(pairs, (1,), 0)) == [t for _, t in pairs]
    assert list(sample_sentences(pairs, (1,), 5000)) == [t for _, t in pairs]
    assert len(list(sample_sentences(pairs, (1,), 300))) == 300
    counts = np.zeros(1000)
    for seed in range(200):  # every pair equally likely: 200 draws of 30%
        for text in sample_sentences(pairs, (0,), 300, seed=seed):
            counts[int(text[1:])] += 1
    assert abs(counts.mean() - 60) < 1e-9 and counts.std() < 1.5 * np.sqrt(60 * 0.7)


def _arrays(exp) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((exp / "data").rglob("*")) if p.is_file()}


def test_a_failed_preparation_leaves_the_previous_data_intact(tmp_path):
    write_pairs(tmp_path / "corpus", "train", corpus(300), ".gz")
    write_pairs(tmp_path / "corpus", "valid", corpus(20, seed=1))
    config = config_for(tmp_path, "train")
    prepare(config, log=quiet)
    before = _arrays(tmp_path / "exp")
    tokenizer_before = Tokenizer.load(tmp_path / "exp" / "tokenizer").fingerprint()
    # the new corpus is truncated: it fails after the first chunks were written
    write_pairs(tmp_path / "corpus", "train", corpus(30000, seed=5), ".gz")
    packed = (tmp_path / "corpus" / "train.de.gz").read_bytes()
    (tmp_path / "corpus" / "train.de.gz").write_bytes(packed[: len(packed) * 3 // 4])
    with pytest.raises(CorpusError, match="past line"):
        prepare(config, log=quiet)
    assert _arrays(tmp_path / "exp") == before
    assert Tokenizer.load(tmp_path / "exp" / "tokenizer").fingerprint() == tokenizer_before
    assert [p.name for p in (tmp_path / "exp").iterdir() if p.name.startswith(".tmp-")] == []


def test_a_full_disk_fails_in_one_line_and_keeps_the_previous_data(tmp_path):
    """A write past the file-size limit fails as a write to a full disk does (an
    OSError), in a child process limited with RLIMIT_FSIZE."""
    write_pairs(tmp_path / "corpus", "train", corpus(300))
    write_pairs(tmp_path / "corpus", "valid", corpus(20, seed=1))
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        json.dumps(
            {
                "experiment_dir": str(tmp_path / "exp"),
                "data": {"root": str(tmp_path / "corpus"), "test": None},
                "tokenizer": {"vocab_size": 300},
            }
        )
    )
    rosetta = [sys.executable, "-m", "rosetta", "prepare", str(config_path)]
    subprocess.run(rosetta, check=True, capture_output=True)
    before = _arrays(tmp_path / "exp")
    write_pairs(tmp_path / "corpus", "train", corpus(20000, seed=7))

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    done = subprocess.run(rosetta, capture_output=True, text=True, preexec_fn=limit_file_size)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rosetta prepare: error:"), done.stderr
    assert "too large" in lines[0].lower()
    assert _arrays(tmp_path / "exp") == before
    assert [p.name for p in (tmp_path / "exp").iterdir() if p.name.startswith(".tmp-")] == []


def test_an_interrupted_preparation_restarts_cleanly(tmp_path, monkeypatch):
    from rosetta.data import prepare as module

    write_pairs(tmp_path / "corpus", "train", corpus(300))
    write_pairs(tmp_path / "corpus", "valid", corpus(20, seed=1))
    config = config_for(tmp_path, "train")
    # Ctrl-C while encoding: nothing of it stays
    original = module._encode

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "_encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(config, log=quiet)
    assert not (tmp_path / "exp" / "data").exists()
    assert [p.name for p in (tmp_path / "exp").iterdir() if p.name.startswith(".tmp-")] == []
    # a process killed outright leaves its staging folders: the next run removes them
    monkeypatch.setattr(module, "_encode", original)
    (tmp_path / "exp" / ".tmp-data.abcd1234").mkdir()
    (tmp_path / "exp" / ".tmp-data.abcd1234" / "src.npy").write_bytes(b"half")
    (tmp_path / "exp" / ".tmp-tokenizer.old.efgh5678").mkdir()  # may be a last copy: kept
    messages: list[str] = []
    prepare(config, log=messages.append)
    assert "removed 1 staging folder(s) an interrupted preparation left" in messages
    assert not (tmp_path / "exp" / ".tmp-data.abcd1234").exists()
    assert (tmp_path / "exp" / ".tmp-tokenizer.old.efgh5678").exists()
    assert len(load_split(config, "train")) == 300


def test_weights_are_not_part_of_the_data(tmp_path):
    write_pairs(tmp_path / "corpus", "a", corpus(100))
    write_pairs(tmp_path / "corpus", "b", corpus(100, seed=1))
    write_pairs(tmp_path / "corpus", "valid", corpus(20, seed=2))
    weighted = config_for(tmp_path, [{"path": "a", "weight": 1}, {"path": "b", "weight": 3}])
    prepare(weighted, log=quiet)
    assert corpus_mixture(weighted) == [(0, 100, 1.0), (100, 200, 3.0)]
    messages: list[str] = []
    reweighted = config_for(tmp_path, [{"path": "a", "weight": 2}, {"path": "b", "weight": 1}])
    prepare(reweighted, log=messages.append)
    assert "up to date" in messages[0]
    assert corpus_mixture(config_for(tmp_path, [{"path": "a"}, {"path": "b"}])) is None
    renamed = config_for(
        tmp_path, [{"path": "a", "weight": 1, "name": "x"}, {"path": "b", "weight": 1}]
    )
    with pytest.raises(PrepareError, match="was not prepared from the corpora"):
        corpus_mixture(renamed)


def test_corpus_lists_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="give every corpus a weight, or none"):
        config_for(tmp_path, [{"path": "a", "weight": 1}, {"path": "b"}])
    with pytest.raises(ConfigError, match="corpus names must differ"):
        config_for(tmp_path, [{"path": "x/a"}, {"path": "y/a"}])


@pytest.mark.skipif(not MULTI30K.exists(), reason=f"{MULTI30K} is absent (no ../shared here)")
def test_multi30k_arrays_are_those_of_the_former_pipeline(tmp_path):
    """The digest of the arrays the in-memory pipeline (commit 78020a0) made from
    Multi30k with configs/multi30k_en_de.yaml's settings."""
    config = config_from_dict(
        {
            "experiment_dir": str(tmp_path / "exp"),
            "data": {"root": str(MULTI30K), "valid": "val", "test": "test2016"},
            "tokenizer": {"vocab_size": 8000},
        }
    )
    prepare(config, log=quiet)
    digest = hashlib.sha256()
    for split in ("train", "valid", "test"):
        arrays = load_split(config, split)
        for name in ARRAYS:
            digest.update(np.ascontiguousarray(getattr(arrays, name)).tobytes())
    assert digest.hexdigest() == MULTI30K_ARRAYS


MULTI30K_ARRAYS = "4d6ee0008706487b33a9ce993446b508f26ff5d1358799d41c0167c8f9c494b0"


# ---- arrays on disk ------------------------------------------------------------------


def test_appended_npy_files_load_as_one_array(tmp_path):
    appender = NpyAppender(tmp_path / "x.npy", np.int32)
    parts = [np.arange(n, dtype=np.int32) for n in (0, 5, 100_000, 3)]
    for part in parts:
        appender.append(part)
    appender.close()
    assert np.array_equal(np.load(tmp_path / "x.npy"), np.concatenate(parts))
    assert np.array_equal(np.load(tmp_path / "x.npy", mmap_mode="r"), np.concatenate(parts))


def test_splits_prepared_as_npz_by_an_older_rosetta_still_load(tmp_path):
    split = TokenizedSplit.from_lists([[5, 6], [7]], [[8], [9, 10, 11]])
    np.savez(tmp_path / "train.npz", **{name: getattr(split, name) for name in ARRAYS})
    loaded = TokenizedSplit.load(tmp_path / "train")
    assert loaded.source(1).tolist() == [7] and loaded.target(1).tolist() == [9, 10, 11]
    split.save(tmp_path / "again")
    assert TokenizedSplit.load(tmp_path / "again").target(1).tolist() == [9, 10, 11]


# ---- batching ------------------------------------------------------------------------


def sequential_batches(src, tgt, max_tokens, seed, epoch, max_sentences, bucket):
    """The definition: walk the order pair by pair, cutting before the pair that
    would take the batch over its budget (the former loop)."""
    n = len(src)
    rng = np.random.default_rng([seed, epoch]) if seed is not None else None
    tie_break = rng.permutation(n) if rng is not None else np.arange(n)
    order = np.lexsort((tie_break, src, tgt)) if bucket else tie_break
    batches, start, max_src, max_tgt = [], 0, 0, 0
    for position, index in enumerate(order):
        new_src, new_tgt = max(max_src, int(src[index])), max(max_tgt, int(tgt[index]))
        size = position - start + 1
        full = max_sentences and size > max_sentences
        if size > 1 and (padded_size(new_src, new_tgt, size) > max_tokens or full):
            batches.append(order[start:position])
            start, new_src, new_tgt = position, int(src[index]), int(tgt[index])
        max_src, max_tgt = new_src, new_tgt
    if start < n:
        batches.append(order[start:])
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=400),
    max_tokens=st.integers(1, 3000),
    max_sentences=st.integers(0, 40),
    seed=st.one_of(st.none(), st.integers(0, 5)),
    bucket=st.booleans(),
)
def test_vectorised_batching_equals_the_pair_by_pair_definition(
    lengths, max_tokens, max_sentences, seed, bucket
):
    src = np.array([s for s, _ in lengths])
    tgt = np.array([t for _, t in lengths])
    got = make_batches(src, tgt, max_tokens, seed, 2, max_sentences, bucket)
    want = sequential_batches(src, tgt, max_tokens, seed, 2, max_sentences, bucket)
    assert [b.tolist() for b in got] == [b.tolist() for b in want]


def test_weighted_corpora_are_drawn_in_their_proportions():
    """Over an epoch, the share of the pairs each corpus gives is its weight's share
    within 0.5 percentage points (the epoch's last, incomplete update is dropped),
    a small corpus is repeated whole before any pair of it is seen a third time,
    and a large one gives each pair at most once."""
    sizes, weights = [200, 5000, 1800], [3.0, 1.0, 1.0]
    starts = np.cumsum([0, *sizes])
    corpora = [(int(starts[i]), int(starts[i + 1]), weights[i]) for i in range(3)]
    rng = np.random.default_rng(0)
    src = rng.integers(2, 40, starts[-1])
    split = TokenizedSplit.from_lists([[5] * n for n in src], [[6] * n for n in src])
    iterator = BatchIterator(split, 600, seed=4, corpora=corpora)
    for epoch in (0, 1):
        seen = np.concatenate([u.batches[0].indices.numpy() for u in iterator.updates(epoch)])
        corpus_of = np.searchsorted(starts, seen, side="right") - 1
        shares = np.bincount(corpus_of, minlength=3) / len(seen)
        assert np.allclose(shares, np.array(weights) / sum(weights), atol=0.005), shares
        counts = np.bincount(seen[corpus_of == 0] - starts[0], minlength=sizes[0])
        assert counts.max() - counts.min() <= 1  # 1,400 draws of 200 pairs: 7 each
        assert np.bincount(seen[corpus_of == 1]).max() == 1
    assert not np.array_equal(mix(corpora, 4, 0), mix(corpora, 4, 1))
    assert np.array_equal(mix(corpora, 4, 0), mix(corpora, 4, 0))


def test_training_reads_weighted_corpora(tmp_path):
    """``rosetta train`` prepares weighted corpora and trains on their mixture."""
    write_pairs(tmp_path / "corpus", "a", corpus(100))
    write_pairs(tmp_path / "corpus", "b", corpus(400, seed=1))
    write_pairs(tmp_path / "corpus", "valid", corpus(20, seed=2))
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        json.dumps(
            {
                "experiment_dir": str(tmp_path / "exp"),
                "data": {
                    "root": str(tmp_path / "corpus"),
                    "train": [{"path": "a", "weight": 1}, {"path": "b", "weight": 1}],
                    "test": None,
                },
                "tokenizer": {"vocab_size": 300},
                "model": {"preset": "toy", "d_model": 32, "d_ff": 64, "encoder_layers": 1,
                          "decoder_layers": 1},
                "train": {"max_steps": 2, "valid_bleu": False, "max_tokens": 400},
            }
        )
    )  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "rosetta", "train", str(config_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stopped after 2 steps" in done.stdout + done.stderr
