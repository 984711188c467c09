"""Evaluation: sacreBLEU BLEU and chrF with their signatures."""

from rosetta.evaluate.metrics import Score, bleu, chrf

__all__ = ["Score", "bleu", "chrf"]
