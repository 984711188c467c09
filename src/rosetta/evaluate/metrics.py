"""Corpus BLEU and chrF through sacreBLEU (cased, detokenised, 13a by default).

Every score carries sacreBLEU's signature so a reported number can be
reproduced and compared.
"""

from __future__ import annotations

from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF


@dataclass(frozen=True)
class Score:
    """A metric value, its full sacreBLEU line and signature."""

    name: str
    score: float
    text: str
    signature: str

    def __str__(self) -> str:
        return f"{self.text} (signature: {self.signature})"


def _check(hypotheses: list[str], references: list[str]) -> None:
    if not references:  # sacreBLEU fails inside on an empty corpus
        raise ValueError("no sentences to score: the test set is empty")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references: "
            "they must pair up line by line"
        )


def bleu(hypotheses: list[str], references: list[str], tokenize: str = "13a") -> Score:
    """sacreBLEU corpus BLEU, e.g. ``BLEU = 36.2 68.1/43.0/...``."""
    _check(hypotheses, references)
    metric = BLEU(tokenize=tokenize)
    result = metric.corpus_score(hypotheses, [references])
    return Score("BLEU", result.score, str(result), str(metric.get_signature()))


def chrf(hypotheses: list[str], references: list[str]) -> Score:
    """sacreBLEU corpus chrF (character n-gram F-score, β = 2)."""
    _check(hypotheses, references)
    metric = CHRF()
    result = metric.corpus_score(hypotheses, [references])
    return Score("chrF", result.score, str(result), str(metric.get_signature()))
