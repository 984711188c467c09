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
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rosetta.checkpointdir import holds_training
from rosetta.config import ExperimentConfig
from rosetta.data.corpus import ReadStats, read_split, split_paths
from rosetta.data.tokenizer import Tokenizer
from rosetta.data.toy import ToySplits, write_corpus
from rosetta.safeio import (
    atomic_write_bytes,
    atomic_write_text,
    one_writer,
    replace_directory,
    sha256_file,
)

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
        buffer = io.BytesIO()
        np.savez(buffer, **self.__dict__)
        atomic_write_bytes(path, buffer.getvalue())

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


class PrepareError(ValueError):
    """Preparation that would break an experiment's trained work, or data that can't be used."""


def _settings(config: ExperimentConfig) -> dict:
    """Every setting that changes the tokenizer or the id arrays (not where the files are).

    ``data.toy.sentences`` came later than the rest: at its default it is left out,
    so that experiments prepared before it existed stay up to date."""
    data = config.data.model_dump(mode="json", exclude={"root"})
    if data["toy"] is not None and tuple(data["toy"]["sentences"]) == (1, 1):
        del data["toy"]["sentences"]
    return {"data": data, "tokenizer": config.tokenizer.model_dump(mode="json")}


def _input_digests(config: ExperimentConfig, root: Path) -> dict[str, str]:
    """SHA-256 of each corpus file, by file name."""
    digests = {}
    for name in split_names(config).values():
        for path in split_paths(root, name, config.data.src_lang, config.data.tgt_lang):
            if path.exists():
                digests[path.name] = sha256_file(path)
    return digests


def _fingerprint(settings: dict, inputs: dict[str, str]) -> str:
    text = json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _differences(before: object, after: object, key: str = "") -> list[str]:
    """``key old -> new`` for each setting that differs, descending into sections."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for name in sorted(before.keys() | after.keys()):
            found += _differences(before.get(name), after.get(name), f"{key}{name}.")
        return found
    return [] if before == after else [f"{key.rstrip('.')} {before!r} -> {after!r}"]


def describe_changes(old: dict, settings: dict, inputs: dict[str, str] | None) -> str:
    """Says what differs between a manifest and the current settings and corpus files."""
    if "settings" not in old:
        return "the prepared data was made by an older rosetta"
    changes = _differences(old["settings"], settings)
    for name in sorted((old.get("inputs") or {}).keys() | (inputs or {}).keys()):
        if inputs is None:
            break
        was, now = old["inputs"].get(name), inputs.get(name)
        if was != now:
            what = "added" if was is None else "removed" if now is None else "changed"
            changes.append(f"{name} {what}")
    return ", ".join(changes) or "nothing"


def _holds_trained_work(exp: Path) -> bool:
    return holds_training(exp / "checkpoints") or (exp / "model").exists()


def _refuse(exp: Path, reason: str) -> PrepareError:
    return PrepareError(
        f"{exp} holds a trained model, bound to the tokenizer and data it was prepared with, "
        f"and {reason}. Nothing was changed; to train on the new data or settings, start a "
        "new experiment (e.g. --set experiment_dir=NEW_DIR)"
    )


def read_manifest(config: ExperimentConfig) -> dict | None:
    path = config.experiment_dir / "data" / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PrepareError(f"{path} is damaged: run `rosetta prepare --force`") from None


def _tokenizer_fingerprint(directory: Path) -> str | None:
    try:
        return Tokenizer.load(directory).fingerprint()
    except (FileNotFoundError, ValueError):
        return None


def binding(config: ExperimentConfig) -> dict[str, str]:
    """The fingerprints (data, tokenizer) a checkpoint of this experiment is bound to.

    Fails when the experiment is not prepared, or when its tokenizer is not the
    one its id arrays were made with.
    """
    manifest = read_manifest(config)
    exp = config.experiment_dir
    if manifest is None:
        raise FileNotFoundError(f"{exp / 'data'} is missing: run `rosetta prepare CONFIG` first")
    if "tokenizer" not in manifest:
        raise PrepareError(f"{exp / 'data'} was prepared by an older rosetta: run prepare again")
    if _tokenizer_fingerprint(exp / "tokenizer") != manifest["tokenizer"]:
        raise PrepareError(
            f"{exp / 'tokenizer'} is not the tokenizer {exp / 'data'} was made with "
            "(replaced or damaged): run `rosetta prepare --force` in a new experiment"
        )
    return {"data": manifest["fingerprint"], "tokenizer": manifest["tokenizer"]}


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

    The experiment is this process's alone meanwhile (``safeio.one_writer``).

    Length filters apply to the training split only: validation and test pairs
    are all kept so that scores are comparable with other systems.

    The tokenizer and id arrays are built in staging folders and swapped in
    only when everything succeeded, so a failure (say, an impossible
    ``vocab_size``) leaves the previous ones in place. An experiment that holds
    checkpoints or a model is never re-prepared with other data or settings:
    that is an error saying what changed.
    """
    with one_writer(config.experiment_dir, "rosetta prepare"):
        return _prepare(config, force, log)


