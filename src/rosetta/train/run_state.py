"""What a run keeps on disk and when: ``last.pt`` (everything exact resume needs),
``best.pt`` and the last ``train.keep_last`` step checkpoints, in
``experiment_dir/checkpoints`` (the file format: ``rosetta.train.checkpoint``).

- after each validation rank 0 writes ``step_N.pt`` (and ``best.pt`` when the
  score improved), prunes old step checkpoints, then writes ``last.pt`` with every
  process's random state from before the validation;
- SIGINT or SIGTERM (``stop_requests``) ends the run at the end of the current
  step with ``last.pt`` written (``TrainingInterrupted``);
- ``--resume`` (``resume_state``) reads a state back, refusing one from other
  data, another tokenizer or a changed model; a run never overwrites checkpoints
  it was not asked to resume;
- nothing is written from non-finite weights.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from rosetta.config import ExperimentConfig, model_config
from rosetta.modeldir import check_finite
from rosetta.safeio import remove_stale_temporaries
from rosetta.train import checkpoint
from rosetta.train.distributed import Context
from rosetta.train.optimisation import Optimisation
from rosetta.train.progress import Progress


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; ``last.pt`` holds the state at the end of ``step``."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; saved {path}")
        self.signum, self.step, self.path = signum, step, path


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Turns SIGINT and SIGTERM into a request the loop honours after the current step.

    Yields the list the signals are appended to. A second Ctrl-C interrupts at
    once (the last checkpoint stays valid: writes are atomic). Outside the main
    thread, where Python cannot install handlers, signals keep their behaviour.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def request(signum: int, _frame) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _model_differences(trained: dict[str, Any], stated: dict[str, Any]) -> list[str]:
    return [
        f"model.{key} was {trained.get(key)!r}, the configuration says {stated.get(key)!r}"
        for key in sorted(trained.keys() | stated.keys())
        if trained.get(key) != stated.get(key)
    ]


def load_training_state(path: Path, config: ExperimentConfig, bound_to: dict[str, str]) -> dict:
    """Reads a ``last.pt``-style state for ``--resume`` and checks it belongs to this run."""
    try:
        state = checkpoint.load(path, bound_to)
    except checkpoint.CheckpointError as error:
        raise checkpoint.CheckpointError(f"{error}; {checkpoint.describe_fallback(path)}") from None
    if "optimizer" not in state or "progress" not in state:
        raise checkpoint.CheckpointError(
            f"{path} holds weights only, not a training state to resume (use last.pt)"
        )
    trained = model_config(state["config"]["model"]).model_dump(mode="json")
    differences = _model_differences(trained, config.model.model_dump(mode="json"))
    if differences:
        raise checkpoint.CheckpointError(
            f"cannot resume {path} with a changed model: {'; '.join(differences)}"
        )
    return state


def checkpoints_folder(config: ExperimentConfig, context: Context) -> Path:
    """``experiment_dir/checkpoints``, made by rank 0 and cleared of the temporary
    files an interrupted write left there."""
    directory = config.experiment_dir / "checkpoints"
    if context.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(directory)
    return directory


def resume_state(
    resume: bool | str | Path, directory: Path, config: ExperimentConfig, bound_to: dict[str, str]
) -> tuple[dict[str, Any] | None, Path | None]:
    """The training state to continue and its path: ``resume`` True reads
    ``directory/last.pt``, a path that file; False gives (None, None) for a new
    run, refused (``FileExistsError``) where checkpoints of an earlier run lie."""
    if resume:
        path = directory / checkpoint.LAST if resume is True else Path(resume)
        return load_training_state(path, config, bound_to), path
    if checkpoint.holds_training(directory):
        raise FileExistsError(
            f"{directory} holds checkpoints: pass --resume to continue them, or use a new "
            "experiment_dir (nothing is overwritten)"
        )
    return None, None


class Checkpoints:
    """The run's checkpoints folder. Every process calls the methods that hold a
    collective (``random_states``, ``save_everywhere``); rank 0 alone writes."""

    def __init__(
        self,
        directory: Path,
        config: ExperimentConfig,
        model: torch.nn.Module,
        optimisation: Optimisation,
        bound_to: dict[str, str],
        context: Context,
    ) -> None:
        self.directory, self.config = directory, config
        self.model, self.optimisation = model, optimisation
        self.bound_to, self.context = bound_to, context

    def restore(self, state: dict[str, Any]) -> Progress:
        """Continues ``state`` (from ``resume_state``; the model's weights are loaded
        already): the optimizer, the scaler, this process's random state, and the
        progress it returns."""
        self.optimisation.load_state_dict(state)
        progress = Progress(**state["progress"])
        others = state.get("rank_rngs", [])  # ranks 1.. of the run that saved it
        rank = self.context.rank
        if rank == 0:
            checkpoint.restore_rng_states(state["rng"])
        elif rank <= len(others):
            checkpoint.restore_rng_states(others[rank - 1])
        else:  # more processes than saved it: a fresh stream of its own
            self.context.seed_for_rank(self.config.train.seed, progress.step)
        return progress

    def random_states(self) -> list[dict[str, Any]]:
        """Every process's random state now, in rank order (a collective)."""
        return self.context.gather(checkpoint.rng_states())

    def weights(self, progress: Progress) -> dict[str, Any]:
        """The model's weights as a checkpoint holds them; refuses non-finite ones."""
        state = self.model.state_dict()
        check_finite(state, f"a checkpoint at step {progress.step}")
        return {"model": state, "step": progress.step, "binding": self.bound_to}

    def save_last(self, progress: Progress, rngs: list[dict[str, Any]]) -> Path:
        """Rank 0 writes ``last.pt`` (the one before becomes ``previous.pt``) with every
        process's random state ``rngs``."""
        return checkpoint.save_training_state(
            {
                **self.weights(progress),
                **self.optimisation.state_dict(),
                "progress": asdict(progress),
                "rng": rngs[0],
                "rank_rngs": rngs[1:],
                "config": self.config.model_dump(mode="json"),
            },
            self.directory,
        )

    def save_everywhere(self, progress: Progress) -> Path:
        """``last.pt``, written by rank 0 once every process has reached this point."""
        rngs = self.random_states()
        path = self.save_last(progress, rngs) if self.context.is_main else self.last
        self.context.barrier()
        return path

    def save_validated(self, progress: Progress, score: float, improved: bool) -> None:
        """Rank 0, after a validation: ``step_N.pt``, ``best.pt`` when it ``improved``,
        and only the newest ``train.keep_last`` step checkpoints left."""
        state = self.weights(progress)
        if improved:
            checkpoint.save({**state, "score": score}, self.directory / checkpoint.BEST)
        checkpoint.save(state, self.directory / f"step_{progress.step}.pt")
        checkpoint.prune(self.directory, self.config.train.keep_last)

    @property
    def last(self) -> Path:
        return self.directory / checkpoint.LAST
