"""Training runs of a benchmark, each in its own experiment folder on a copy of
one prepared corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

from rosetta.config import ExperimentConfig
from rosetta.train import checkpoint
from rosetta.train.trainer import train


def trained(config: ExperimentConfig, prepared: Path, restart: bool = False) -> Path:
    """``config``'s model directory, trained on a copy of the prepared data unless it
    exists. A run stopped part-way resumes from its ``last.pt``, or, with
    ``restart`` (runs compared at equal wall time, whose clock a resume would not
    keep equal), starts again."""
    experiment = config.experiment_dir
    if (experiment / "model").exists():
        return experiment / "model"
    if restart and experiment.exists():
        shutil.rmtree(experiment)
    for part in ("corpus", "data", "tokenizer"):
        if (prepared / part).exists() and not (experiment / part).exists():
            shutil.copytree(prepared / part, experiment / part)
    last = experiment / "checkpoints" / checkpoint.LAST
    return train(config, resume=last.exists())
