"""Multi-head scaled dot-product attention (SPEC §1 step 5), one implementation.

``attention`` is the one function every path calls: training, full and cached
decoding, beam search and attention maps. It runs PyTorch's fused
``scaled_dot_product_attention``, except in two cases where the same maths is
written out: when the caller asks for the weights (attention maps), and on a
CPU without autograd when many rows each ask from one position or a few (a
search step over many hypotheses), where two batched matrix products that read
the cache where it lies are faster than the fused kernel.

The modules (``SelfAttention``, ``CrossAttention``) hold each form side by
side: ``forward`` for a whole sequence and ``step`` for one new position
against a cache (``new_cache``). Both go through ``MultiHeadAttention.attend``,
so an attention variant is one subclass overriding it (and the one-step form
where its decoding state differs: ``rosetta.model.efficient_attention``), and
it reaches training and decoding alike.

Masks broadcast to (batch, heads, query_len, key_len). A boolean mask is True
where attention is allowed; a float mask is added to the scores. Both follow
``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rosetta.model.layers import Block
from rosetta.model.linear import Linear

MATMUL_MIN_ROWS = 64  # query rows from which a search step attends by matrix products
MATMUL_MAX_QUERIES = 16  # ... when each row asks from at most this many positions


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout: float = 0.0,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q kᵀ / sqrt(head_dim) + mask) v.

    q: (batch, heads, q_len, head_dim); k, v: (batch, heads, k_len, head_dim),
    any strides. Returns the context (batch, heads, q_len, head_dim) and, if
    asked, the weights (batch, heads, q_len, k_len).
    """
    batch, heads, q_len, head_dim = q.shape
    by_matmul = (
        batch * q_len >= MATMUL_MIN_ROWS
        and q_len <= MATMUL_MAX_QUERIES
        and not need_weights
        and dropout == 0.0
        and q.is_cpu
        and not torch.is_grad_enabled()
    )
    if not (need_weights or by_matmul):
        # positional arguments: keyword parsing costs a little at every decoding step
        return F.scaled_dot_product_attention(q, k, v, mask, dropout, causal), None
    k_len = k.size(2)
    # (batch * heads, q_len, head_dim) @ (batch * heads, head_dim, k_len)
    scores = torch.bmm(q.reshape(-1, q_len, head_dim), k.flatten(0, 1).transpose(1, 2))
    scores = scores.view(batch, heads, q_len, k_len).mul_(head_dim**-0.5)
    if causal:
        future = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).triu_(1)
        scores.masked_fill_(future, float("-inf"))
    if mask is not None and mask.dtype == torch.bool:
        scores.masked_fill_(~mask, float("-inf"))
    elif mask is not None:
        scores.add_(mask)
    weights = scores.softmax(dim=-1)
    dropped = F.dropout(weights, dropout) if dropout else weights
    context = torch.bmm(dropped.view(-1, q_len, k_len), v.flatten(0, 1))
    return context.view(batch, heads, q_len, head_dim), weights if need_weights else None


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

    Rows of different ages (sentences that joined a running search: ``join``)
    share the slots: every row writes its new position into the same slot, and
    ``starts`` holds the slot where each row's own positions begin (None while
    all begin at slot 0). The slots before a row's start hold zeros and are
    masked (``mask``); ``select_rows`` drops the slots no row uses any more as
    part of the gather it does anyway.
    """

    def __init__(self) -> None:
        self.length = 0
        self.buffer: torch.Tensor | None = None  # a view of the front of _memory
        self._memory: torch.Tensor | None = None  # flat
        self._spare: torch.Tensor | None = None
        self.starts: torch.Tensor | None = None  # (batch,) first slot of each row's own

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
            self._grow(max(2 * end, 16), kv.shape[0], kv)
        self.buffer[start:end] = kv.permute(1, 2, 0, 3, 4)
        self.length = end
        used = self.buffer[:end]
        return used[:, 0].permute(1, 2, 0, 3), used[:, 1].permute(1, 2, 0, 3)

    def mask(self) -> torch.Tensor | None:
        """The additive mask (batch, 1, 1, length) hiding the slots before each row's
        own (-inf), or None when every row began at the first slot."""
        if self.starts is None:
            return None
        slots = torch.arange(self.length, device=self.starts.device)
        before = slots[None, :] < self.starts[:, None]
        mask = torch.zeros(before.shape, dtype=self.buffer.dtype, device=before.device)
        return mask.masked_fill_(before, float("-inf"))[:, None, None, :]

    def _grow(self, capacity: int, batch: int, like: torch.Tensor) -> None:
        """A new buffer of ``capacity`` positions and ``batch`` rows, holding the used
        positions of the rows there are (new rows: zeros)."""
        _, _, _, heads, head_dim = like.shape
        shape = (capacity, 2, batch, heads, head_dim)
        memory = like.new_empty(math.prod(shape))
        buffer = memory.view(shape)
        if self.length:
            before = self.buffer.size(2)
            buffer[: self.length, :, :before] = self.buffer[: self.length]
            buffer[: self.length, :, before:] = 0.0
        self.buffer, self._memory, self._spare = buffer, memory, None

    def join(self, other: KVCache, rows: int) -> KVCache:
        """Adds ``rows`` rows with no positions yet (``other``: the new sentences'
        empty cache) after this cache's rows; they begin at the next slot."""
        if other.length:
            raise ValueError("only rows with no positions yet can join a cache")
        if self.buffer is None:  # nothing decoded yet: every row begins at slot 0
            return self
        batch = self.batch
        starts = self.starts
        if starts is None:
            starts = torch.zeros(batch, dtype=torch.long, device=self.buffer.device)
        self.starts = torch.cat([starts, starts.new_full((rows,), self.length)])
        self._grow(self.buffer.size(0), batch + rows, self.buffer)
        return self

    def select_rows(self, index: torch.Tensor) -> KVCache:
        """Keeps batch rows ``index`` (in that order, repeats allowed), in place."""
        if self.buffer is None:
            return self
        first = 0
        if self.starts is not None:
            self.starts = self.starts.index_select(0, index)
            first = int(self.starts.min())  # slots before it: no row's any more
            self.starts = self.starts - first if bool(self.starts.ne(first).any()) else None
        length = self.length - first
        capacity, _, batch, heads, head_dim = self.buffer.shape
        shape = (capacity, 2, len(index), heads, head_dim)
        if self.buffer.requires_grad or math.prod(shape) > self._memory.numel():
            # a graph to keep for autograd, or more rows than the memory holds
            kv = self.buffer[first : self.length].index_select(2, index)
            self.buffer, self.length = None, 0
            self.append(kv.permute(2, 0, 1, 3, 4))
            return self
        if self._spare is None:
            self._spare = torch.empty_like(self._memory)
        buffer = self._spare[: math.prod(shape)].view(shape)
        # one gather of whole (heads * head_dim) rows along dim 0 of the flattened used
        # block, keys and values at once: contiguous rows, and half the calls of
        # separate key and value buffers (figures: benchmarks/results/kernel_notes.md)
        blocks = torch.arange(2 * length, device=index.device)  # (position, k/v) pairs
        rows = (blocks[:, None] * batch + index).view(-1)
        source = self.buffer[first : self.length].view(-1, heads * head_dim)
        torch.index_select(source, 0, rows, out=buffer[:length].view(-1, heads * head_dim))
        self._memory, self._spare = self._spare, self._memory
        self.buffer, self.length = buffer, length
        return self