def _prepare(config: ExperimentConfig, force: bool, log) -> dict:
    exp = config.experiment_dir
    data_dir = exp / "data"
    old = read_manifest(config)
    trained = _holds_trained_work(exp)
    settings = _settings(config)
    if trained and old is not None and old.get("settings") != settings:
        raise _refuse(exp, f"these settings differ: {describe_changes(old, settings, None)}")
    root = corpus_root(config)
    corpus_files = [
        path
        for name in split_names(config).values()
        for path in split_paths(root, name, config.data.src_lang, config.data.tgt_lang)
    ]
    if config.data.toy is not None and (
        old is None
        or old.get("settings") != settings
        or not all(path.exists() for path in corpus_files)
    ):
        _write_toy_corpus(config)  # deterministic: rewritten only when its settings change
    inputs = _input_digests(config, root)
    fingerprint = _fingerprint(settings, inputs)
    current = (
        old is not None
        and old.get("fingerprint") == fingerprint
        and old.get("tokenizer") == _tokenizer_fingerprint(exp / "tokenizer")
    )
    if current and not force:
        log(f"{data_dir} is up to date (inputs unchanged); nothing to do")
        return old
    if trained:
        if old is None:
            raise _refuse(exp, "its prepared data is missing")
        if current:
            raise _refuse(exp, "--force would retrain the tokenizer")
        changes = describe_changes(old, settings, inputs)
        raise _refuse(exp, f"the corpus or tokenizer differs ({changes})")

    pairs, stats = {}, {}
    for split, name in split_names(config).items():
        stats[split] = ReadStats()
        pairs[split] = read_split(
            root, name, config.data.src_lang, config.data.tgt_lang, stats[split]
        )
        if not pairs[split]:
            raise PrepareError(f"the {split} split ({root}/{name}) holds no usable pair")

    tok_cfg = config.tokenizer
    log(f"training {tok_cfg.type} SentencePiece ({tok_cfg.vocab_size} pieces) on the train split")
    # the manifest is swapped in last (data after tokenizer): it is the commit point
    with (
        replace_directory(data_dir) as data_stage,
        replace_directory(exp / "tokenizer") as tok_stage,
    ):
        tokenizer = Tokenizer.train(
            pairs["train"],
            tok_stage,
            vocab_size=tok_cfg.vocab_size,
            joint=tok_cfg.joint,
            model_type=tok_cfg.type,
            character_coverage=tok_cfg.character_coverage,
            byte_fallback=tok_cfg.byte_fallback,
            input_sentence_size=tok_cfg.input_sentence_size,
        )
        manifest = {
            "fingerprint": fingerprint,
            "tokenizer": tokenizer.fingerprint(),
            "root": str(root),
            "settings": settings,
            "inputs": inputs,
            "splits": {},
        }
        for split, split_pairs in pairs.items():
            src = tokenizer.encode_source([s for s, _ in split_pairs])
            tgt = tokenizer.encode_target([t for _, t in split_pairs])
            if split == "train":
                src, tgt = _filter_by_length(
                    src, tgt, config.data.max_len, config.data.max_ratio, stats[split]
                )
            arrays = TokenizedSplit.from_lists(src, tgt)
            arrays.save(data_stage / f"{split}.npz")
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
        atomic_write_text(data_stage / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def _write_toy_corpus(config: ExperimentConfig) -> None:
    toy = config.data.toy
    assert toy is not None
    sizes = ToySplits(train=toy.train_size, valid=toy.valid_size, test=toy.test_size)
    write_corpus(
        config.experiment_dir / "corpus",
        toy.seed,
        sizes,
        config.data.src_lang,
        config.data.tgt_lang,
        toy.sentences,
    )


def load_split(config: ExperimentConfig, split: str) -> TokenizedSplit:
    """Loads a prepared split; a clear error if ``rosetta prepare`` has not run."""
    path = config.experiment_dir / "data" / f"{split}.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `rosetta prepare CONFIG` first")
    return TokenizedSplit.load(path)
