"""The Transformer of "Attention Is All You Need" assembled from its parts.

``TransformerBase`` is what every Transformer family shares: embeddings, the
encoder, the decoder stack and the output layer; ``hidden_states`` is the
teacher-forced pass (training, through ``forward`` and the training
objectives) and ``attention_maps`` returns every head's weights for
plotting. ``Transformer`` is the left-to-right model: its decoder is causal, and
``init_state`` / ``decode_step`` make it an ``IncrementalDecoder``
(``rosetta.model.interface``) through the layers' one-step forms. The
non-autoregressive family (``rosetta.model.nat``) shares the base and fills in
instead.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from rosetta.config import TransformerConfig
from rosetta.data.tokenizer import PAD_ID
from rosetta.model.attention import Memory
from rosetta.model.decoder import Decoder
from rosetta.model.embeddings import (
    EmbeddingBlock,
    LearnedPositions,
    SinusoidalPositions,
    TokenEmbedding,
)
from rosetta.model.encoder import Encoder
from rosetta.model.interface import DecoderState, EncoderOutput, Seq2Seq
from rosetta.model.linear import Linear
from rosetta.model.packing import SourcePadding


def _positions(cfg: TransformerConfig) -> nn.Module:
    if cfg.positional == "learned":
        return LearnedPositions(cfg.d_model, cfg.max_positions)
    return SinusoidalPositions(
        cfg.d_model, cfg.max_positions, halves=cfg.positional == "sinusoidal_halves"
    )


class TransformerBase(Seq2Seq):
    """Encoder-decoder Transformer with optional tied embeddings; how the decoder
    reads its target (causally, or every position at once) is the subclass's."""

    def __init__(self, cfg: TransformerConfig, src_vocab_size: int, tgt_vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        tgt_tokens = TokenEmbedding(tgt_vocab_size, cfg.d_model)
        share_all = cfg.tie_all and src_vocab_size == tgt_vocab_size
        src_tokens = tgt_tokens if share_all else TokenEmbedding(src_vocab_size, cfg.d_model)
        self.src_embed = EmbeddingBlock(src_tokens, _positions(cfg), cfg.dropout)
        self.tgt_embed = EmbeddingBlock(tgt_tokens, _positions(cfg), cfg.dropout)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.output = Linear(cfg.d_model, tgt_vocab_size, bias=cfg.output_bias)
        self._init_weights()
        if cfg.tie_output:
            self.output.weight = tgt_tokens.weight

    def _init_weights(self) -> None:
        """Xavier-uniform for the projections, as in the reference implementations."""
        for name, param in self.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                nn.init.xavier_uniform_(param)
            elif name.endswith("bias"):
                nn.init.zeros_(param)

    # ---- teacher-forced pass ---------------------------------------------------------
    def hidden_states(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.decoder_states(self.memories(self.encode(src)), tgt_in)

    def decoder_states(self, memories: list[Memory], tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's states (batch, tgt_len, d_model) over target ``tokens``."""
        x, _ = self.decoder(self.tgt_embed(tokens), memories, padding=self.target_padding(tokens))
        return x

    @torch.no_grad()
    def attention_maps(
        self, src: torch.Tensor, tgt_in: torch.Tensor
    ) -> dict[str, list[torch.Tensor]]:
        """Every head's weights for a teacher-forced pass (use the model's own output
        as ``tgt_in`` to see what it attended to while translating)."""
        encoded = self.encode(src, need_weights=True)
        _, weights = self.decoder(
            self.tgt_embed(tgt_in), self.memories(encoded), True, self.target_padding(tgt_in)
        )
        return self.maps(encoded, weights)

    @staticmethod
    def maps(
        encoded: EncoderOutput, weights: list[dict[str, torch.Tensor | None]]
    ) -> dict[str, list[torch.Tensor]]:
        """``attention_maps``' dict from the encoder's and each decoder layer's weights."""
        return {
            "encoder_self": encoded.attention,
            "decoder_self": [layer["self"] for layer in weights],
            "cross": [layer["cross"] for layer in weights],
        }

    @abstractmethod
    def target_padding(self, tgt_in: torch.Tensor) -> SourcePadding | None:
        """What the decoder's self-attention is told about the target: None for a
        causal decoder; a decoder that reads every position gets the padding."""

    # ---- the encoder side ----------------------------------------------------------
    def encode(self, src: torch.Tensor, need_weights: bool = False) -> EncoderOutput:
        """src (batch, src_len) -> H_enc (batch, src_len, d_model) and its padding."""
        padding = SourcePadding(src.eq(PAD_ID))
        memory, weights = self.encoder(self.src_embed(src), padding, need_weights)
        return EncoderOutput(memory, padding.pad_mask, padding=padding, attention=weights)

    def memories(self, encoder_output: EncoderOutput) -> list[Memory]:
        """H_enc projected to every decoder layer's cross-attention K/V, once."""
        return [
            layer.cross_attn.project_memory(encoder_output.memory, encoder_output.padding)
            for layer in self.decoder.layers
        ]


class Transformer(TransformerBase):
    """The left-to-right Transformer: a causal decoder, decoded step by step."""

    def target_padding(self, tgt_in: torch.Tensor) -> None:
        return None  # causal: position t sees positions up to t, never padding after

    # ---- incremental interface (IncrementalDecoder) ----------------------------------
    def init_state(self, encoder_output: EncoderOutput) -> DecoderState:
        caches = [layer.self_attn.new_cache() for layer in self.decoder.layers]
        return DecoderState(
            tensors={"caches": caches}, sources={"memory": self.memories(encoder_output)}
        )

    def decode_step(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """tokens (batch,) at ``state.positions`` -> logits (batch, tgt_vocab)."""
        x = self.tgt_embed(tokens[:, None], offset=state.positions)[:, 0]  # (batch, d_model)
        state.step += 1
        x = self.decoder.step(x, state.tensors["caches"], state.sources["memory"], state.group)
        return self.output(x)
