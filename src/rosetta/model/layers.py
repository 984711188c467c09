"""Building blocks shared by the encoder and decoder layers.

Both are called as plain methods (``Residual.around``, ``FeedForward.forward``)
from the layers' ``forward`` and ``step`` alike: a decoding step is many small
operations, and the ``nn.Module`` call machinery around each would cost more
than some of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rosetta.model.linear import Linear, project

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu}


class FeedForward(nn.Module):
    """Position-wise FFN: Linear(d_model, d_ff) -> ReLU/GELU -> dropout -> Linear(d_ff, d_model).

    The dropout on the hidden activation is fairseq's ``activation_dropout``;
    the paper only drops sub-layer outputs (which ``Residual`` does).
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.fc1 = Linear(d_model, d_ff)
        self.fc2 = Linear(d_ff, d_model)
        self.activation = activation
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = ACTIVATIONS[self.activation](project(self.fc1, x))
        if self.dropout and self.training:
            hidden = F.dropout(hidden, self.dropout)
        return project(self.fc2, hidden)


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
        self.dropout = dropout
        self.pre = norm == "pre"

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def around(self, x: torch.Tensor, sublayer: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        """The sub-layer ``sublayer(x, *args)`` with its residual and LayerNorm."""
        out = sublayer(self.normalize(x) if self.pre else x, *args)
        if self.dropout and self.training:
            out = F.dropout(out, self.dropout)
        return x + out if self.pre else self.normalize(x + out)

    forward = around

    @classmethod
    def of(cls, cfg) -> Residual:
        """The residual wrapper a Transformer configuration describes."""
        return cls(cfg.d_model, cfg.dropout, cfg.norm)


def final_norm(cfg) -> nn.Module:
    """The LayerNorm a pre-norm stack ends with (a post-norm one has none)."""
    return nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
