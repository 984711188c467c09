"""Models: embeddings, attention, encoder, decoder, and ``build_model``."""

from __future__ import annotations

from rosetta.config import NATConfig, RNNConfig, TransformerConfig
from rosetta.data.tokenizer import MASK_ID, MASK_PIECE, Tokenizer
from rosetta.model.interface import DecoderState, EncoderOutput, Seq2Seq
from rosetta.model.nat import NATransformer
from rosetta.model.rnn import RNNSeq2Seq
from rosetta.model.transformer import Transformer

__all__ = [
    "DecoderState",
    "EncoderOutput",
    "NATransformer",
    "RNNSeq2Seq",
    "Seq2Seq",
    "Transformer",
    "build_model",
    "model_for",
]


def build_model(
    cfg: TransformerConfig | NATConfig | RNNConfig, src_vocab_size: int, tgt_vocab_size: int
) -> Seq2Seq:
    """Builds the model a configuration describes (``model.arch``): a plain factory, one
    line per family."""
    if isinstance(cfg, NATConfig):  # before its base class, TransformerConfig
        return NATransformer(cfg, src_vocab_size, tgt_vocab_size)
    if isinstance(cfg, TransformerConfig):
        return Transformer(cfg, src_vocab_size, tgt_vocab_size)
    if isinstance(cfg, RNNConfig):
        return RNNSeq2Seq(cfg, src_vocab_size, tgt_vocab_size)
    raise ValueError(f"unknown model.arch {cfg.arch!r}")


def model_for(cfg: TransformerConfig | NATConfig | RNNConfig, tokenizer: Tokenizer) -> Seq2Seq:
    """The model a configuration describes, sized for ``tokenizer``'s vocabularies;
    a non-autoregressive model needs ``<mask>`` in the target vocabulary."""
    if isinstance(cfg, NATConfig) and not tokenizer.has_mask:
        raise ValueError(
            f"model.arch nat needs {MASK_PIECE} at id {MASK_ID} in the target vocabulary; "
            "this tokenizer was trained before rosetta reserved it: train a new one"
        )
    return build_model(cfg, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
