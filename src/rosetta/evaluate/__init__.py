"""Evaluation: sacreBLEU BLEU and chrF with their signatures, and test-set scoring."""

from rosetta.evaluate.files import evaluate_files
from rosetta.evaluate.metrics import Score, bleu, chrf

__all__ = ["Score", "bleu", "chrf", "evaluate_files"]
