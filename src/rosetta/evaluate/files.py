"""Scoring a translator on a test set: ``evaluate_files`` (``rosetta evaluate``)."""

from __future__ import annotations

import time
from pathlib import Path

from rosetta.data.text import read_lines, write_lines_atomic
from rosetta.decode.translator import Translator
from rosetta.evaluate.metrics import bleu, chrf


def evaluate_files(
    translator: Translator, src: Path, ref: Path, output: Path | None = None
) -> dict:
    """Translates ``src`` and scores it against ``ref``; returns BLEU and chrF. The
    translations are written to ``output`` (atomically) when it is given."""
    sources, references = read_lines(src), read_lines(ref)
    if len(sources) != len(references):
        raise ValueError(f"{src} has {len(sources)} lines but {ref} has {len(references)}")
    start = time.perf_counter()
    hypotheses = [t.text for t in translator.translate(sources)]
    seconds = time.perf_counter() - start
    if output:
        write_lines_atomic(output, hypotheses)
    b, c = bleu(hypotheses, references), chrf(hypotheses, references)
    return {
        "bleu": b.score,
        "bleu_text": b.text,
        "bleu_signature": b.signature,
        "chrf": c.score,
        "chrf_signature": c.signature,
        "sentences_per_s": len(sources) / seconds,
        "hypotheses": hypotheses,
    }
