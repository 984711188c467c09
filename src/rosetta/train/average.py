"""Checkpoint averaging (the paper averages the last 5 checkpoints)."""

from __future__ import annotations

from pathlib import Path

import torch

from rosetta.train.checkpoint import CheckpointError, load


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the ``model`` weights of several checkpoints."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        weights = load(path)["model"]
        if total and weights.keys() != total.keys():
            raise CheckpointError(f"{path} holds a different model than {paths[0]}")
        for name, tensor in weights.items():
            if name in total:
                total[name] += tensor.double()
            else:
                total[name] = tensor.double().clone()
    return {name: (tensor / len(paths)).float() for name, tensor in total.items()}
