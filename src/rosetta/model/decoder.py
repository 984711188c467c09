"""Transformer decoder (SPEC §1 step 7): N x (masked self-attention,
cross-attention over H_enc, feed-forward)."""

from __future__ import annotations

import torch
from torch import nn

from rosetta.model.attention import CrossAttention, KVCache, SelfAttention
from rosetta.model.layers import FeedForward, Residual


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention (Q from the decoder, K/V from the
    encoder), feed-forward; each wrapped in a residual + LayerNorm."""

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
        self.cross_attn = CrossAttention(d_model, heads, attention_dropout)
        self.feed_forward = FeedForward(d_model, d_ff, activation)
        self.self_residual = Residual(d_model, dropout, norm)
        self.cross_residual = Residual(d_model, dropout, norm)
        self.ff_residual = Residual(d_model, dropout, norm)
        self.self_weights: torch.Tensor | None = None
        self.cross_weights: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        memory_mask: torch.Tensor | None,
        cache: KVCache | None = None,
        need_weights: bool = False,
        group: int = 1,
    ) -> torch.Tensor:
        """x: (batch, tgt_len, d_model); memory_kv: the cross-attention keys and
        values, each (sources, heads, src_len, head_dim); memory_mask:
        (sources, 1, 1, src_len), or None without padding; cache: this layer's
        self-attention keys/values during incremental decoding; group: rows of
        ``x`` per source (batch = sources * group; the beam in beam search)."""

        def self_attend(h: torch.Tensor) -> torch.Tensor:
            out, self.self_weights = self.self_attn(
                h, causal=True, cache=cache, need_weights=need_weights
            )
            return out

        def cross_attend(h: torch.Tensor) -> torch.Tensor:
            # a source's hypotheses become one longer query sequence against its
            # single copy of the memory: (sources, group * tgt_len, d_model)
            queries = h.reshape(-1, group * h.size(1), h.size(2)) if group > 1 else h
            out, self.cross_weights = self.cross_attn(queries, memory_kv, memory_mask, need_weights)
            return out.view(h.shape)

        x = self.self_residual(x, self_attend)
        x = self.cross_residual(x, cross_attend)
        return self.ff_residual(x, self.feed_forward)


class Decoder(nn.Module):
    """A stack of decoder layers with the final LayerNorm of a pre-norm stack."""

    def __init__(self, layers: list[DecoderLayer], d_model: int, norm: str = "pre") -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.final_norm = nn.LayerNorm(d_model) if norm == "pre" else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
        memory_mask: torch.Tensor | None,
        caches: list[KVCache] | None = None,
        need_weights: bool = False,
        group: int = 1,
    ) -> torch.Tensor:
        """x: (batch, tgt_len, d_model) -> (batch, tgt_len, d_model)."""
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            x = layer(x, memory_kv[i], memory_mask, cache, need_weights, group)
        return self.final_norm(x)
