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

from rosetta.model.linear import Linear

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "swish": F.silu,
}


class Block(nn.Module):
    """An ``nn.Module`` whose submodules are also plain attributes of the instance.

    ``nn.Module`` keeps submodules in its ``_modules`` dict and finds them through
    ``__getattr__``, a fallback Python runs only after a failed normal lookup; a
    decoding step reads ~50 submodules that way. A ``Block`` also puts each one in
    its instance dict, where the normal lookup finds it at once. Registration is
    unchanged (``_modules`` still drives ``state_dict``, ``parameters``, ``to``), and
    ``nn.Module.__setattr__`` drops the instance-dict copy whenever the name is
    assigned again, so the two never disagree.
    """

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if isinstance(value, nn.Module):
            object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if name in self._modules:
            self.__dict__.pop(name, None)
        super().__delattr__(name)


def resync_blocks(model: nn.Module) -> nn.Module:
    """Points every ``Block``'s instance-dict copies at its registered submodules
    again. A tool that swaps submodules in ``_modules`` directly, bypassing
    ``__setattr__`` (PyTorch's ``quantize_dynamic`` does), would otherwise leave
    the model calling the modules it replaced."""
    for module in model.modules():
        if isinstance(module, Block):
            for name, child in module._modules.items():
                if name in module.__dict__:
                    object.__setattr__(module, name, child)
    return model


class FeedForward(Block):
    """Position-wise FFN: Linear(d_model, d_ff) -> ReLU/GELU -> dropout -> Linear(d_ff, d_model).

    The dropout on the hidden activation is fairseq's ``activation_dropout``;
    the paper only drops sub-layer outputs (which ``Residual`` does).
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.fc1 = Linear(d_model, d_ff)
        self.fc2 = Linear(d_ff, d_model)
        self.activation = ACTIVATIONS[activation]
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.activation(self.fc1(x))
        if self.dropout and self.training:
            hidden = F.dropout(hidden, self.dropout)
        return self.fc2(hidden)


class Residual(Block):
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
        self._norm_args = layer_norm_args(self.norm)

    def around(self, x: torch.Tensor, sublayer: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        """The sub-layer ``sublayer(x, *args)`` with its residual and LayerNorm."""
        out = sublayer(F.layer_norm(x, *self._norm_args) if self.pre else x, *args)
        if self.dropout and self.training:
            out = F.dropout(out, self.dropout)
        return x + out if self.pre else F.layer_norm(x + out, *self._norm_args)

    forward = around

    @classmethod
    def of(cls, cfg) -> Residual:
        """The residual wrapper a Transformer configuration describes."""
        return cls(cfg.d_model, cfg.dropout, cfg.norm)


def final_norm(cfg) -> nn.Module:
    """The LayerNorm a pre-norm stack ends with (a post-norm one has none)."""
    return nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()


def layer_norm_args(norm: nn.Module) -> tuple | None:
    """A LayerNorm's arguments to ``F.layer_norm`` after the input, to keep as a plain
    attribute for calls at every decoding step (parameters are updated in place,
    never replaced, so these stay current); None for ``nn.Identity``."""
    if isinstance(norm, nn.LayerNorm):
        return (norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return None
