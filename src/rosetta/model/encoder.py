"""Transformer encoder (SPEC §1 step 5): N x (self-attention, feed-forward)."""

from __future__ import annotations

import torch
from torch import nn

from rosetta.config import TransformerConfig
from rosetta.model.efficient_attention import self_attention
from rosetta.model.layers import Block, FeedForward, Residual, final_norm
from rosetta.model.packing import SourcePadding


class EncoderLayer(Block):
    """Multi-head self-attention over the source, then the feed-forward network."""

    def __init__(self, cfg: TransformerConfig, index: int) -> None:
        super().__init__()
        self.self_attn = self_attention(cfg, cfg.encoder_attention, f"encoder.{index}.self")
        self.feed_forward = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation)
        self.attn_residual = Residual.of(cfg)
        self.ff_residual = Residual.of(cfg)

    def forward(
        self, x: torch.Tensor, padding: SourcePadding, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (batch, src_len, d_model), or the real tokens' rows (tokens, d_model)
        when ``padding`` packs them. Returns the same layout and, if asked, the
        self-attention weights (batch, heads, src_len, src_len)."""
        weights = None

        def attend(h: torch.Tensor) -> torch.Tensor:
            nonlocal weights
            out, weights = self.self_attn.forward(h, padding, need_weights=need_weights)
            return out

        x = self.attn_residual.around(x, attend)
        return self.ff_residual.around(x, self.feed_forward.forward), weights


class Encoder(Block):
    """A stack of encoder layers; its output H_enc feeds every decoder layer."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg, i) for i in range(cfg.encoder_layers))
        self.final_norm = final_norm(cfg)

    def forward(
        self, x: torch.Tensor, padding: SourcePadding, need_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (batch, src_len, d_model) -> H_enc (batch, src_len, d_model), zero at
        padded positions when the layers worked on the real tokens alone, and, if
        asked, each layer's self-attention weights."""
        weights = []
        x = padding.pack(x)
        for layer in self.layers:
            x, layer_weights = layer(x, padding, need_weights)
            if need_weights:
                weights.append(layer_weights)
        return padding.unpack(self.final_norm(x)), weights
