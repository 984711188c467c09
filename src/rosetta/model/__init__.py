"""Models: embeddings, attention, encoder, decoder, and ``build_model``."""

from __future__ import annotations

from rosetta.config import RNNConfig, TransformerConfig
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
    cfg: TransformerConfig | RNNConfig, src_vocab_size: int, tgt_vocab_size: int
) -> Seq2Seq:
    """Builds the model a configuration describes (``model.arch``): a plain factory, one
    line per family."""
    if isinstance(cfg, TransformerConfig):
        return Transformer(cfg, src_vocab_size, tgt_vocab_size)
    if isinstance(cfg, RNNConfig):
        return RNNSeq2Seq(cfg, src_vocab_size, tgt_vocab_size)
    raise ValueError(f"unknown model.arch {cfg.arch!r}")
