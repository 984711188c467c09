"""Models: embeddings, attention, encoder, decoder, and ``build_model``."""

from __future__ import annotations

from rosetta.config import ModelConfig
from rosetta.model.interface import DecoderState, EncoderOutput, Seq2Seq
from rosetta.model.rnn import RNNSeq2Seq
from rosetta.model.transformer import Transformer

__all__ = [
    "DecoderState",
    "EncoderOutput",
    "RNNSeq2Seq",
    "Seq2Seq",
    "Transformer",
    "build_model",
]


def build_model(
    cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int
) -> Transformer | RNNSeq2Seq:
    """Builds the model a configuration describes (``model.arch``)."""
    if cfg.arch == "transformer":
        return Transformer(cfg, src_vocab_size, tgt_vocab_size)
    if cfg.arch == "rnn":
        return RNNSeq2Seq(cfg, src_vocab_size, tgt_vocab_size)
    raise ValueError(f"unknown model.arch {cfg.arch!r}")
