"""Dynamic int8 quantization of a model's linear layers, for CPU inference.

It stays on PyTorch's ``torch.ao.quantization.quantize_dynamic``, which PyTorch
2.13 calls deprecated: torchao 0.18, its successor, decoded 2-5x slower on a CPU
than it, and slower than float32 (``benchmarks/int8.py``, issue 32).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from rosetta.model.layers import resync_blocks
from rosetta.model.linear import as_plain_linear


def quantize_int8(model: nn.Module) -> nn.Module:
    """Every linear layer quantized (weights int8, activations quantized on the fly),
    on the plain ``nn.Linear`` form PyTorch knows (``as_plain_linear``), with every
    ``Block``'s attributes pointed at the quantized layers (``resync_blocks``:
    ``quantize_dynamic`` swaps modules behind them). CPU only."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("dynamic int8 quantization runs on the CPU only")
    with warnings.catch_warnings():
        # PyTorch 2.13 announces the removal of torch.ao.quantization and of quantized
        # tensors (torchao takes over); the API still works: keep terminals clean
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        quantized = torch.ao.quantization.quantize_dynamic(
            as_plain_linear(model), {nn.Linear}, dtype=torch.qint8
        )
    return resync_blocks(quantized)
