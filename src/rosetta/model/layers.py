"""Building blocks shared by the encoder and decoder layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rosetta.model.linear import Linear


class FeedForward(nn.Module):
    """Position-wise FFN: Linear(d_model, d_ff) -> ReLU/GELU -> dropout -> Linear(d_ff, d_model).

    The dropout on the hidden activation is fairseq's ``activation_dropout``;
    the paper only drops sub-layer outputs (which ``Residual`` does).
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.fc1 = Linear(d_model, d_ff)
        self.fc2 = Linear(d_ff, d_model)
        self.activation = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.activation(self.fc1(x))))


class Residual(nn.Module):
    """Residual connection with LayerNorm around one sub-layer.

    ``post`` is the paper's LayerNorm(x + Dropout(sublayer(x))). ``pre`` is
    x + Dropout(sublayer(LayerNorm(x))), a departure from the paper that trains
    stably without a long warm-up (Xiong et al., 2020); a pre-norm stack needs a
    final LayerNorm, which the encoder and decoder add.
    """

    def __init__(self, d_model: int, dropout: float, norm: str = "pre") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre = norm == "pre"

    def forward(
        self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        if self.pre:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))
