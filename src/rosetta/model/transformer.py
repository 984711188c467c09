"""The Transformer of "Attention Is All You Need" assembled from its parts.

``forward`` is the teacher-forced training path; ``encode`` /
``init_state`` / ``decode_step`` implement the incremental interface of
``rosetta.model.interface`` for search; ``attention_maps`` returns every
head's weights for plotting.
"""

from __future__ import annotations

import torch
from torch import nn

from rosetta.config import ModelConfig
from rosetta.data.tokenizer import PAD_ID
from rosetta.model.attention import KVCache
from rosetta.model.decoder import Decoder, DecoderLayer
from rosetta.model.embeddings import (
    EmbeddingBlock,
    LearnedPositions,
    SinusoidalPositions,
    TokenEmbedding,
)
from rosetta.model.encoder import Encoder, EncoderLayer
from rosetta.model.incremental import DecoderStep, inference_linear
from rosetta.model.interface import DecoderState, EncoderOutput
from rosetta.model.linear import Linear
from rosetta.model.packing import Packing


def _positions(cfg: ModelConfig) -> nn.Module:
    if cfg.positional == "learned":
        return LearnedPositions(cfg.d_model, cfg.max_positions)
    return SinusoidalPositions(cfg.d_model, cfg.max_positions)


def attention_mask(pad_mask: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """(batch, 1, 1, src_len), True where attention is allowed; None when no row has
    padding (a batch of one sentence, or of equal lengths), which SDPA runs faster.

    With a floating ``dtype``, the mask is additive instead (0 or -inf), the form
    SDPA converts a boolean mask to at every call: search, which attends to the
    same memory at every step, converts it once.
    """
    if not bool(pad_mask.any()):
        return None
    if dtype is None:
        return ~pad_mask[:, None, None, :]
    additive = torch.zeros(pad_mask.shape, dtype=dtype, device=pad_mask.device)
    return additive.masked_fill_(pad_mask, float("-inf"))[:, None, None, :]


class Transformer(nn.Module):
    """Encoder-decoder Transformer with optional tied embeddings."""

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        tgt_tokens = TokenEmbedding(tgt_vocab_size, cfg.d_model)
        share_all = cfg.tie_all and src_vocab_size == tgt_vocab_size
        src_tokens = tgt_tokens if share_all else TokenEmbedding(src_vocab_size, cfg.d_model)
        self.src_embed = EmbeddingBlock(src_tokens, _positions(cfg), cfg.dropout)
        self.tgt_embed = EmbeddingBlock(tgt_tokens, _positions(cfg), cfg.dropout)
        layer_args = (cfg.d_model, cfg.heads, cfg.d_ff, cfg.dropout, cfg.attention_dropout)
        layer_kwargs = dict(activation=cfg.activation, norm=cfg.norm)
        self.encoder = Encoder(
            [EncoderLayer(*layer_args, **layer_kwargs) for _ in range(cfg.encoder_layers)],
            cfg.d_model,
            cfg.norm,
        )
        self.decoder = Decoder(
            [DecoderLayer(*layer_args, **layer_kwargs) for _ in range(cfg.decoder_layers)],
            cfg.d_model,
            cfg.norm,
        )
        self.output = Linear(cfg.d_model, tgt_vocab_size, bias=False)
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

    # ---- training path -------------------------------------------------------------
    def forward(
        self, src: torch.Tensor, tgt_in: torch.Tensor, label_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher forcing: src (batch, src_len), tgt_in (batch, tgt_len) ->
        logits (batch, tgt_len, tgt_vocab).

        With ``label_mask`` (batch, tgt_len), only the positions where it is True
        are projected to the vocabulary: logits (tokens, tgt_vocab). Training
        passes the non-padding labels, so no time goes into padding logits.
        """
        encoded = self.encode(src)
        state = self.init_state(encoded)
        x = self.tgt_embed(tgt_in)
        x = self.decoder(x, state.sources["memory_kv"], state.sources["memory_mask"])
        if label_mask is not None:
            x = x[label_mask]  # (tokens, d_model)
        return self.output(x)

    # ---- incremental interface -----------------------------------------------------
    def encode(self, src: torch.Tensor, need_weights: bool = False) -> EncoderOutput:
        """src (batch, src_len) -> H_enc (batch, src_len, d_model) and its padding mask."""
        pad_mask = src.eq(PAD_ID)
        packing = Packing.worthwhile(~pad_mask)  # None without enough padding
        memory, self._encoder_weights = self.encoder(
            self.src_embed(src), attention_mask(pad_mask), need_weights, packing
        )
        return EncoderOutput(memory=memory, pad_mask=pad_mask, packing=packing)

    def init_state(self, encoder_output: EncoderOutput) -> DecoderState:
        """Projects H_enc to every decoder layer's cross-attention K/V, once."""
        memory_kv = [
            layer.cross_attn.project_memory(encoder_output.memory, encoder_output.packing)
            for layer in self.decoder.layers
        ]
        dtype = None
        if self._searching():  # read at every step: one contiguous block per head
            memory_kv = [(k.contiguous(), v.contiguous()) for k, v in memory_kv]
            dtype = encoder_output.memory.dtype
        mask = attention_mask(encoder_output.pad_mask, dtype)
        caches = [KVCache() for _ in self.decoder.layers]
        return DecoderState(
            tensors={"caches": caches}, sources={"memory_kv": memory_kv, "memory_mask": mask}
        )

    def _searching(self) -> bool:
        """Eval mode without gradients: the search paths (``DecoderStep``, the
        additive source mask) apply."""
        return not (self.training or torch.is_grad_enabled())

    def decode_step(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """tokens (batch,) at position ``state.step`` -> logits (batch, tgt_vocab).

        For search (eval mode, no gradients) the step runs through ``DecoderStep``,
        which fetches the weights once per search; otherwise through the modules.
        """
        x = self.tgt_embed(tokens[:, None], offset=state.step)  # (batch, 1, d_model)
        state.step += 1
        caches, memory_kv = state.tensors["caches"], state.sources["memory_kv"]
        memory_mask = state.sources["memory_mask"]
        if not self._searching():
            x = self.decoder(x, memory_kv, memory_mask, caches, group=state.group)
            return self.output(x[:, -1])
        if "decoder_step" not in state.fixed:
            state.fixed["decoder_step"] = DecoderStep(self.decoder)
            state.fixed["output"] = inference_linear(self.output)
        x = state.fixed["decoder_step"](x[:, 0], caches, memory_kv, memory_mask, state.group)
        return state.fixed["output"](x)

    # ---- inspection ----------------------------------------------------------------
    @torch.no_grad()
    def attention_maps(
        self, src: torch.Tensor, tgt_in: torch.Tensor
    ) -> dict[str, list[torch.Tensor]]:
        """Every head's weights for a teacher-forced pass (use the model's own output
        as ``tgt_in`` to see what it attended to while translating).

        Returns lists over layers of (batch, heads, q_len, k_len) tensors under
        ``encoder_self``, ``decoder_self`` and ``cross``.
        """
        encoded = self.encode(src, need_weights=True)
        state = self.init_state(encoded)
        self.decoder(
            self.tgt_embed(tgt_in),
            state.sources["memory_kv"],
            state.sources["memory_mask"],
            need_weights=True,
        )
        return {
            "encoder_self": list(self._encoder_weights),
            "decoder_self": [layer.self_weights for layer in self.decoder.layers],
            "cross": [layer.cross_weights for layer in self.decoder.layers],
        }
