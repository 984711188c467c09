"""``rosetta prepare``: corpus → SentencePiece → id arrays cached on disk.

The experiment directory after preparation::

    EXP/corpus/            the generated toy corpus (only with ``data.toy``)
    EXP/tokenizer/         spm.model + spm.vocab (or spm.src.* and spm.tgt.*)
    EXP/data/train.npz     source and target ids, flattened, with offsets
    EXP/data/valid.npz     (and test.npz when the corpus has a test split)
    EXP/data/manifest.json what was read, kept and skipped, and a fingerprint

The fingerprint hashes the input files and every setting that changes the
arrays, so re-running ``prepare`` is a no-op unless something changed, and
training never re-tokenises.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rosetta.config import ExperimentConfig
from rosetta.data.corpus import ReadStats, read_split, split_paths
from rosetta.data.tokenizer import Tokenizer

MANIFEST = "manifest.json"


@dataclass
class TokenizedSplit:
    """Id sequences of one split, stored flat: pair ``i`` is ``src[src_off[i]:src_off[i+1]]``."""

    src: np.ndarray
    src_offsets: np.ndarray
    tgt: np.ndarray
    tgt_offsets: np.ndarray

    @classmethod
    def from_lists(cls, src: list[list[int]], tgt: list[list[int]]) -> TokenizedSplit:
        def flatten(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
            offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
            np.cumsum([len(s) for s in seqs], out=offsets[1:])
            flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=offsets[-1])
            return flat, offsets

        return cls(*flatten(src), *flatten(tgt))

    def __len__(self) -> int:
        return len(self.src_offsets) - 1

    @property
    def src_lengths(self) -> np.ndarray:
        return np.diff(self.src_offsets)

    @property
    def tgt_lengths(self) -> np.ndarray:
        return np.diff(self.tgt_offsets)

    def source(self, i: int) -> np.ndarray:
        return self.src[self.src_offsets[i] : self.src_offsets[i + 1]]

    def target(self, i: int) -> np.ndarray:
        return self.tgt[self.tgt_offsets[i] : self.tgt_offsets[i + 1]]

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **self.__dict__)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> TokenizedSplit:
        with np.load(path) as arrays:
            return cls(**{name: arrays[name] for name in arrays.files})


def corpus_root(config: ExperimentConfig) -> Path:
    """The folder the corpus is read from: ``data.root`` or the generated toy corpus."""
    if config.data.toy is not None:
        return config.experiment_dir / "corpus"
    assert config.data.root is not None
    return config.data.root


def split_names(config: ExperimentConfig) -> dict[str, str]:
    """Maps rosetta's split names (train/valid/test) to the corpus' file prefixes."""
    names = {"train": config.data.train, "valid": config.data.valid}
    if config.data.test:
        names["test"] = config.data.test
    return names


def _fingerprint(config: ExperimentConfig, root: Path) -> str:
    digest = hashlib.sha256()
    settings = {
        "data": config.data.model_dump(mode="json", exclude={"root"}),
        "tokenizer": config.tokenizer.model_dump(mode="json"),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name in split_names(config).values():
        for path in split_paths(root, name, config.data.src_lang, config.data.tgt_lang):
            if path.exists():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _filter_by_length(
    src: list[list[int]], tgt: list[list[int]], max_len: int, max_ratio: float, stats: ReadStats
) -> tuple[list[list[int]], list[list[int]]]:
    kept_src, kept_tgt = [], []
    for s, t in zip(src, tgt):
        if max(len(s), len(t)) > max_len:
            stats.skip(f"longer than {max_len} subwords")
        elif max(len(s), len(t)) > max_ratio * max(1, min(len(s), len(t))):
            stats.skip(f"length ratio above {max_ratio:g}")
        else:
            kept_src.append(s)
            kept_tgt.append(t)
    stats.kept = len(kept_src)
    return kept_src, kept_tgt


def prepare(config: ExperimentConfig, force: bool = False, log=print) -> dict:
    """Reads, tokenises and caches every split; returns the manifest.

    Length filters apply to the training split only: validation and test pairs
    are all kept so that scores are comparable with other systems.
    """
    exp = config.experiment_dir
    data_dir = exp / "data"
    if config.data.toy is not None:
        _write_toy_corpus(config)
    root = corpus_root(config)
    fingerprint = _fingerprint(config, root)
    manifest_path = data_dir / MANIFEST
    if not force and manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fingerprint:
            log(f"{data_dir} is up to date (inputs unchanged); nothing to do")
            return manifest

    pairs, stats = {}, {}
    for split, name in split_names(config).items():
        stats[split] = ReadStats()
        pairs[split] = read_split(
            root, name, config.data.src_lang, config.data.tgt_lang, stats[split]
        )
        if not pairs[split]:
            raise ValueError(f"the {split} split ({root}/{name}) holds no usable pair")

    tok_cfg = config.tokenizer
    log(f"training {tok_cfg.type} SentencePiece ({tok_cfg.vocab_size} pieces) on the train split")
    tokenizer_dir = exp / "tokenizer"
    if tokenizer_dir.exists():
        shutil.rmtree(tokenizer_dir)
    tokenizer = Tokenizer.train(
        pairs["train"],
        tokenizer_dir,
        vocab_size=tok_cfg.vocab_size,
        joint=tok_cfg.joint,
        model_type=tok_cfg.type,
        character_coverage=tok_cfg.character_coverage,
        byte_fallback=tok_cfg.byte_fallback,
        input_sentence_size=tok_cfg.input_sentence_size,
    )

    data_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"fingerprint": fingerprint, "root": str(root), "splits": {}}
    for split, split_pairs in pairs.items():
        src = tokenizer.encode_source([s for s, _ in split_pairs])
        tgt = tokenizer.encode_target([t for _, t in split_pairs])
        if split == "train":
            src, tgt = _filter_by_length(
                src, tgt, config.data.max_len, config.data.max_ratio, stats[split]
            )
        arrays = TokenizedSplit.from_lists(src, tgt)
        arrays.save(data_dir / f"{split}.npz")
        manifest["splits"][split] = {
            "read": stats[split].read,
            "kept": stats[split].kept,
            "skipped": stats[split].skipped,
            "src_tokens": int(arrays.src_lengths.sum()),
            "tgt_tokens": int(arrays.tgt_lengths.sum()),
        }
        log(f"{split:>5}: {stats[split].summary()}")
    manifest["src_vocab_size"] = tokenizer.src_vocab_size
    manifest["tgt_vocab_size"] = tokenizer.tgt_vocab_size
    manifest["joint_vocab"] = tokenizer.joint
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)
    return manifest


def _write_toy_corpus(config: ExperimentConfig) -> None:
    from rosetta.data.toy import ToySplits, write_corpus

    toy = config.data.toy
    assert toy is not None
    sizes = ToySplits(train=toy.train_size, valid=toy.valid_size, test=toy.test_size)
    write_corpus(
        config.experiment_dir / "corpus",
        toy.seed,
        sizes,
        config.data.src_lang,
        config.data.tgt_lang,
    )


def load_split(config: ExperimentConfig, split: str) -> TokenizedSplit:
    """Loads a prepared split; a clear error if ``rosetta prepare`` has not run."""
    path = config.experiment_dir / "data" / f"{split}.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `rosetta prepare CONFIG` first")
    return TokenizedSplit.load(path)
