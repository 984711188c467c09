"""``rosetta prepare``: corpus → SentencePiece → id arrays on disk, streaming.

The experiment directory after preparation::

    EXP/corpus/            the generated toy corpus (only with ``data.toy``)
    EXP/tokenizer/         spm.model + spm.vocab (or spm.src.* and spm.tgt.*)
    EXP/data/train/        source and target ids, flat, with offsets (``data.arrays``)
    EXP/data/valid/        (and test/ when the corpus has a test split)
    EXP/data/manifest.json what was read, kept and skipped, and a fingerprint

Preparation streams, so a corpus of any size is prepared in memory that does
not grow with it (a chunk of pairs, plus 8 bytes a training pair while
duplicates are looked for):

1. *read*: each split's corpora are read (compressed or not), cleaned and
   filtered (an empty side; for training, with ``data.remove_copies`` and
   ``data.remove_duplicates``, pairs whose sides are equal and pairs seen
   before), and the cleaned text is written to the staging folder;
2. *tokenizer*: SentencePiece trains on the cleaned training text, or on a
   uniform random sample of ``tokenizer.input_sentence_size`` sentences of it
   when that is set (seeded: the same corpus gives the same sample; the
   manifest says how many it saw);
3. *encode*: the cleaned text is encoded a chunk at a time by SentencePiece's
   own threads (every core), the length filters apply to the ids, and the
   arrays are appended to their files.

Everything is built in staging folders swapped in only when all of it
succeeded: an error, a full disk or Ctrl-C leaves the previous tokenizer and
arrays as they were, and the next run starts over (removing what an
interrupted one left). The fingerprint hashes the input files and every
setting that changes the arrays, so re-running ``prepare`` is a no-op unless
something changed, and training never re-tokenises.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rosetta.checkpointdir import holds_training
from rosetta.config import ExperimentConfig, TokenizerConfig
from rosetta.data.arrays import SplitWriter, TokenizedSplit
from rosetta.data.corpus import ReadStats, iter_split, split_paths
from rosetta.data.tokenizer import Tokenizer
from rosetta.data.toy import ToySplits, write_corpus
from rosetta.safeio import (
    atomic_write_text,
    one_writer,
    remove_stale_staging,
    replace_directory,
    sha256_file,
)

MANIFEST = "manifest.json"
CHUNK = 50_000  # pairs read, filtered or encoded at a time


def corpus_root(config: ExperimentConfig) -> Path:
    """The folder the corpus is read from: ``data.root`` or the generated toy corpus."""
    if config.data.toy is not None:
        return config.experiment_dir / "corpus"
    assert config.data.root is not None
    return config.data.root


def split_sources(config: ExperimentConfig) -> dict[str, list[str]]:
    """Maps rosetta's split names (train/valid/test) to the corpora they are read
    from (file prefixes or TSVs): training may have several, the others one."""
    sources = {"train": [corpus.path for corpus in config.data.corpora]}
    sources["valid"] = [config.data.valid]
    if config.data.test:
        sources["test"] = [config.data.test]
    return sources


class PrepareError(ValueError):
    """Preparation that would break an experiment's trained work, or data that can't be used."""


# settings that came after experiments were prepared without them: at these
# defaults they are left out of the fingerprint, so those experiments stay up to date
_ADDED_LATER: dict[tuple[str, ...], object] = {
    ("data", "toy", "sentences"): [1, 1],
    ("data", "toy", "referent"): False,
    ("data", "toy", "referent_style"): False,
    ("data", "remove_duplicates"): False,
    ("data", "remove_copies"): False,
}


def _settings(config: ExperimentConfig) -> dict:
    """Every setting that changes the tokenizer or the id arrays (not where the files
    are, and not the corpora's weights: those are read when training)."""
    settings = {
        "data": config.data.model_dump(mode="json", exclude={"root"}),
        "tokenizer": config.tokenizer.model_dump(mode="json"),
    }
    if config.init is not None:  # the tokenizer is the model's: its settings do not apply
        settings["tokenizer"] = {"init": _tokenizer_fingerprint(Path(config.init))}
    if isinstance(settings["data"]["train"], list):
        for corpus in settings["data"]["train"]:
            del corpus["weight"]
    for path, default in _ADDED_LATER.items():
        *parents, key = path
        section = settings
        for parent in parents:
            section = section.get(parent) or {}
        if key in section and section[key] == default:
            del section[key]
    return settings


def _corpus_files(config: ExperimentConfig, root: Path) -> dict[str, list[Path]]:
    """The files each split is read from, by split."""
    data = config.data
    return {
        split: [
            path for name in names for path in split_paths(root, name, data.src_lang, data.tgt_lang)
        ]
        for split, names in split_sources(config).items()
    }


def _input_digests(config: ExperimentConfig, root: Path) -> dict[str, str]:
    """SHA-256 of each corpus file, by its path under ``root`` (or absolute)."""
    digests = {}
    for paths in _corpus_files(config, root).values():
        for path in paths:
            if path.exists():
                key = path.relative_to(root) if path.is_relative_to(root) else path
                digests[str(key)] = sha256_file(path)
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
    corpus_files = [path for paths in _corpus_files(config, root).values() for path in paths]
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

    removed = remove_stale_staging(data_dir) + remove_stale_staging(exp / "tokenizer")
    if removed:
        log(f"removed {removed} staging folder(s) an interrupted preparation left")
    # the manifest is swapped in last (data after tokenizer): it is the commit point
    with (
        replace_directory(data_dir) as data_stage,
        replace_directory(exp / "tokenizer") as tok_stage,
    ):
        text, stats, corpora = _read(config, root, data_stage, log)

        start = time.monotonic()
        if config.init is not None:
            tokenizer, sample = _copy_tokenizer(Path(config.init), tok_stage, log), None
        else:
            tokenizer, sample = _train_tokenizer(config.tokenizer, text["train"], tok_stage, log)
            sample["seconds"] = round(time.monotonic() - start, 1)
        manifest = {
            "fingerprint": fingerprint,
            "tokenizer": tokenizer.fingerprint(),
            "root": str(root),
            "settings": settings,
            "inputs": inputs,
            "tokenizer_sample": sample,
            "splits": {},
        }
        for split in split_sources(config):
            # length filters apply to training only: validation and test pairs are all
            # kept, so that scores are comparable with other systems
            limits = (config.data.max_len, config.data.max_ratio) if split == "train" else None
            writer, kept = _encode(text[split], tokenizer, limits, data_stage / split, stats[split])
            text[split].remove()
            summary = {
                "read": stats[split].read,
                "kept": stats[split].kept,
                "skipped": stats[split].skipped,
                "src_tokens": writer.tokens["src"],
                "tgt_tokens": writer.tokens["tgt"],
            }
            if split == "train":
                summary["corpora"] = _corpus_ranges(config, corpora, kept)
            manifest["splits"][split] = summary
            log(f"{split:>5}: {stats[split].summary()}")
        manifest["src_vocab_size"] = tokenizer.src_vocab_size
        manifest["tgt_vocab_size"] = tokenizer.tgt_vocab_size
        manifest["joint_vocab"] = tokenizer.joint
        atomic_write_text(data_stage / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def _read(
    config: ExperimentConfig, root: Path, stage: Path, log: Callable
) -> tuple[dict[str, _CleanText], dict[str, ReadStats], list[dict]]:
    """Step 1: every split's corpora read, cleaned and filtered into ``stage``.
    Returns the cleaned text by split, the counts by split, and where each
    training corpus' pairs are in the cleaned text."""
    src_lang, tgt_lang = config.data.src_lang, config.data.tgt_lang
    text, stats, corpora = {}, {}, []
    for split, names in split_sources(config).items():
        text[split], stats[split] = _CleanText(stage / f".{split}"), ReadStats()
        training = split == "train"
        duplicates = _Duplicates() if training and config.data.remove_duplicates else None
        for name in names:
            corpus_stats = ReadStats()
            pairs = iter_split(root, name, src_lang, tgt_lang, corpus_stats)
            if training:
                pairs = _filtered(pairs, config.data.remove_copies, duplicates, corpus_stats)
            first = text[split].pairs
            text[split].write(pairs, desc=f"reading {split}", log=log)
            if training:
                corpora.append({"read": corpus_stats.read, "pairs": [first, text[split].pairs]})
            stats[split].add(corpus_stats)
        if not text[split].pairs:
            where = ", ".join(str(root / name) for name in names)
            raise PrepareError(f"the {split} split ({where}) holds no usable pair")
    return text, stats, corpora


def _train_tokenizer(
    tok_cfg: TokenizerConfig, text: _CleanText, stage: Path, log: Callable
) -> tuple[Tokenizer, dict]:
    """Step 2: SentencePiece on the cleaned training text, or a sample of it."""
    sides = 2 if tok_cfg.joint else 1  # a joint model samples pairs, both sides
    offered, size = text.pairs * sides, tok_cfg.input_sentence_size
    sample = size // sides * sides if 0 < size < offered else offered
    log(
        f"training {tok_cfg.type} SentencePiece ({tok_cfg.vocab_size} pieces) on "
        f"{sample:,} of the {offered:,} training sentences"
        + ("" if tok_cfg.joint else " of each side")
    )
    tokenizer = Tokenizer.train(
        text,
        stage,
        vocab_size=tok_cfg.vocab_size,
        joint=tok_cfg.joint,
        model_type=tok_cfg.type,
        character_coverage=tok_cfg.character_coverage,
        byte_fallback=tok_cfg.byte_fallback,
        input_sentence_size=size,
    )
    return tokenizer, {"sentences": offered, "input_sentence_size": size, "sampled": sample}


def _copy_tokenizer(model_dir: Path, stage: Path, log: Callable) -> Tokenizer:
    """Step 2 when fine-tuning: the tokenizer of the model the experiment starts from."""
    try:
        source = Tokenizer.load(model_dir)
    except (FileNotFoundError, ValueError) as error:
        raise PrepareError(f"init: {error}") from None
    for name in source.files():
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, stage / name)
    log(f"the tokenizer is {model_dir}'s (init): the corpus is encoded with its vocabulary")
    return Tokenizer.load(stage)


class _Duplicates:
    """Finds training pairs seen before, exactly (after cleaning), in 8 bytes a pair.

    A pair is known by a 64-bit BLAKE2b digest of its two sides; the digests
    seen so far are one sorted array that each chunk is looked up in and merged
    into. Two different pairs share a digest with probability about
    n² / 2⁶⁵ (at 10M pairs: 3e-6), the one way a pair could be dropped wrongly.
    """

    def __init__(self) -> None:
        self.seen = np.empty(0, dtype=np.uint64)

    def fresh(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """A mask of the pairs seen neither in earlier chunks nor earlier in this one."""
        digests = np.frombuffer(
            b"".join(
                hashlib.blake2b(f"{src}\t{tgt}".encode(), digest_size=8).digest()
                for src, tgt in pairs
            ),
            dtype=np.uint64,
        )
        _, first = np.unique(digests, return_index=True)
        fresh = np.zeros(len(pairs), dtype=bool)
        fresh[first] = True
        if len(self.seen):
            found = self.seen[np.minimum(np.searchsorted(self.seen, digests), len(self.seen) - 1)]
            fresh &= found != digests
        # two sorted runs: the stable sort (timsort) merges them in linear time
        self.seen = np.sort(np.concatenate([self.seen, np.sort(digests[fresh])]), kind="stable")
        return fresh


def _chunks(items: Iterable, size: int = CHUNK) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _filtered(
    pairs: Iterable[tuple[str, str]],
    remove_copies: bool,
    duplicates: _Duplicates | None,
    stats: ReadStats,
) -> Iterator[tuple[str, str]]:
    """The training filters on cleaned text, copies then duplicates, counted in ``stats``."""
    for chunk in _chunks(pairs):
        if remove_copies:
            kept = [(src, tgt) for src, tgt in chunk if src != tgt]
            stats.drop("source equals target", len(chunk) - len(kept))
            chunk = kept
        if duplicates is not None and chunk:
            fresh = duplicates.fresh(chunk)
            stats.drop("duplicate pair", len(chunk) - int(fresh.sum()))
            chunk = [pair for pair, keep in zip(chunk, fresh) if keep]
        yield from chunk


class _CleanText:
    """A split's cleaned pairs as two text files in the staging folder: written
    once, then read (re-iterably, as pairs) by SentencePiece and the encoder."""

    def __init__(self, prefix: Path) -> None:
        self.paths = (prefix.with_suffix(".src"), prefix.with_suffix(".tgt"))
        self.pairs = 0

    def write(self, pairs: Iterable[tuple[str, str]], desc: str, log: Callable) -> None:
        """Appends ``pairs``, with a progress bar; large inputs log their rate."""
        start, before = time.monotonic(), self.pairs
        with (
            open(self.paths[0], "a", encoding="utf-8", newline="\n") as src_file,
            open(self.paths[1], "a", encoding="utf-8", newline="\n") as tgt_file,
            tqdm(desc=desc, unit=" pairs", unit_scale=True, disable=None) as bar,
        ):
            for chunk in _chunks(pairs):
                src_file.write("".join(src + "\n" for src, _ in chunk))
                tgt_file.write("".join(tgt + "\n" for _, tgt in chunk))
                self.pairs += len(chunk)
                bar.update(len(chunk))
        count, seconds = self.pairs - before, time.monotonic() - start
        if count >= CHUNK:
            log(f"{desc}: {count:,} pairs kept in {seconds:.0f} s ({count / seconds:,.0f}/s)")

    def __len__(self) -> int:
        return self.pairs

    def __iter__(self) -> Iterator[tuple[str, str]]:
        with (
            open(self.paths[0], encoding="utf-8", newline="\n") as src_file,
            open(self.paths[1], encoding="utf-8", newline="\n") as tgt_file,
        ):
            for src, tgt in zip(src_file, tgt_file):
                yield src[:-1], tgt[:-1]

    def remove(self) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)


def _flat(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Piece ids of a chunk of sentences as one flat array and the lengths."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def _within(src_lengths: np.ndarray, tgt_lengths: np.ndarray, limits, stats: ReadStats):
    """The mask of pairs within ``limits`` (max length, max ratio), the rest counted."""
    max_len, max_ratio = limits
    longest = np.maximum(src_lengths, tgt_lengths)
    shortest = np.maximum(1, np.minimum(src_lengths, tgt_lengths))
    too_long = longest > max_len
    skewed = ~too_long & (longest > max_ratio * shortest)
    stats.drop(f"longer than {max_len} subwords", int(too_long.sum()))
    stats.drop(f"length ratio above {max_ratio:g}", int(skewed.sum()))
    return ~(too_long | skewed)


def _encode(
    text: _CleanText,
    tokenizer: Tokenizer,
    limits: tuple[int, float] | None,
    destination: Path,
    stats: ReadStats,
) -> tuple[SplitWriter, np.ndarray]:
    """Encodes a split's cleaned text chunk by chunk, on every core, into its array
    folder; with ``limits`` (max length, max ratio) drops the pairs beyond them.
    Returns the writer (its counts) and the mask of the pairs kept."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    masks = []
    with (
        SplitWriter(destination) as writer,
        tqdm(
            total=text.pairs, desc="encoding", unit=" pairs", unit_scale=True, disable=None
        ) as bar,
    ):
        for chunk in _chunks(text):
            src, src_lengths = _flat(tokenizer.encode_source([s for s, _ in chunk], threads))
            tgt, tgt_lengths = _flat(tokenizer.encode_target([t for _, t in chunk], threads))
            keep = np.ones(len(chunk), dtype=bool)
            if limits is not None:
                keep = _within(src_lengths, tgt_lengths, limits, stats)
                src = src[np.repeat(keep, src_lengths)]
                tgt = tgt[np.repeat(keep, tgt_lengths)]
            writer.add_flat(src, src_lengths[keep], tgt, tgt_lengths[keep])
            masks.append(keep)
            bar.update(len(chunk))
    return writer, np.concatenate(masks) if masks else np.zeros(0, dtype=bool)


def _corpus_ranges(config: ExperimentConfig, corpora: list[dict], kept: np.ndarray) -> list[dict]:
    """Each training corpus' pairs in the arrays (``[first, end)``) and counts."""
    before = np.concatenate([[0], np.cumsum(kept)])
    ranges = []
    for corpus, entry in zip(config.data.corpora, corpora):
        first, end = (int(before[i]) for i in entry["pairs"])
        ranges.append(
            {"name": corpus.label, "path": corpus.path, "read": entry["read"],
             "kept": end - first, "pairs": [first, end]}
        )  # fmt: skip
    return ranges


def corpus_mixture(config: ExperimentConfig) -> list[tuple[int, int, float]] | None:
    """The training corpora as (first pair, end, weight) when ``data.train`` weights
    them (what ``BatchIterator`` samples each epoch by), else None: the union."""
    if not any(corpus.weight for corpus in config.data.corpora):
        return None
    manifest = read_manifest(config) or {}
    ranges = manifest.get("splits", {}).get("train", {}).get("corpora")
    labels = [corpus.label for corpus in config.data.corpora]
    if ranges is None or [entry["name"] for entry in ranges] != labels:
        raise PrepareError(
            f"{config.experiment_dir / 'data'} was not prepared from the corpora "
            f"{labels}: run `rosetta prepare CONFIG`"
        )
    weights = [corpus.weight for corpus in config.data.corpora]
    return [(e["pairs"][0], e["pairs"][1], w) for e, w in zip(ranges, weights)]


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
        toy.referent,
        toy.referent_style,
    )


def load_split(config: ExperimentConfig, split: str) -> TokenizedSplit:
    """Maps a prepared split (``data.arrays``); a clear error if ``rosetta prepare``
    has not run."""
    path = config.experiment_dir / "data" / split
    if not path.is_dir() and not path.with_suffix(".npz").exists():
        raise FileNotFoundError(f"{path} is missing: run `rosetta prepare CONFIG` first")
    return TokenizedSplit.load(path)
