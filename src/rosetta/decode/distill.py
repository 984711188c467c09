"""Sequence-level knowledge distillation (Kim & Rush 2016): a teacher's translations
of the training sources, as the training set of a student (the standard recipe of
non-autoregressive models, whose single pass cannot choose between the several
good translations of a sentence a real corpus holds, but learns a teacher's one).

``distill`` writes a corpus folder a configuration can name as ``data.root``::

    DEST/train.SRC  DEST/train.TGT    the training sources, the teacher's translations
    DEST/valid.*    DEST/test.*       copied unchanged: students are judged on real references
    DEST/distill.json                 the teacher, its search, the count and the time

The teacher's translations go to ``train.TGT.partial`` a chunk at a time, each
chunk flushed to disk; a run that stops (Ctrl-C, a crash) resumes after the last
complete line, and the file takes its final name only once every sentence is in.
A partial file made by another teacher or search, or from other training sources
(the manifest holds their SHA-256, not only the corpus path), is never continued;
one process at a time writes a destination.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rosetta.config import ExperimentConfig
from rosetta.data.corpus import read_split
from rosetta.data.prepare import corpus_root, split_sources
from rosetta.decode.translator import Translator
from rosetta.safeio import atomic_write_text, one_writer, sha256_bytes, sha256_file

MANIFEST = "distill.json"


class DistillError(ValueError):
    """A distillation that cannot go on without losing or mixing work."""


def _complete_lines(path: Path) -> int:
    """Lines of ``path`` that end in a newline; a torn last line is cut off."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with path.open("r+b") as handle:
            handle.truncate(keep)
    return data[:keep].count(b"\n")


def distill(
    teacher: Translator,
    teacher_dir: Path,
    config: ExperimentConfig,
    dest: Path,
    chunk: int = 1000,
    log: Callable[[str], None] = print,
) -> Path:
    """Translates the training sources of ``config``'s corpus with ``teacher`` into
    the corpus folder ``dest`` (see the module's docstring); returns ``dest``."""
    src_lang, tgt_lang = config.data.src_lang, config.data.tgt_lang
    root, names = corpus_root(config), split_sources(config)
    sources = [s for name in names["train"] for s, _ in read_split(root, name, src_lang, tgt_lang)]
    origin = {
        "teacher": str(Path(teacher_dir).resolve()),
        "teacher_weights_sha256": _weights_digest(Path(teacher_dir)),
        "search": teacher.options.model_dump(mode="json"),
        "corpus": str(Path(root).resolve()),
        # what is translated, by content: a corpus changed under the same path (lines
        # removed, regenerated) must not be continued with the old lines' translations
        "sources_sha256": sha256_bytes("".join(s + "\n" for s in sources).encode("utf-8")),
    }
    with one_writer(dest, "rosetta distill"):
        return _distill(teacher, sources, origin, config, dest, chunk, log)


def _distill(
    teacher: Translator,
    sources: list[str],
    origin: dict[str, Any],
    config: ExperimentConfig,
    dest: Path,
    chunk: int,
    log: Callable[[str], None],
) -> Path:
    """``distill``'s body, run while this process holds ``dest``."""
    src_lang, tgt_lang = config.data.src_lang, config.data.tgt_lang
    root, names = corpus_root(config), split_sources(config)
    started = json.loads((dest / MANIFEST).read_text()) if (dest / MANIFEST).exists() else None
    partial = dest / f"train.{tgt_lang}.partial"
    changed = started is not None and any(started.get(k) != v for k, v in origin.items())
    if changed and (partial.exists() or (dest / f"train.{tgt_lang}").exists()):
        what = [k for k, v in origin.items() if started.get(k) != v]
        raise DistillError(
            f"{dest} holds a distillation by another teacher, search or corpus "
            f"({', '.join(what)} changed); give another destination (-o) or remove it"
        )
    atomic_write_text(dest / MANIFEST, json.dumps({**origin, "state": "running"}, indent=2))

    for split, (name,) in names.items():  # real references for validation and test
        if split == "train":
            continue
        pairs = read_split(root, name, src_lang, tgt_lang)
        atomic_write_text(dest / f"{split}.{src_lang}", "".join(s + "\n" for s, _ in pairs))
        atomic_write_text(dest / f"{split}.{tgt_lang}", "".join(t + "\n" for _, t in pairs))
    atomic_write_text(dest / f"train.{src_lang}", "".join(s + "\n" for s in sources))

    final = dest / f"train.{tgt_lang}"
    done = len(sources) if final.exists() else _complete_lines(partial)
    if done:
        log(f"resuming after {done:,} of {len(sources):,} sentences")
    start = time.monotonic()
    if not final.exists():
        with (
            partial.open("ab") as out,
            tqdm(total=len(sources), initial=done, unit="sent", desc="distilling") as bar,
        ):
            for begin in range(done, len(sources), chunk):
                part = sources[begin : begin + chunk]
                lines = [t.text for t in teacher.translate(part)]
                out.write("".join(line + "\n" for line in lines).encode("utf-8"))
                out.flush()
                os.fsync(out.fileno())
                bar.update(len(part))
        os.replace(partial, final)
    seconds = time.monotonic() - start
    summary = {**origin, "state": "done", "sentences": len(sources), "seconds": round(seconds, 1)}
    atomic_write_text(dest / MANIFEST, json.dumps(summary, indent=2))
    log(
        f"distilled {len(sources):,} training sentences into {dest} ({seconds:.0f} s); "
        f"train a student on it with data.root: {dest} (data.toy: null, data.train: "
        f"train, data.valid: valid, data.test: test)"
    )
    return dest


def _weights_digest(model_dir: Path) -> str | None:
    weights = model_dir / "model.safetensors"
    if not weights.exists():
        weights = model_dir / "model.bin"  # a CTranslate2 export
    return sha256_file(weights) if weights.exists() else None