@dataclass
class Memory:
    """One decoder layer's view of the encoder output, computed once per batch:
    cross-attention keys and values (sources, heads, src_len, head_dim) and the
    additive source mask (sources, 1, 1, src_len), or None without padding."""

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | None

    def select_rows(self, index: torch.Tensor) -> Memory:
        """Keeps sources ``index`` (finished sentences leave the search)."""
        mask = None if self.mask is None else self.mask.index_select(0, index)
        return Memory(self.keys.index_select(0, index), self.values.index_select(0, index), mask)

    def join(self, other: Memory, rows: int) -> Memory:
        """This memory's sources, then ``other``'s (sentences joining the search),
        padded to the longer source: zero keys and values, masked (-inf)."""
        length = max(self.keys.size(2), other.keys.size(2))
        parts = [_padded(memory, length) for memory in (self, other)]
        masks = [mask for _, _, mask in parts]
        if all(mask is None for mask in masks):
            mask = None
        else:
            mask = torch.cat([
                m if m is not None else k.new_zeros(k.size(0), 1, 1, length)
                for (k, _, _), m in zip(parts, masks)
            ])  # fmt: skip
        keys, values = (torch.cat([part[i] for part in parts]) for i in (0, 1))
        return Memory(keys, values, mask)


def _padded(memory: Memory, length: int) -> tuple[torch.Tensor, ...]:
    """A memory's keys, values and mask, padded to ``length`` source positions."""
    extra = length - memory.keys.size(2)
    if not extra:
        return memory.keys, memory.values, memory.mask
    keys, values = (F.pad(t, (0, 0, 0, extra)) for t in (memory.keys, memory.values))
    mask = memory.mask
    if mask is None:
        mask = keys.new_zeros(keys.size(0), 1, 1, length - extra)
    return keys, values, F.pad(mask, (0, extra), value=float("-inf"))


