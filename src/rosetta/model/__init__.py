"""Models: embeddings, attention, encoder, decoder, and ``build_model``."""

from __future__ import annotations

from rosetta.config import ModelConfig
from rosetta.model.interface import DecoderState, EncoderOutput, Seq2SeqModel
from rosetta.model.transformer import Transformer

__all__ = ["DecoderState", "EncoderOutput", "Seq2SeqModel", "Transformer", "build_model"]


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> Transformer:
    """Builds the model a configuration describes (``model.arch``)."""
    if cfg.arch == "transformer":
        return Transformer(cfg, src_vocab_size, tgt_vocab_size)
    raise ValueError(f"unknown model.arch {cfg.arch!r}")
