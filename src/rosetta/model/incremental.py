"""The Transformer decoder's search step, one position at a time, straight from
the weights.

Search calls ``decode_step`` once per output token, with one row per hypothesis.
Through the modules, that step is hundreds of small operator calls, each behind
Python bookkeeping (module calls, hooks, closures, reshapes of (batch, 1,
d_model) tensors), and on a CPU the bookkeeping costs more than the arithmetic:
on this project's 2-core machine a 3-layer decoder with d_model 8, nearly all
overhead, took 2.9 ms per step through the modules and takes 0.9 ms here; the
``small`` preset at batch 1 went from 4.8 to 3.0 ms per step, at batch 32 from
11.5 to 8.8 ms.

``DecoderStep`` does the same arithmetic as ``DecoderLayer`` in its incremental
form, with everything that stays fixed during one search fetched once, at the
search's first step: the layers' weights in their inference layouts
(``Linear``'s transposed or oneDNN-packed copies), LayerNorm parameters, sizes. Rows are
(batch, d_model) throughout; each sub-layer is a handful of direct calls.

Attention from one new position per hypothesis is either PyTorch's fused
kernel (SDPA) or, for many hypotheses on a CPU, two batched matrix products
over (batch * heads) rows that read the cache where it lies. Measured on the
2-core machine, ``small`` (4 heads of 64), 160 hypotheses (beam 5 over 32
sentences), data hot in cache: self-attention over 16 cached positions 244
against 532 us, cross-attention from groups of 5 to 28 source positions 312
against 500 us; at 32 hypotheses the two are within noise, and below that SDPA
is faster. With the cache's faster reorder (``KVCache.select_rows``), beam 5
at batch 32 went from ~707 to ~738 tokens/s (medians of 6 alternating runs).

It is used when nothing needs gradients or attention weights, with the model in
eval mode (``Transformer.decode_step`` decides). ``tests/test_transformer.py``
checks it against the module path and the full teacher-forced pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rosetta.model.attention import KVCache
from rosetta.model.decoder import Decoder, DecoderLayer
from rosetta.model.linear import Linear

MATMUL_MIN_ROWS = 64  # hypotheses from which attention runs as batched matrix products


def attend_by_matmul(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Scaled dot-product attention as two batched matrix products: q (n, q_len,
    head_dim), k and v (n, k_len, head_dim) in any strides, ``bias`` (n, q_len,
    k_len) added to the scores (0 or -inf) or None -> (n, q_len, head_dim)."""
    scale = q.size(-1) ** -0.5
    if bias is None:
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    else:
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    return torch.bmm(scores.softmax(dim=-1), v)


