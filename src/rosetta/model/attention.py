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
from rosetta.model.packing import Packing


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
        packing: Packing | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q: (batch, heads, q_len, head_dim); k, v: (batch, heads, k_len, head_dim).

        Returns the output (batch, q_len, d_model), or (tokens, d_model) with a
        ``packing`` (only real tokens are projected), and, if asked, the weights
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
        if packing is not None:
            context = packing.pack(context)
        return self.out_proj(context), weights


class KVCache:
    """One self-attention layer's keys and values of the positions decoded so far.

    One buffer, position-first: (capacity, 2, batch, heads, head_dim), a
    position's keys, then its values. It has room to spare (``length`` positions
    used) and grows by doubling, so a decoding step writes its own position, in
    one copy from the fused QKV projection's output, instead of copying the
    whole history as ``torch.cat`` would. Position-first, the used part is one
    contiguous block, so ``select_rows`` (beam search re-ranking hypotheses,
    finished sentences leaving the batch) gathers it in one ``index_select``
    straight into a spare buffer kept for the purpose, and swaps the two. A
    smaller batch is laid out in the front of the same memory: no allocation per
    step, and no copying of the unused capacity.
    """

    def __init__(self) -> None:
        self.length = 0
        self.buffer: torch.Tensor | None = None  # a view of the front of _memory
        self._memory: torch.Tensor | None = None  # flat
        self._spare: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.buffer.size(2)

    def append(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends new positions' keys and values, ``kv`` (batch, new_len, 2, heads,
        head_dim): the K/V part of the fused QKV projection's output as it lies.
        Returns keys and values of every position so far, (batch, heads, length,
        head_dim) views."""
        start, end = self.length, self.length + kv.size(1)
        if self.buffer is None or end > self.buffer.size(0):
            self._grow(max(2 * end, 16), kv)
        self.buffer[start:end] = kv.permute(1, 2, 0, 3, 4)
        self.length = end
        used = self.buffer[:end]
        return used[:, 0].permute(1, 2, 0, 3), used[:, 1].permute(1, 2, 0, 3)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every position so far as (batch * heads, length,
        head_dim) views (strided: one row per batch row and head), for batched
        matrix products."""
        _, _, batch, heads, head_dim = self.buffer.shape
        used = self.buffer[: self.length]
        return tuple(
            used[:, i].view(self.length, batch * heads, head_dim).transpose(0, 1) for i in (0, 1)
        )

    def _grow(self, capacity: int, like: torch.Tensor) -> None:
        batch, _, _, heads, head_dim = like.shape
        shape = (capacity, 2, batch, heads, head_dim)
        memory = like.new_empty(math.prod(shape))
        buffer = memory.view(shape)
        if self.length:
            buffer[: self.length] = self.buffer[: self.length]
        self.buffer, self._memory, self._spare = buffer, memory, None

    def select_rows(self, index: torch.Tensor) -> KVCache:
        """Keeps batch rows ``index`` (in that order, repeats allowed), in place."""
        if self.buffer is None:
            return self
        capacity, _, batch, heads, head_dim = self.buffer.shape
        shape = (capacity, 2, len(index), heads, head_dim)
        if self.buffer.requires_grad or math.prod(shape) > self._memory.numel():
            # a graph to keep for autograd, or more rows than the memory holds
            kv = self.buffer[: self.length].index_select(2, index)
            self.buffer, self.length = None, 0
            self.append(kv.permute(2, 0, 1, 3, 4))
            return self
        if self._spare is None:
            self._spare = torch.empty_like(self._memory)
        buffer = self._spare[: math.prod(shape)].view(shape)
        # one gather of whole (heads * head_dim) rows along dim 0 of the flattened used
        # block, keys and values at once: 1.4-1.8x faster than index_select along the
        # batch dimension, and half the calls of separate key and value buffers
        blocks = torch.arange(2 * self.length, device=index.device)  # (position, k/v) pairs
        rows = (blocks[:, None] * batch + index).view(-1)
        source = self.buffer[: self.length].view(-1, heads * head_dim)
        torch.index_select(source, 0, rows, out=buffer[: self.length].view(-1, heads * head_dim))
        self._memory, self._spare = self._spare, self._memory
        self.buffer = buffer
        return self


class SelfAttention(MultiHeadAttention):
    """Q, K and V from the same sequence, with one fused W_QKV projection.

    With a ``cache`` (empty at the first step), the new positions' keys and
    values are appended to it, so incremental decoding projects each position
    once.
    """

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__(d_model, heads, dropout)
        self.qkv_proj = Linear(d_model, 3 * d_model)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        need_weights: bool = False,
        packing: Packing | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (batch, len, d_model), or the real tokens' rows (tokens, d_model) with a
        ``packing``; the output has the same layout."""
        qkv = self.qkv_proj(x)
        if packing is not None:
            qkv = packing.unpack(qkv)  # (batch, len, 3 * d_model) for the attention product
        q, k, v = (self.split_heads(t) for t in qkv.chunk(3, dim=-1))
        if cache is not None:
            batch, length, _ = qkv.shape
            k, v = cache.append(qkv.view(batch, length, 3, self.heads, self.head_dim)[:, :, 1:])
            # One new query sees every cached key: no causal mask is needed.
            causal = causal and q.size(2) > 1
        return self.attend(q, k, v, mask, causal, need_weights, packing)


class CrossAttention(MultiHeadAttention):
    """Q from the decoder, K and V from the encoder output (fused W_KV)."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__(d_model, heads, dropout)
        self.q_proj = Linear(d_model, d_model)
        self.kv_proj = Linear(d_model, 2 * d_model)

    def project_memory(
        self, memory: torch.Tensor, packing: Packing | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the encoder output (batch, src_len, d_model), computed
        once per sentence; with a ``packing``, for the real tokens only (zero at
        padded positions, which the source mask hides)."""
        if packing is None:
            kv = self.kv_proj(memory)
        else:
            kv = packing.unpack(self.kv_proj(packing.pack(memory)))
        k, v = kv.chunk(2, dim=-1)
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
