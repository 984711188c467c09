"""What a finished run ships: the weights and the beam length penalty of its model
directory, both chosen on the validation split (never on test).

- **Weights**: the best validated checkpoint (by ``train.valid_bleu``'s greedy
  BLEU, else by validation NLL), or the average of the last n step checkpoints
  for n = 2, 4, 8, ... below ``train.average_last`` and ``train.average_last``
  itself, whichever scores the best greedy validation BLEU (on
  ``train.valid_bleu_size`` pairs; an average wins ties, being the smoother).
- **Length penalty**: the GNMT alpha of ``train.length_penalty_grid`` whose beam
  search scores the best BLEU on the whole validation split, recorded as the
  model's ``decode.length_penalty``.

``upto`` makes every choice among the first ``upto`` updates only, so one long
run also yields the model directory a run of ``upto`` updates would have written
(the learning-rate schedules do not depend on the budget): a learning curve from
one run (``export_at_step``). It needs the run's step checkpoints
(``train.keep_last`` at least the validations to look back on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rosetta.config import ExperimentConfig
from rosetta.data.arrays import TokenizedSplit
from rosetta.data.prepare import binding, load_split
from rosetta.data.tokenizer import Tokenizer
from rosetta.decode.search import configure, runnable, validation_search
from rosetta.decode.translator import TorchTranslator
from rosetta.evaluate.metrics import Score, bleu
from rosetta.model import model_for
from rosetta.modeldir import save_model_dir
from rosetta.train import checkpoint


def validation_bleu(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    split: TokenizedSplit,
    config: ExperimentConfig,
    limit: int = 0,
) -> tuple[Score, list[str]]:
    """BLEU of the validation search (greedy where the model can run it:
    ``rosetta.decode.search.validation_search``) on (the first ``limit`` pairs of) a
    split; returns score and outputs."""
    search = validation_search(config.decode.search, model)
    options = config.decode.model_copy(update={"search": search.describe()})
    return _split_bleu(TorchTranslator(model, tokenizer, options), split, limit)


def _split_bleu(
    translator: TorchTranslator, split: TokenizedSplit, limit: int = 0
) -> tuple[Score, list[str]]:
    """BLEU of ``translator``'s search on (the first ``limit`` pairs of) a split, and
    the outputs."""
    tokenizer = translator.tokenizer
    count = len(split) if limit <= 0 else min(limit, len(split))
    sources = [split.source(i).tolist() for i in range(count)]
    references = [tokenizer.decode_target(split.target(i).tolist()) for i in range(count)]
    found = translator.search_ids(sources)
    hypotheses = [tokenizer.decode_target(result.hypotheses[0].tokens) for result in found]
    return bleu(hypotheses, references), hypotheses


def validation_score(record: dict[str, Any]) -> float:
    """What picks the best checkpoint: a validation record's greedy BLEU when it was
    measured, else its negated NLL (higher is better either way)."""
    return record["valid_bleu"] if "valid_bleu" in record else -record["valid_nll"]


def averaging_sizes(average_last: int) -> list[int]:
    """How many of the last checkpoints to try averaging: 2, 4, 8, ... below
    ``average_last``, then ``average_last`` (nothing below 2)."""
    sizes = [n for n in (2**k for k in range(1, 32)) if n < average_last]
    return [*sizes, average_last] if average_last > 1 else []


def choose_length_penalty(
    model: torch.nn.Module, config: ExperimentConfig, grid: list[float], log=print
) -> tuple[float, dict[str, float]]:
    """The GNMT alpha of ``grid`` whose search (``decode.search``, one that reads a
    ``length_penalty``: beam search) scores the best BLEU on the whole validation
    set, and every alpha's BLEU (ties: the first)."""
    exp = config.experiment_dir
    translator = TorchTranslator(model, Tokenizer.load(exp / "tokenizer"), config.decode)
    valid = load_split(config, "valid")
    sweep = {}
    for alpha in grid:
        tried = translator.with_options(length_penalty=alpha, **translator.search.for_hypotheses(1))
        sweep[str(alpha)] = _split_bleu(tried, valid)[0].score
    best = max(grid, key=lambda a: sweep[str(a)])
    scores = ", ".join(f"{a}: {b:.2f}" for a, b in sweep.items())
    log(f"length penalty {best} (valid BLEU, {translator.search.describe()}: {scores})")
    return best, sweep


def _checkpoint_of(config: ExperimentConfig, step: int, upto: int) -> Path:
    """The file holding the weights validated at ``step``: its step checkpoint, or
    ``best.pt`` when that is the one it holds (step files roll over)."""
    ckpt_dir = config.experiment_dir / "checkpoints"
    path = ckpt_dir / f"step_{step}.pt"
    if path.exists():
        return path
    best = ckpt_dir / checkpoint.BEST
    if best.exists() and checkpoint.load(best, binding(config)).get("step") == step:
        return best
    raise checkpoint.CheckpointError(
        f"the checkpoint of step {step} is gone, so the weights at step {upto} cannot be "
        "chosen: keep more step checkpoints (train.keep_last)"
    )


