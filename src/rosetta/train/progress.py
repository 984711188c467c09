"""Where a run stands, the data from there on, and whether the run is over.

``Progress`` is what ``last.pt`` saves of the loop itself: the step, the data
position (epoch and batch index), the clock, the validation history and what
early stopping and the plateau schedule count. The data position is enough to
continue the data exactly: an epoch's batch order is a pure function of the
seed and the epoch number (``rosetta.data.batching.BatchIterator``), so
``updates`` rebuilds it and skips the batches already trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rosetta.config import TrainConfig, parse_duration
from rosetta.data.batching import BatchIterator, Update


@dataclass
class Progress:
    """Where training stands; saved in ``last.pt`` (its fields are the checkpoint's
    ``progress``: renaming one breaks resuming older runs)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed: float = 0.0
    best_score: float = -math.inf
    best_step: int = 0
    bad_validations: int = 0
    lr_scale: float = 1.0  # the plateau schedule's accumulated decay
    nonfinite_skipped: int = 0  # batches skipped for a NaN/inf loss or gradient, in all
    nonfinite_in_row: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def updates(
    batches: BatchIterator,
    progress: Progress,
    per_rank: int = 1,
    rank: int = 0,
    world_size: int = 1,
    max_epochs: int = 0,
) -> Iterator[Update]:
    """The updates from ``progress``'s data position on, epoch after epoch, until
    ``max_epochs`` epochs are done (never, with 0).

    Moves the position as it goes: ``progress.batch_in_epoch`` is the position
    after an update as soon as it is handed out (a checkpoint saved while it is
    trained on resumes after it), and an epoch's end moves to the start of the
    next. ``per_rank``, ``rank`` and ``world_size``: see ``BatchIterator.updates``.
    """
    while not max_epochs or progress.epoch < max_epochs:
        for update in batches.updates(
            progress.epoch, progress.batch_in_epoch, per_rank, rank, world_size
        ):
            progress.batch_in_epoch = update.end
            yield update
        progress.epoch += 1
        progress.batch_in_epoch = 0


def finished(progress: Progress, tc: TrainConfig) -> str:
    """Why the run is over, or '' while it goes on (checked after every step): the
    step, time or epoch budget of ``tc``, or ``patience`` validations without
    progress."""
    if tc.max_steps and progress.step >= tc.max_steps:
        return f"max_steps {tc.max_steps} reached"
    if tc.max_time and progress.elapsed >= parse_duration(tc.max_time):
        return f"time budget {tc.max_time} reached"
    if tc.max_epochs and progress.epoch >= tc.max_epochs:
        return f"max_epochs {tc.max_epochs} reached"
    if tc.patience and progress.bad_validations >= tc.patience:
        return f"no improvement in {tc.patience} validations"
    return ""
