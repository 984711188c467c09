"""`rosetta prepare`: tokenise once, cache, and redo only when inputs change."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import MULTI30K, toy_config
from rosetta.config import config_from_dict
from rosetta.data.batching import BatchIterator
from rosetta.data.prepare import load_split, prepare
from rosetta.data.tokenizer import EOS_ID, Tokenizer


def test_prepare_toy_task_and_rerun_is_a_no_op(tmp_path):
    config = toy_config(tmp_path / "exp")
    messages: list[str] = []
    manifest = prepare(config, log=messages.append)
    assert manifest["splits"]["train"]["kept"] == 3000
    assert manifest["joint_vocab"] and manifest["src_vocab_size"] <= 300
    train = load_split(config, "train")
    assert len(train) == 3000 and train.src.dtype == np.int32
    assert train.src.min() > EOS_ID  # no special token inside the cached sequences
    tokenizer = Tokenizer.load(tmp_path / "exp" / "tokenizer")
    first_source = (tmp_path / "exp" / "corpus" / "train.en").read_text().splitlines()[0]
    assert tokenizer.encode_source([first_source])[0] == train.source(0).tolist()

    cached = (tmp_path / "exp" / "data" / "train" / "src.npy").stat().st_mtime_ns
    messages.clear()
    prepare(config, log=messages.append)
    assert messages == [
        f"{tmp_path / 'exp' / 'data'} is up to date (inputs unchanged); nothing to do"
    ]
    assert (tmp_path / "exp" / "data" / "train" / "src.npy").stat().st_mtime_ns == cached

    changed = toy_config(tmp_path / "exp", tokenizer={"vocab_size": 280})
    messages.clear()
    prepare(changed, log=messages.append)
    assert "up to date" not in " ".join(messages)


def test_length_filters_count_what_they_drop(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pairs = [("a short one", "ein kurzer")] * 50 + [("word " * 60, "Wort " * 60)] * 3
    pairs += [("x", "eine lange Antwort")] * 2
    pairs += [("", "leer")]
    for split in ("train", "valid"):
        (corpus / f"{split}.en").write_text("".join(s + "\n" for s, _ in pairs))
        (corpus / f"{split}.de").write_text("".join(t + "\n" for _, t in pairs))
    config = config_from_dict(
        {
            "experiment_dir": str(tmp_path / "exp"),
            "data": {"root": str(corpus), "test": None, "max_len": 40, "max_ratio": 3.0},
            "tokenizer": {"vocab_size": 300},
        }
    )
    manifest = prepare(config, log=lambda _: None)
    train = manifest["splits"]["train"]
    assert train["read"] == 56 and train["kept"] == 50
    assert train["skipped"] == {
        "empty side": 1,
        "longer than 40 subwords": 3,
        "length ratio above 3": 2,
    }
    assert manifest["splits"]["valid"]["kept"] == 55  # only empty lines leave valid


@pytest.mark.skipif(not MULTI30K.exists(), reason=f"{MULTI30K} is absent (no ../shared here)")
def test_prepare_a_multi30k_slice(tmp_path):
    corpus = tmp_path / "m30k"
    corpus.mkdir()
    for split, lines in (("train", 1000), ("val", 100), ("test2016", 100)):
        for lang in ("en", "de"):
            text = (MULTI30K / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()
            (corpus / f"{split}.{lang}").write_text("\n".join(text[:lines]) + "\n")
    config = config_from_dict(
        {
            "experiment_dir": str(tmp_path / "exp"),
            "data": {"root": str(corpus), "valid": "val", "test": "test2016"},
            "tokenizer": {"vocab_size": 1000},
        }
    )
    manifest = prepare(config, log=lambda _: None)
    assert manifest["splits"]["train"]["read"] == 1000
    assert manifest["splits"]["train"]["kept"] >= 990
    assert json.loads((tmp_path / "exp" / "data" / "manifest.json").read_text()) == manifest
    tokenizer = Tokenizer.load(tmp_path / "exp" / "tokenizer")
    german = (corpus / "val.de").read_text(encoding="utf-8").splitlines()
    assert [tokenizer.decode_target(ids) for ids in tokenizer.encode_target(german)] == german


@pytest.mark.skipif(not MULTI30K.exists(), reason=f"{MULTI30K} is absent (no ../shared here)")
def test_padding_on_the_full_multi30k_training_set_is_below_ten_percent(tmp_path):
    config = config_from_dict(
        {
            "experiment_dir": str(tmp_path / "exp"),
            "data": {"root": str(MULTI30K), "valid": "val", "test": "test2016"},
            "tokenizer": {"vocab_size": 8000},
        }
    )
    prepare(config, log=lambda _: None)
    batches = BatchIterator(load_split(config, "train"), 4096, seed=1)
    assert batches.padding_fraction() < 0.10