class MultiHeadAttention(Block):
    """The shared core: split heads, attend, merge heads, apply W_O.

    ``heads`` heads of ``head_dim`` each (by default d_model / heads): the heads'
    total width ``inner`` is d_model, except in a pruned model, whose modules keep
    fewer heads of the original width (``rosetta.evaluate.heads``).
    """

    def __init__(
        self, d_model: int, heads: int, dropout: float = 0.0, head_dim: int | None = None
    ) -> None:
        super().__init__()
        if head_dim is None:
            if d_model % heads:
                raise ValueError(f"d_model {d_model} is not divisible by {heads} heads")
            head_dim = d_model // heads
        self.heads = heads
        self.head_dim = head_dim
        self.inner = heads * head_dim  # the width of the concatenated heads
        self.d_model = d_model
        self.dropout = dropout
        self.out_proj = Linear(self.inner, d_model)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        # (batch, len, d_model) -> (batch, heads, len, head_dim)
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, context: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = context.shape
        # (batch, heads, len, head_dim) -> (batch, len, d_model)
        return context.transpose(1, 2).reshape(batch, length, self.inner)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention product of every path (see ``attention``); what a variant
        overrides."""
        dropout = self.dropout if self.training else 0.0
        return attention(q, k, v, mask, causal, dropout, need_weights)


class SelfAttention(MultiHeadAttention):
    """Q, K and V from the same sequence, with one fused W_QKV projection."""

    def __init__(
        self, d_model: int, heads: int, dropout: float = 0.0, head_dim: int | None = None
    ) -> None:
        super().__init__(d_model, heads, dropout, head_dim)
        self.qkv_proj = Linear(d_model, 3 * self.inner)

    def forward(
        self,
        x: torch.Tensor,
        padding=None,
        causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A whole sequence: x (batch, len, d_model) -> (batch, len, d_model).

        ``padding`` (a ``SourcePadding``) masks padded keys; when it packs the
        real tokens, ``x`` and the output are their rows (tokens, d_model) and
        only the attention product sees the padded layout.
        """
        qkv = self.qkv_proj(x)
        mask = None
        if padding is not None:
            qkv, mask = padding.unpack(qkv), padding.mask
        q, k, v = (self.split_heads(t) for t in qkv.chunk(3, dim=-1))
        context, weights = self.attend(q, k, v, mask, causal, need_weights)
        context = self.merge_heads(context)
        if padding is not None:
            context = padding.pack(context)
        return self.out_proj(context), weights

    def new_cache(self) -> KVCache:
        """The decoding state ``step`` carries (a variant keeps its own kind)."""
        return KVCache()

    def step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new position per row, x (batch, d_model), against the cached keys and
        values of the positions before it (which it joins) -> (batch, d_model)."""
        batch = x.size(0)
        # (batch, 3 * d_model) -> (batch, 1 position, q/k/v, heads, head_dim)
        qkv = self.qkv_proj(x).view(batch, 1, 3, self.heads, self.head_dim)
        k, v = cache.append(qkv[:, :, 1:])
        q = qkv[:, :, 0].transpose(1, 2)  # (batch, heads, 1, head_dim)
        # one query sees every cached key of its row (mask: rows that began later)
        context, _ = self.attend(q, k, v, cache.mask())
        return self.out_proj(context.view(batch, self.inner))


class CrossAttention(MultiHeadAttention):
    """Q from the decoder, K and V from the encoder output (fused W_KV)."""

    def __init__(
        self, d_model: int, heads: int, dropout: float = 0.0, head_dim: int | None = None
    ) -> None:
        super().__init__(d_model, heads, dropout, head_dim)
        self.q_proj = Linear(d_model, self.inner)
        self.kv_proj = Linear(d_model, 2 * self.inner)

    def project_memory(self, memory: torch.Tensor, padding=None) -> Memory:
        """Keys and values of the encoder output (batch, src_len, d_model), once per
        batch; with a packing ``padding``, for the real tokens only (zero at padded
        positions, which the mask hides). Contiguous: every step reads them."""
        if padding is None:
            kv, mask = self.kv_proj(memory), None
        else:
            kv = padding.unpack(self.kv_proj(padding.pack(memory)))
            mask = padding.additive_mask(kv.dtype)
        k, v = (self.split_heads(t).contiguous() for t in kv.chunk(2, dim=-1))
        return Memory(k, v, mask)

    def forward(
        self, x: torch.Tensor, memory: Memory, group: int = 1, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (batch, len, d_model) -> (batch, len, d_model), with batch = sources *
        ``group``: a source's ``group`` rows (its beam) become one longer query
        sequence against its single copy of the memory."""
        batch, length, _ = x.shape
        queries = x.reshape(batch // group, group * length, self.d_model)
        q = self.split_heads(self.q_proj(queries))
        context, weights = self.attend(
            q, memory.keys, memory.values, memory.mask, False, need_weights
        )
        out = self.out_proj(self.merge_heads(context))
        return out.view(batch, length, self.d_model), weights

    def step(self, x: torch.Tensor, memory: Memory, group: int) -> torch.Tensor:
        """One new position per row, x (batch, d_model) -> (batch, d_model): as
        ``forward`` with a sequence of one, a source's group as its queries."""
        batch = x.size(0)
        # (batch, d_model) -> (sources, heads, group, head_dim)
        q = self.q_proj(x).view(-1, group, self.heads, self.head_dim).transpose(1, 2)
        context, _ = self.attend(q, memory.keys, memory.values, memory.mask)
        return self.out_proj(context.transpose(1, 2).reshape(batch, self.inner))