def select_weights(
    config: ExperimentConfig,
    model: torch.nn.Module,
    history: list[dict[str, Any]],
    upto: int,
    log=print,
) -> tuple[str, dict[str, Any]]:
    """Loads into ``model`` the weights the module's docstring describes, among the
    checkpoints of the first ``upto`` updates; returns what they are and their
    validation record."""
    exp = config.experiment_dir
    ckpt_dir = exp / "checkpoints"
    bound_to = binding(config)
    records = [r for r in history if r["step"] <= upto]
    if not records:
        raise checkpoint.CheckpointError(f"no validation at or before step {upto}")
    best = max(records, key=validation_score)  # the first of equals, as in training
    weights = checkpoint.load(_checkpoint_of(config, best["step"], upto), bound_to)["model"]
    model.load_state_dict(weights)
    chosen = f"best checkpoint (step {best['step']})"
    validation = dict(best)
    steps = [p for p in checkpoint.step_checkpoints(ckpt_dir) if checkpoint.step_of(p) <= upto]
    # as many as there are, when fewer than a size
    sizes = sorted({min(n, len(steps)) for n in averaging_sizes(config.train.average_last)} - {1})
    if not sizes:
        return chosen, validation
    tokenizer = Tokenizer.load(exp / "tokenizer")
    valid = load_split(config, "valid")
    limit = config.train.valid_bleu_size
    top = validation_bleu(model, tokenizer, valid, config, limit)[0].score
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    tried = [f"best checkpoint {top:.2f}"]
    for n in sizes:
        paths = steps[-n:]
        model.load_state_dict(checkpoint.average_checkpoints(paths, bound_to))
        score = validation_bleu(model, tokenizer, valid, config, limit)[0]
        tried.append(f"last {n} averaged {score.score:.2f}")
        if score.score >= top:
            top, kept = score.score, {k: v.clone() for k, v in model.state_dict().items()}
            chosen = f"average of the last {n} checkpoints"
            validation = {
                "steps": [checkpoint.step_of(p) for p in paths],
                "valid_bleu": score.score,
                "valid_bleu_signature": score.signature,
            }
    model.load_state_dict(kept)
    log(f"valid BLEU at step {upto}: {', '.join(tried)}; chosen: {chosen}")
    return chosen, validation


def export_model_dir(
    config: ExperimentConfig,
    model: torch.nn.Module,
    progress: dict[str, Any],
    log=print,
    upto: int | None = None,
    dest: Path | None = None,
) -> Path:
    """Writes the model directory (default ``EXP/model``) of a run whose state is
    ``progress`` (the trainer's ``Progress`` as a dict, as ``last.pt`` holds it): the
    weights and length penalty chosen on validation, among the first ``upto``
    updates when given."""
    exp = config.experiment_dir
    steps, elapsed = progress["step"], progress["elapsed"]
    history = progress["history"]
    if upto is not None:
        at = [r for r in history if r["step"] == upto]
        if not at:
            validated = ", ".join(str(r["step"]) for r in history) or "none"
            raise ValueError(f"step {upto} was not validated; validated steps: {validated}")
        steps, elapsed = upto, at[0].get("elapsed")
    chosen, validation = select_weights(config, model, history, steps, log)
    model.eval()
    grid = config.train.length_penalty_grid
    search = configure(config.decode.search, None, runnable(model))
    if grid and "length_penalty" in search.reads():
        alpha, sweep = choose_length_penalty(model, config, grid, log)
        tuned = configure(search.describe(), {"length_penalty": alpha}, runnable(model))
        config = config.model_copy(
            update={"decode": config.decode.model_copy(update={"search": tuned.describe()})}
        )
        validation["length_penalty_valid_bleu"] = sweep
    metadata = {
        "arch": config.model.arch,
        "steps": steps,
        "training_minutes": None if elapsed is None else round(elapsed / 60, 2),
        "weights": chosen,
        "validation": validation,  # of the weights in this directory
        "best_validation_score": max(
            (validation_score(r) for r in history if r["step"] <= steps), default=None
        ),
        "nonfinite_batches_skipped": progress["nonfinite_skipped"],
    }
    directory = save_model_dir(dest or exp / "model", config, exp / "tokenizer", model, metadata)
    log(f"model directory: {directory} ({chosen})")
    return directory


def export_at_step(config: ExperimentConfig, step: int, dest: Path, log=print) -> Path:
    """The model directory a run of ``step`` updates would have written, made from the
    checkpoints of a longer run of ``config`` (whose ``last.pt`` holds the history)."""
    ckpt_dir = config.experiment_dir / "checkpoints"
    state = checkpoint.load(ckpt_dir / checkpoint.LAST, binding(config))
    model = model_for(config.model, Tokenizer.load(config.experiment_dir / "tokenizer"))
    return export_model_dir(config, model, state["progress"], log, upto=step, dest=dest)
