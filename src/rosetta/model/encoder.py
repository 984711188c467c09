"""Transformer encoder (SPEC §1 step 5): N x (self-attention, feed-forward)."""

from __future__ import annotations

import torch
from torch import nn

from rosetta.model.attention import SelfAttention
from rosetta.model.layers import FeedForward, Residual
from rosetta.model.packing import Packing


class EncoderLayer(nn.Module):
    """Multi-head self-attention over the source, then the feed-forward network."""

    def __init__(
        self,
        d_model: int,
        heads: int,
        d_ff: int,
        dropout: float,
        attention_dropout: float = 0.0,
        activation: str = "relu",
        norm: str = "pre",
    ) -> None:
        super().__init__()
        self.self_attn = SelfAttention(d_model, heads, attention_dropout)
        self.feed_forward = FeedForward(d_model, d_ff, activation)
        self.attn_residual = Residual(d_model, dropout, norm)
        self.ff_residual = Residual(d_model, dropout, norm)
        self.weights: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        need_weights: bool = False,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """x: (batch, src_len, d_model), or the real tokens (tokens, d_model) with a
        ``packing``; mask: (batch, 1, 1, src_len), True on real tokens (None: no
        padding)."""

        def attend(h: torch.Tensor) -> torch.Tensor:
            out, self.weights = self.self_attn(
                h, mask=mask, need_weights=need_weights, packing=packing
            )
            return out

        x = self.attn_residual(x, attend)
        return self.ff_residual(x, self.feed_forward)


class Encoder(nn.Module):
    """A stack of encoder layers; its output H_enc feeds every decoder layer."""

    def __init__(self, layers: list[EncoderLayer], d_model: int, norm: str = "pre") -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.final_norm = nn.LayerNorm(d_model) if norm == "pre" else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        need_weights: bool = False,
        packing: Packing | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (batch, src_len, d_model). Returns H_enc (batch, src_len, d_model) and,
        if asked, each layer's self-attention weights (batch, heads, src_len, src_len).

        With a ``packing``, the layers' position-wise work runs on the real tokens
        alone, and H_enc is zero at padded positions.
        """
        weights = []
        if packing is not None:
            x = packing.pack(x)
        for layer in self.layers:
            x = layer(x, mask, need_weights, packing)
            if need_weights:
                weights.append(layer.weights)
        x = self.final_norm(x)
        return (packing.unpack(x) if packing is not None else x), weights
