"""Transformer decoder (SPEC §1 step 7): N x (masked self-attention,
cross-attention over H_enc, feed-forward).

Each layer has its whole-sequence form (``forward``: training, attention maps)
and its one-step form (``step``: cached decoding) side by side, built from the
same sub-layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rosetta.config import TransformerConfig
from rosetta.model.attention import CrossAttention, Memory
from rosetta.model.efficient_attention import self_attention
from rosetta.model.layers import Block, FeedForward, Residual, final_norm, layer_norm_args
from rosetta.model.packing import SourcePadding


class DecoderLayer(Block):
    """Causal self-attention, cross-attention (Q from the decoder, K/V from the
    encoder), feed-forward; each wrapped in a residual + LayerNorm."""

    def __init__(self, cfg: TransformerConfig, index: int) -> None:
        super().__init__()
        self.self_attn = self_attention(cfg, cfg.decoder_attention, f"decoder.{index}.self")
        self.cross_attn = CrossAttention(
            cfg.d_model,
            cfg.heads_at(f"decoder.{index}.cross"),
            cfg.attention_dropout,
            cfg.d_model // cfg.heads,
        )
        self.feed_forward = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation)
        self.self_residual = Residual.of(cfg)
        self.cross_residual = Residual.of(cfg)
        self.ff_residual = Residual.of(cfg)

    def forward(
        self,
        x: torch.Tensor,
        memory: Memory,
        need_weights: bool = False,
        padding: SourcePadding | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """A whole target sequence, x (batch, tgt_len, d_model) -> (batch, tgt_len,
        d_model); and, if asked, the ``self`` and ``cross`` attention weights.

        Without ``padding``, self-attention is causal (left to right; a position
        never sees the padding after it). With ``padding`` (the target's, unpacked),
        every position sees every real position: the non-autoregressive decoder."""
        weights: dict[str, torch.Tensor | None] = {}
        causal = padding is None

        def self_attend(h: torch.Tensor) -> torch.Tensor:
            out, weights["self"] = self.self_attn.forward(
                h, padding, causal=causal, need_weights=need_weights
            )
            return out

        def cross_attend(h: torch.Tensor) -> torch.Tensor:
            out, weights["cross"] = self.cross_attn.forward(h, memory, need_weights=need_weights)
            return out

        x = self.self_residual.around(x, self_attend)
        x = self.cross_residual.around(x, cross_attend)
        return self.ff_residual.around(x, self.feed_forward.forward), weights

    def step(self, x: torch.Tensor, cache: Any, memory: Memory, group: int) -> torch.Tensor:
        """One new position per hypothesis, x (batch, d_model) -> (batch, d_model);
        ``group`` hypotheses per source in consecutive rows (the beam). ``cache``
        is what ``self_attn.new_cache()`` made (a ``KVCache`` for full attention)."""
        x = self.self_residual.around(x, self.self_attn.step, cache)
        x = self.cross_residual.around(x, self.cross_attn.step, memory, group)
        return self.ff_residual.around(x, self.feed_forward.forward)


class Decoder(Block):
    """A stack of decoder layers with the final LayerNorm of a pre-norm stack."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.decoder_layers))
        self.final_norm = final_norm(cfg)
        self._final_norm_args = layer_norm_args(self.final_norm)

    def forward(
        self,
        x: torch.Tensor,
        memories: list[Memory],
        need_weights: bool = False,
        padding: SourcePadding | None = None,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor | None]]]:
        """x: (batch, tgt_len, d_model) -> (batch, tgt_len, d_model), and each layer's
        attention weights if asked; ``padding``: see ``DecoderLayer.forward``."""
        weights = []
        for layer, memory in zip(self.layers, memories):
            x, layer_weights = layer(x, memory, need_weights, padding)
            weights.append(layer_weights)
        return self.final_norm(x), weights

    def step(
        self, x: torch.Tensor, caches: list[Any], memories: list[Memory], group: int
    ) -> torch.Tensor:
        """The stack's one-step form: x (batch, d_model) -> (batch, d_model)."""
        for layer, cache, memory in zip(self.layers, caches, memories):
            x = layer.step(x, cache, memory, group)
        if self._final_norm_args is None:
            return x
        return F.layer_norm(x, *self._final_norm_args)
