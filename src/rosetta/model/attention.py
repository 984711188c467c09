"""Multi-head scaled dot-product attention (SPEC §1 step 5).

Heads are split over the feature dimension; the core product is
``torch.nn.functional.scaled_dot_product_attention`` (fused kernels), except
when the caller asks for the attention weights, where the same computation is
written out so the weights can be returned.

Masks broadcast to (batch, heads, query_len, key_len). A boolean mask is True
where attention is allowed; a float mask is added to the scores. Both follow
``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rosetta.model.linear import Linear


class MultiHeadAttention(nn.Module):
    """The shared core: attend with heads already split, merge heads, apply W_O."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = d_model // heads
        self.dropout = dropout
        self.out_proj = Linear(d_model, d_model)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        # (batch, len, d_model) -> (batch, heads, len, head_dim)
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q: (batch, heads, q_len, head_dim); k, v: (batch, heads, k_len, head_dim).

        Returns the output (batch, q_len, d_model) and, if asked, the weights
        (batch, heads, q_len, k_len).
        """
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if causal:
                future = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device)
                scores = scores.masked_fill(future.triu(1), float("-inf"))
            if mask is not None and mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            elif mask is not None:  # a float mask is added to the scores, as in SDPA
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            context = F.dropout(weights, dropout, self.training) @ v
        else:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal
            )
        batch, _, q_len, _ = context.shape
        # (batch, heads, q_len, head_dim) -> (batch, q_len, d_model)
        context = context.transpose(1, 2).reshape(batch, q_len, self.heads * self.head_dim)
        return self.out_proj(context), weights


def append_to_cache(
    cache: dict, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Appends keys and values (batch, heads, new_len, head_dim) to a decoding cache
    and returns every position so far, (batch, heads, length, head_dim) views.

    The cache holds buffers with room to spare (``length`` positions used), grown
    by doubling, so a decoding step writes its own position instead of copying
    the whole history as ``torch.cat`` would.
    """
    length = cache.get("length", 0)
    end = length + k.size(2)
    if "k" not in cache or end > cache["k"].size(2):
        capacity = max(2 * end, 16)
        for name, new in (("k", k), ("v", v)):
            buffer = new.new_empty(new.size(0), new.size(1), capacity, new.size(3))
            if length:
                buffer[:, :, :length] = cache[name][:, :, :length]
            cache[name] = buffer
    cache["k"][:, :, length:end] = k
    cache["v"][:, :, length:end] = v
    cache["length"] = end
    return cache["k"][:, :, :end], cache["v"][:, :, :end]


class SelfAttention(MultiHeadAttention):
    """Q, K and V from the same sequence, with one fused W_QKV projection.

    With a ``cache`` (a dict, empty at the first step), the new positions' keys
    and values are appended to it, so incremental decoding projects each
    position once (see ``append_to_cache``).
    """

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__(d_model, heads, dropout)
        self.qkv_proj = Linear(d_model, 3 * d_model)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: dict[str, torch.Tensor] | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = (self.split_heads(t) for t in self.qkv_proj(x).chunk(3, dim=-1))
        if cache is not None:
            k, v = append_to_cache(cache, k, v)
            # One new query sees every cached key: no causal mask is needed.
            causal = causal and q.size(2) > 1
        return self.attend(q, k, v, mask, causal, need_weights)


class CrossAttention(MultiHeadAttention):
    """Q from the decoder, K and V from the encoder output (fused W_KV)."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__(d_model, heads, dropout)
        self.q_proj = Linear(d_model, d_model)
        self.kv_proj = Linear(d_model, 2 * d_model)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the encoder output, computed once per sentence."""
        k, v = self.kv_proj(memory).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = self.split_heads(self.q_proj(x))
        return self.attend(q, *memory_kv, mask=mask, need_weights=need_weights)
