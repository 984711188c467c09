"""The training loop (SPEC §1 steps 9–11), flat and top to bottom.

One call, ``train(config)``, runs: build the model and its objective → Adam
with warm-up → epochs of token-budget batches (with gradient accumulation) →
periodic validation (loss and greedy BLEU) → checkpoints → early stopping or
budget → the model directory. The loop calls one part per concern, each a
module that can be read and tested alone:

- ``objectives``: what a step minimises and what validation reports (teacher
  forcing, scheduled sampling, NAT's masked LM, the sequence-level risk and
  REINFORCE of ``sequence_level``), chosen by ``objective_for``;
- ``progress``: where the run stands, the updates from there, its limits;
- ``optimisation``: forward/backward over an update's micro-batches, AMP,
  clipping, the learning rate, the skip of a non-finite batch;
- ``validation``: the validation record, the best step, patience, plateau;
- ``run_state``: ``last.pt``, ``best.pt`` and step checkpoints; resume; signals;
- ``metrics``: ``metrics.jsonl`` and the progress bar;
- ``distributed``: this process's place in a multi-process run.

Exact resume: ``last.pt`` stores the model, optimizer, scaler, step, the data
position (epoch and batch index: the batch order is a pure function of the
seed and epoch) and every RNG state, so an interrupted run resumed with
``--resume`` ends with the same weights as an uninterrupted one.

What protects a run: checkpoints are bound to the fingerprints of the data and
tokenizer they were trained on (a resume on other data is refused); SIGINT and
SIGTERM save ``last.pt`` at the end of the current step before exiting; a
batch whose loss (or, with clipping, gradient norm) is NaN or infinite is
skipped and counted, and ``train.max_nonfinite`` of them in a row stop the run;
no checkpoint or model directory is ever written from non-finite weights.
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from rosetta.config import ExperimentConfig
from rosetta.data.batching import BatchIterator
from rosetta.data.prepare import binding, corpus_mixture, load_split
from rosetta.data.tokenizer import Tokenizer
from rosetta.model import model_for
from rosetta.modeldir import load_model_dir, resolve_init
from rosetta.safeio import check_writable, one_writer
from rosetta.train.distributed import Context
from rosetta.train.metrics import MetricsLog, TrainingLog
from rosetta.train.objectives import Objective, objective_for
from rosetta.train.optimisation import Optimisation, TrainingError
from rosetta.train.progress import Progress, finished, updates
from rosetta.train.run_state import (
    Checkpoints,
    TrainingInterrupted,
    checkpoints_folder,
    resume_state,
    stop_requests,
)
from rosetta.train.selection import export_model_dir
from rosetta.train.validation import Validation

__all__ = ["TrainingError", "TrainingInterrupted", "train"]


def _silent(*_args: Any, **_kwargs: Any) -> None:
    """The log of processes other than rank 0."""


def train(
    config: ExperimentConfig,
    resume: bool | str | Path = False,
    log=print,
    context: Context | None = None,
    objective: Objective | None = None,
) -> Path:
    """Trains the configured model; returns the model directory.

    ``resume`` is False (a new run), True (continue from ``checkpoints/last.pt``)
    or the path of a training state to continue from (e.g. ``previous.pt``).
    Raises ``TrainingInterrupted`` after saving ``last.pt`` when SIGINT or
    SIGTERM arrives. ``context`` is this process's place in a torchrun job
    (``rosetta.train.distributed``); None joins the one the environment names,
    or trains alone. ``objective``: what to train with, instead of the one
    ``objective_for`` chooses from the configuration. The process that writes
    (rank 0) holds the experiment's one-writer lock for the whole run: a second
    run on it is refused at once.
    """
    config = resolve_init(config)
    if context is None:
        with Context.from_environment(config.train.device) as context:
            return train(config, resume, log, context, objective)
    if not context.is_main:
        return _train(config, resume, _silent, context, objective)
    with one_writer(config.experiment_dir, "rosetta train"):  # rank 0 writes for the job
        for folder in (config.experiment_dir / "checkpoints", config.experiment_dir):
            check_writable(folder)  # a read-only place fails now, not at the first save
        return _train(config, resume, log, context, objective)


def _train(
    config: ExperimentConfig,
    resume: bool | str | Path,
    log,
    context: Context,
    objective: Objective | None,
) -> Path:
    """``train``'s body, in the process that holds the experiment (or a rank > 0)."""
    tc, exp, main = config.train, config.experiment_dir, context.is_main
    folder = checkpoints_folder(config, context)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)  # the same initial weights in every process

    # ---- the model, its objective, and the state to continue -------------------------
    bound_to = binding(config)
    tokenizer = Tokenizer.load(exp / "tokenizer")
    train_split, valid_split = load_split(config, "train"), load_split(config, "valid")
    model = model_for(config.model, tokenizer).to(context.device)
    objective = objective or objective_for(config, model, tokenizer)
    context.seed_for_rank(tc.seed)
    state, state_path = resume_state(resume, folder, config, bound_to)
    if state is not None:
        model.load_state_dict(state["model"])
    elif config.init is not None:  # a new run that starts from a model's weights
        model.load_state_dict(load_model_dir(config.init, device="cpu")[2].state_dict())
        log(f"starting from the weights of {config.init}")
    if tc.freeze:
        frozen = model.parts(*tc.freeze)
        for parameter in frozen:
            parameter.requires_grad_(False)
        log(f"frozen: {', '.join(tc.freeze)} ({sum(p.numel() for p in frozen):,} parameters)")
    optimisation = Optimisation(model, objective, config, context, log)  # DDP when several
    checkpoints = Checkpoints(folder, config, model, optimisation, bound_to, context)
    progress = Progress()
    if state is not None:
        progress = checkpoints.restore(state)
        log(f"resumed from step {progress.step} (epoch {progress.epoch + 1}) of {state_path}")

    metrics = MetricsLog(exp / "metrics.jsonl" if main else None)
    validation = Validation(
        model, objective, tokenizer, valid_split, config, checkpoints, metrics, context, log
    )
    batches = BatchIterator(train_split, tc.max_tokens, tc.seed, corpus_mixture(config))
    stream = updates(
        batches, progress, tc.accumulate, context.rank, context.world_size, tc.max_epochs
    )
    parameters = sum(p.numel() for p in model.parameters())
    log(
        f"model: {parameters:,} parameters, {config.model.d_model}d, "
        f"{config.model.encoder_layers}+{config.model.decoder_layers} layers; "
        f"{len(train_split):,} training pairs, "
        f"padding {batches.padding_fraction(0):.1%} of each batch on average; "
        f"device {context.device}"
        + (f"; {context.world_size} processes" if context.distributed else "")
    )

    # ---- the loop --------------------------------------------------------------------
    stop_reason = finished(progress, tc)
    if stop_reason and resume:
        log(f"this run had already finished ({stop_reason}); nothing to train")
    model.train()
    start_time = time.monotonic() - progress.elapsed
    training_log = TrainingLog(tc, progress, metrics, context, log)
    with stop_requests() as signals:
        while not stop_reason:
            update = next(stream, None)
            if update is None:  # train.max_epochs epochs done
                if not progress.history or progress.history[-1]["step"] != progress.step:
                    validation.run(progress)
                stop_reason = finished(progress, tc)
                break
            step = progress.step  # updates made before this one
            terms = optimisation.backward(update, step)
            finite, stop_requested, clock = context.agree(
                terms["loss"], bool(signals), time.monotonic() - start_time
            )
            lr = optimisation.step(finite, progress)
            if lr is None:  # skipped: a NaN or infinite loss or gradient
                continue
            progress.elapsed = clock  # rank 0's: a time budget ends alike everywhere
            training_log.add(update.tokens, terms, update.count(objective.unit))
            if progress.step % tc.log_every == 0:
                training_log.write(progress, lr, objective.logged(step))

            stop_reason = finished(progress, tc)
            if stop_reason or progress.step % tc.valid_every == 0:
                validation.run(progress)  # even when a signal came: a resumed run must too
                stop_reason = finished(progress, tc)
            if stop_requested and not stop_reason:
                training_log.close()
                signum = signals[0] if signals else signal.SIGTERM  # another process's
                path = checkpoints.save_everywhere(progress)
                raise TrainingInterrupted(signum, progress.step, path)
    training_log.close()

    log(
        f"stopped after {progress.step} steps ({progress.elapsed / 60:.1f} min): {stop_reason}; "
        f"best step {progress.best_step}"
    )
    if progress.nonfinite_skipped:
        log(f"{progress.nonfinite_skipped} batches were skipped for a non-finite loss or gradient")
    directory = export_model_dir(config, model, asdict(progress), log) if main else exp / "model"
    context.barrier()  # nobody reports success before the model directory is there
    return directory