def inference_linear(linear: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """One linear layer for inference, ``(rows, in) -> (rows, out)``: a rosetta
    ``Linear`` on the CPU in fp32 through its ``InferenceWeights``; any other layer
    (``nn.Linear``, PyTorch's dynamically quantized linear, another device) as it is.
    """
    weight = getattr(linear, "weight", None)
    if isinstance(linear, Linear) and weight.device.type == "cpu" and weight.dtype == torch.float32:
        return linear.inference_weights()
    return linear


@dataclass
class LayerWeights:
    """What one decoder layer's step reads."""

    self_norm: tuple[torch.Tensor, torch.Tensor]
    qkv: Callable[[torch.Tensor], torch.Tensor]
    self_out: Callable[[torch.Tensor], torch.Tensor]
    cross_norm: tuple[torch.Tensor, torch.Tensor]
    cross_q: Callable[[torch.Tensor], torch.Tensor]
    cross_out: Callable[[torch.Tensor], torch.Tensor]
    ff_norm: tuple[torch.Tensor, torch.Tensor]
    fc1: Callable[[torch.Tensor], torch.Tensor]
    fc2: Callable[[torch.Tensor], torch.Tensor]
    activation: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of(cls, layer: DecoderLayer) -> LayerWeights:
        def norm(residual) -> tuple[torch.Tensor, torch.Tensor]:
            return residual.norm.weight, residual.norm.bias

        gelu = isinstance(layer.feed_forward.activation, torch.nn.GELU)
        return cls(
            self_norm=norm(layer.self_residual),
            qkv=inference_linear(layer.self_attn.qkv_proj),
            self_out=inference_linear(layer.self_attn.out_proj),
            cross_norm=norm(layer.cross_residual),
            cross_q=inference_linear(layer.cross_attn.q_proj),
            cross_out=inference_linear(layer.cross_attn.out_proj),
            ff_norm=norm(layer.ff_residual),
            fc1=inference_linear(layer.feed_forward.fc1),
            fc2=inference_linear(layer.feed_forward.fc2),
            activation=F.gelu if gelu else F.relu,
        )


class DecoderStep:
    """The decoder stack's incremental step: x (batch, d_model) at one new position
    -> the final hidden state (batch, d_model)."""

    def __init__(self, decoder: Decoder) -> None:
        first = decoder.layers[0]
        self.heads = first.self_attn.heads
        self.head_dim = first.self_attn.head_dim
        self.d_model = self.heads * self.head_dim
        self.pre_norm = first.self_residual.pre
        self.layers = [LayerWeights.of(layer) for layer in decoder.layers]
        final = decoder.final_norm
        self.final_norm = (final.weight, final.bias) if self.pre_norm else None

    def _norm(self, x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.layer_norm(x, (self.d_model,), *params)

    def _residual(self, x: torch.Tensor, norm, sublayer, *args) -> torch.Tensor:
        """Pre-norm x + f(LN(x)), or post-norm LN(x + f(x))."""
        if self.pre_norm:
            return x + sublayer(self._norm(x, norm), *args)
        return self._norm(x + sublayer(x, *args), norm)

    def _self_attention(
        self, h: torch.Tensor, weights: LayerWeights, cache: KVCache, by_matmul: bool
    ):
        batch = h.size(0)
        # (batch, 3 * d_model) -> (batch, 1 position, q/k/v, heads, head_dim)
        qkv = weights.qkv(h).view(batch, 1, 3, self.heads, self.head_dim)
        k, v = cache.append(qkv[:, :, 1:])
        q = qkv[:, :, 0].transpose(1, 2)  # (batch, heads, 1, head_dim)
        if by_matmul:
            context = attend_by_matmul(q.reshape(-1, 1, self.head_dim), *cache.rows(), None)
        else:
            context = F.scaled_dot_product_attention(q, k, v)
        return weights.self_out(context.view(batch, self.d_model))

    def _cross_attention(
        self, h, weights: LayerWeights, memory_kv, memory_mask, group: int, by_matmul: bool
    ):
        """``memory_mask``: the additive source mask, (sources, 1, 1, src_len) for SDPA,
        (sources * heads, group, src_len) for ``attend_by_matmul``, or None."""
        batch, sources = h.size(0), h.size(0) // group
        # a source's hypotheses are one query sequence against its single memory:
        # (sources, heads, group, head_dim)
        q = weights.cross_q(h).view(sources, group, self.heads, self.head_dim).transpose(1, 2)
        if by_matmul:
            k, v = (t.flatten(0, 1) for t in memory_kv)  # (sources * heads, src_len, head_dim)
            context = attend_by_matmul(q.reshape(-1, group, self.head_dim), k, v, memory_mask)
            context = context.view(sources, self.heads, group, self.head_dim)
        else:
            context = F.scaled_dot_product_attention(q, *memory_kv, memory_mask)
        return weights.cross_out(context.transpose(1, 2).reshape(batch, self.d_model))

    @staticmethod
    def _feed_forward(h: torch.Tensor, weights: LayerWeights) -> torch.Tensor:
        return weights.fc2(weights.activation(weights.fc1(h)))

    def __call__(
        self,
        x: torch.Tensor,
        caches: list[KVCache],
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
        memory_mask: torch.Tensor | None,
        group: int,
    ) -> torch.Tensor:
        by_matmul = x.size(0) >= MATMUL_MIN_ROWS and x.device.type == "cpu"
        if by_matmul and memory_mask is not None:  # the same for every layer
            sources, *_, src_len = memory_mask.shape
            memory_mask = memory_mask.expand(sources, self.heads, group, src_len).reshape(
                -1, group, src_len
            )
        for weights, cache, memory in zip(self.layers, caches, memory_kv):
            x = self._residual(
                x, weights.self_norm, self._self_attention, weights, cache, by_matmul
            )
            x = self._residual(
                x,
                weights.cross_norm,
                self._cross_attention,
                weights,
                memory,
                memory_mask,
                group,
                by_matmul,
            )
            x = self._residual(x, weights.ff_norm, self._feed_forward, weights)
        return self._norm(x, self.final_norm) if self.final_norm is not None else x
