"""Token embeddings and positional encodings (SPEC §1 steps 4 and 6)."""

from __future__ import annotations

import math

import torch
from torch import nn

from rosetta.data.tokenizer import PAD_ID
from rosetta.model.layers import Block


class TokenEmbedding(nn.Module):
    """Embedding lookup scaled by sqrt(d_model), as in the paper (section 3.4).

    Weights start at N(0, d_model^-1/2) so that the scaled embedding has unit
    variance and the (possibly tied) output projection starts with small logits.
    """

    def __init__(self, vocab_size: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        nn.init.normal_(self.weight, mean=0.0, std=d_model**-0.5)
        with torch.no_grad():
            self.weight[PAD_ID].zero_()
        self.scale = math.sqrt(d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # (batch, len) -> (batch, len, d_model)
        return nn.functional.embedding(ids, self.weight, padding_idx=PAD_ID) * self.scale


class SinusoidalPositions(nn.Module):
    """Fixed sinusoids: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...).

    The paper's interleaved layout (sin on even, cos on odd features) by default;
    ``halves=True`` puts every sine first and every cosine after them, as Marian
    does (with the same frequencies), which a model trained so needs exactly.
    """

    def __init__(self, d_model: int, max_positions: int, halves: bool = False) -> None:
        super().__init__()
        position = torch.arange(max_positions, dtype=torch.float32).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_positions, d_model)
        sines, cosines = torch.sin(position * frequency), torch.cos(position * frequency)
        if halves:
            split = (d_model + 1) // 2
            table[:, :split] = sines
            table[:, split:] = cosines[:, : d_model - split]
        else:
            table[:, 0::2] = sines
            table[:, 1::2] = cosines[:, : d_model // 2]
        self.register_buffer("table", table, persistent=False)

    def forward(self, length: int, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """(length, d_model) encodings of positions ``offset .. offset+length-1``; with
        an offset per row, (batch,), (batch, length, d_model) (rows of different ages
        in one search step; the search keeps them within ``max_positions``)."""
        if isinstance(offset, torch.Tensor):
            return self.table[offset[:, None] + torch.arange(length, device=offset.device)]
        if offset + length > self.table.size(0):
            raise ValueError(
                f"sequence of {offset + length} positions exceeds max_positions "
                f"({self.table.size(0)})"
            )
        return self.table[offset : offset + length]


class LearnedPositions(nn.Module):
    """A trained embedding per position (the paper's alternative, Table 3 row E)."""

    def __init__(self, d_model: int, max_positions: int) -> None:
        super().__init__()
        self.table = nn.Embedding(max_positions, d_model)
        nn.init.normal_(self.table.weight, mean=0.0, std=d_model**-0.5)

    def forward(self, length: int, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """As ``SinusoidalPositions.forward``."""
        if isinstance(offset, torch.Tensor):
            return self.table(offset[:, None] + torch.arange(length, device=offset.device))
        positions = torch.arange(offset, offset + length, device=self.table.weight.device)
        return self.table(positions)


class EmbeddingBlock(Block):
    """Token embedding + positional encoding + dropout: the input of a stack."""

    def __init__(self, tokens: TokenEmbedding, positions: nn.Module, dropout: float) -> None:
        super().__init__()
        self.tokens = tokens
        self.positions = positions
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
        # (batch, len) -> (batch, len, d_model)
        return self.dropout(self.tokens(ids) + self.positions(ids.size(1), offset))
