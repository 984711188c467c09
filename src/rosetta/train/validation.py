"""Validation during training, and what it decides: the best checkpoint, early
stopping and the plateau schedule's decay.

Every ``train.valid_every`` updates, and when the run ends, rank 0 scores the
model on the validation split: the objective's validation terms summed over it,
as ``objective.report`` puts them (``valid_nll``, ``valid_ppl`` and what the
objective adds), and with ``train.valid_bleu`` the greedy BLEU of its first
``valid_bleu_size`` pairs (``rosetta.train.selection.validation_bleu``). The
score (``selection.validation_score``: BLEU, else -NLL) picks ``best.pt``; a
validation without improvement counts towards ``train.patience`` and, with the
plateau schedule, every ``plateau_patience``-th decays the learning rate.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from rosetta.config import ExperimentConfig, TrainConfig
from rosetta.data.arrays import TokenizedSplit
from rosetta.data.batching import collate, make_batches
from rosetta.data.tokenizer import Tokenizer
from rosetta.decode.translator import TorchTranslator
from rosetta.train.distributed import Context
from rosetta.train.metrics import MetricsLog
from rosetta.train.objectives import Objective
from rosetta.train.progress import Progress
from rosetta.train.run_state import Checkpoints
from rosetta.train.selection import validation_bleu, validation_score


@torch.no_grad()
def validation_terms(
    model: torch.nn.Module,
    objective: Objective,
    split: TokenizedSplit,
    max_tokens: int,
    device: torch.device,
) -> tuple[dict[str, float], int]:
    """``objective.validation``'s terms summed over ``split`` (in float64, with one
    host sync at the end), and the split's target tokens. Leaves the model in eval
    mode."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    for indices in make_batches(split.src_lengths, split.tgt_lengths, max_tokens):
        batch = collate(split, indices).to(device)
        for name, value in objective.validation(model, batch).items():
            value = torch.as_tensor(value, dtype=torch.float64, device=device)
            sums[name] = sums[name] + value if name in sums else value
        tokens += batch.num_tgt_tokens
    return {name: float(value) for name, value in sums.items()}, tokens


def judge(progress: Progress, score: float, tc: TrainConfig, log=print) -> bool:
    """Whether a validation ``score`` (higher is better) is the best so far; moves
    ``progress``'s best score and step, or its count of validations without
    improvement (and, with the plateau schedule, its learning-rate scale)."""
    if score > progress.best_score:
        progress.best_score, progress.best_step = score, progress.step
        progress.bad_validations = 0
        return True
    progress.bad_validations += 1
    if tc.schedule == "plateau" and progress.bad_validations % tc.plateau_patience == 0:
        progress.lr_scale *= tc.plateau_factor
        log(f"validation plateaued: learning rate scaled by {progress.lr_scale:g}")
    return False


def save_attention_snapshots(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    split: TokenizedSplit,
    config: ExperimentConfig,
    directory: Path,
    step: int,
) -> None:
    """Heat maps of the first ``train.attention_samples`` validation sentences, so a
    user can watch alignment form: ``directory/step_<N>_<i>.png``."""
    from rosetta.plotting import compute_attention, plot_attention  # matplotlib: slow to load

    translator = TorchTranslator(
        model, tokenizer, config.decode.with_overrides(beam=1, nbest=1, sampling=False)
    )
    for i in range(min(config.train.attention_samples, len(split))):
        sentence = tokenizer.source.decode(split.source(i).tolist())
        attention = compute_attention(translator, sentence)
        plot_attention(attention, directory / f"step_{step}_{i}.png")
    model.train()


class Validation:
    """Everything one validation reads and writes; ``run`` is called by every
    process at the same step."""

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Objective,
        tokenizer: Tokenizer,
        split: TokenizedSplit,
        config: ExperimentConfig,
        checkpoints: Checkpoints,
        metrics: MetricsLog,
        context: Context,
        log=print,
    ) -> None:
        self.model, self.objective, self.tokenizer, self.split = model, objective, tokenizer, split
        self.config, self.checkpoints, self.metrics = config, checkpoints, metrics
        self.context, self.log = context, log

    def run(self, progress: Progress) -> None:
        """On rank 0: scores the model, saves the checkpoints and moves ``progress``;
        every process then takes rank 0's progress (the broadcast is the barrier
        after the writes)."""
        rngs = self.checkpoints.random_states()  # before validating: what resume replays
        if self.context.is_main:
            self._validate_and_save(progress, rngs)
        shared = self.context.broadcast(asdict(progress))
        for name, value in shared.items():
            setattr(progress, name, value)

    def _validate_and_save(self, progress: Progress, rngs: list[dict[str, Any]]) -> None:
        tc = self.config.train
        sums, tokens = validation_terms(
            self.model, self.objective, self.split, tc.max_tokens, self.context.device
        )
        record: dict[str, Any] = {"step": progress.step, **self.objective.report(sums, tokens)}
        if tc.valid_bleu:
            result, _ = validation_bleu(
                self.model, self.tokenizer, self.split, self.config, tc.valid_bleu_size
            )
            record["valid_bleu"], record["valid_bleu_signature"] = result.score, result.signature
        record["elapsed"] = progress.elapsed
        self.model.train()
        score = validation_score(record)
        improved = judge(progress, score, tc, self.log)
        self.checkpoints.save_validated(progress, score, improved)
        if tc.attention_samples:
            save_attention_snapshots(
                self.model,
                self.tokenizer,
                self.split,
                self.config,
                self.config.experiment_dir / "attention",
                progress.step,
            )
        progress.history.append(record)
        self.metrics.write({"type": "valid", **record})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))
        self.log(f"step {progress.step}: {shown}{' (best)' if improved else ''}")
        self.checkpoints.save_last(progress, rngs)
