"""One optimizer update: Adam with the learning-rate schedule, gradient
accumulation, mixed precision, clipping, and the skip of a non-finite batch.

``Optimisation.backward`` runs the objective's loss forward and backward over
this process's micro-batches of an update; the trainer then asks the processes
whether the loss was finite everywhere (``Context.agree``) and calls ``step``,
which clips and applies the gradients as the next update, or throws them away
and counts the batch when the loss or the gradient norm is NaN or infinite
(``train.max_nonfinite`` of them in a row stop the run with a ``TrainingError``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from rosetta.config import ExperimentConfig
from rosetta.data.batching import Update
from rosetta.train.distributed import Context
from rosetta.train.progress import Progress
from rosetta.train.schedule import learning_rate


class TrainingError(RuntimeError):
    """Training that cannot go on; the message says why."""


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision on a GPU (bf16 where supported, else fp16); fp32 on a CPU."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "fp16" or (setting == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def build_optimizer(model: torch.nn.Module, config: ExperimentConfig) -> torch.optim.Optimizer:
    """Adam with the paper's betas/eps; the fused kernel where this PyTorch has one
    for the device (CUDA, and CPU from PyTorch 2.4 on)."""
    tc = config.train
    options = dict(lr=0.0, betas=tc.betas, eps=tc.eps, weight_decay=tc.weight_decay)
    try:
        return torch.optim.Adam(model.parameters(), fused=True, **options)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), **options)


class Optimisation:
    """The optimizer, the gradient scaler (fp16 only) and the module whose forward
    is ``objective``'s loss of ``model`` (DDP around it when several processes
    train: build this after loading resumed weights, as DDP copies rank 0's)."""

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Any,
        config: ExperimentConfig,
        context: Context,
        log=print,
    ) -> None:
        self.model, self.context, self.log = model, context, log
        self.tc, self.d_model = config.train, config.model.d_model
        self.optimizer = build_optimizer(model, config)
        amp_dtype = autocast_dtype(self.tc.amp, context.device)
        self.scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
        self.autocast = (
            torch.autocast(context.device.type, dtype=amp_dtype)
            if amp_dtype
            else contextlib.nullcontext()
        )
        self.module = context.wrap(model, objective)
        self.unit = objective.unit

    def backward(self, update: Update, step: int) -> dict[str, torch.Tensor]:
        """Forward and backward over this process's micro-batches of ``update``, the
        ``step``-th (counting from 0); returns the objective's terms summed over them,
        detached and on the device (no host sync)."""
        summed: dict[str, torch.Tensor] = {}
        normaliser = update.count(self.unit)
        last = len(update.batches) - 1
        for k, batch in enumerate(update.batches):
            with self.context.accumulating(self.module, last=k == last):
                with self.autocast:
                    terms = self.module(batch.to(self.context.device), step)
                # DDP averages gradients over processes: scaled so, they are the
                # single-process gradient of the update's loss per target token (per
                # sentence, for an objective whose unit is the sentence)
                loss = terms["loss"] * self.context.world_size / normaliser
                self.scaler.scale(loss).backward()
            for name, value in terms.items():
                summed[name] = summed.get(name, 0.0) + value.detach()
        return summed

    def step(self, finite: bool, progress: Progress) -> float | None:
        """Applies the accumulated gradients as update ``progress.step + 1`` and
        returns its learning rate; or, when the loss was not ``finite`` (on some
        process) or the clipped gradient norm is not, drops them, counts the batch in
        ``progress`` and returns None. Raises ``TrainingError`` at
        ``train.max_nonfinite`` such batches in a row."""
        tc = self.tc
        if finite and tc.clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_norm)
            # with fp16 the scaler itself skips steps whose gradients overflowed
            # (the gradients are averaged: every process sees the same norm)
            finite = self.scaler.is_enabled() or bool(torch.isfinite(norm))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            progress.nonfinite_skipped += 1
            progress.nonfinite_in_row += 1
            self.log(
                f"skipped a batch with a non-finite loss or gradient after step "
                f"{progress.step} ({progress.nonfinite_skipped} so far)"
            )
            if progress.nonfinite_in_row >= tc.max_nonfinite:
                raise TrainingError(
                    f"{progress.nonfinite_in_row} batches in a row gave a NaN or infinite "
                    f"loss at step {progress.step}: training stopped (lower train.lr, raise "
                    "train.warmup or check the data); the last checkpoint is untouched"
                )
            return None
        progress.nonfinite_in_row = 0
        progress.step += 1
        lr = progress.lr_scale * learning_rate(
            progress.step, tc.schedule, self.d_model, tc.warmup, tc.lr
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def state_dict(self) -> dict[str, Any]:
        """What ``last.pt`` keeps of it: the optimizer's and the scaler's states."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
