"""What a training run reports as it goes: ``metrics.jsonl`` (one JSON object a
line, for plots) and the progress bar, or a plain line a ``log_every`` steps
where there is no terminal (a log file).

The loss terms are summed on the device every step and read on the host only
every ``train.log_every`` steps, so logging costs no host sync per step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rosetta.config import TrainConfig, parse_duration
from rosetta.train.distributed import Context
from rosetta.train.progress import Progress


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (for plots); with no
    path (a process other than rank 0) it writes nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _eta(seconds: float) -> str:
    return f"{seconds / 3600:.1f}h" if seconds >= 5940 else f"{seconds / 60:.1f}m"


class TrainingLog:
    """The training side of the log: per window of ``train.log_every`` steps, each
    loss term summed over the processes per target token (per sentence for a
    sentence-level objective), the learning rate,
    target tokens/s and an ETA (by whichever of ``max_steps`` and ``max_time`` ends
    the run first)."""

    def __init__(
        self, tc: TrainConfig, progress: Progress, metrics: MetricsLog, context: Context, log
    ) -> None:
        self.tc, self.metrics, self.context, self.log = tc, metrics, context, log
        self.max_time = parse_duration(tc.max_time) if tc.max_time else math.inf
        self.bar = tqdm(
            total=tc.max_steps or None,
            initial=progress.step,
            unit="step",
            dynamic_ncols=True,
            disable=None if context.is_main else True,
            bar_format="{n_fmt}/{total_fmt} steps [{elapsed}{postfix}]",  # ETA in the postfix
        )
        self._start_window(time.monotonic())

    def _start_window(self, now: float) -> None:
        self.tokens, self.units, self.steps, self.start = 0, 0, 0, now
        self.terms: dict[str, torch.Tensor] = {}

    def add(self, tokens: int, terms: dict[str, torch.Tensor], units: int) -> None:
        """One update made: its target tokens, its summed loss terms (tensors) and the
        count they are shown per (of the objective's unit: tokens or sentences)."""
        self.tokens += tokens
        self.units += units
        self.steps += 1
        for name, value in terms.items():  # on the device: no host sync until written
            self.terms[name] = self.terms.get(name, 0.0) + value
        self.bar.update(1)

    def write(self, progress: Progress, lr: float, extra: dict[str, Any]) -> None:
        """Shows and writes the window that ends at ``progress.step`` (every process
        calls it: the sum over processes is a collective) with the objective's
        ``extra`` numbers, and starts the next window."""
        now = time.monotonic()
        seconds = max(now - self.start, 1e-9)
        summed = self.context.sum(self.terms)  # over processes
        per_unit = {k: float(v) / max(self.units, 1) for k, v in summed.items()}
        shown = {name: f"{value:.3f}" for name, value in per_unit.items()}
        shown.update(lr=f"{lr:.2e}", tok_s=f"{self.tokens / seconds:,.0f}")
        left = [self.max_time - progress.elapsed]
        if self.tc.max_steps:
            left.append((self.tc.max_steps - progress.step) * seconds / self.steps)
        if min(left) < math.inf:  # whichever limit ends the run first
            shown["eta"] = _eta(max(min(left), 0.0))
        self.bar.set_postfix(shown)
        if self.bar.disable:  # no terminal (a log file): one plain line instead
            self.log(f"step {progress.step} " + " ".join(f"{k} {v}" for k, v in shown.items()))
        self.metrics.write(
            {
                "type": "train",
                "step": progress.step,
                "epoch": progress.epoch + 1,
                **per_unit,  # "loss", "nll" and any term the objective adds
                "lr": lr,
                **extra,  # the objective's own numbers (scheduled sampling's rate)
                "tgt_tokens_per_s": self.tokens / seconds,
                "elapsed": progress.elapsed,
            }
        )
        self._start_window(now)

    def close(self) -> None:
        self.bar.close()
