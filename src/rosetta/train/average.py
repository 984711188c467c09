"""Checkpoint averaging (the paper averages the last 5 checkpoints)."""

from __future__ import annotations

from pathlib import Path

import torch

from rosetta.config import ExperimentConfig
from rosetta.safeio import one_writer
from rosetta.train.checkpoint import CheckpointError, load, step_checkpoints, step_of


def average_checkpoints(
    paths: list[Path], bound_to: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Element-wise mean of the ``model`` weights of several checkpoints (all bound to
    ``bound_to``'s data and tokenizer when it is given)."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        weights = load(path, bound_to)["model"]
        if total and weights.keys() != total.keys():
            raise CheckpointError(f"{path} holds a different model than {paths[0]}")
        for name, tensor in weights.items():
            if name in total:
                total[name] += tensor.double()
            else:
                total[name] = tensor.double().clone()
    return {name: (tensor / len(paths)).float() for name, tensor in total.items()}


def average_into_model_dir(
    config: ExperimentConfig, last: int, output: Path | None = None, log=print
) -> Path:
    """``rosetta average``: averages the last ``last`` step checkpoints of an experiment,
    scores the result on (``train.valid_bleu_size`` sentences of) the validation split
    and writes a model directory (default ``EXP/model``)."""
    from rosetta.data.prepare import binding, load_split
    from rosetta.data.tokenizer import Tokenizer
    from rosetta.model import model_for
    from rosetta.modeldir import read_metadata, save_model_dir
    from rosetta.train.selection import validation_bleu

    if last < 1:
        raise ValueError(f"--last must be at least 1, not {last}")
    exp = config.experiment_dir
    with one_writer(exp, "rosetta average"):  # no training run prunes what is read
        paths = step_checkpoints(exp / "checkpoints")[-last:]
        tokenizer = Tokenizer.load(exp / "tokenizer")
        model = model_for(config.model, tokenizer)
        model.load_state_dict(average_checkpoints(paths, binding(config)))
        valid = load_split(config, "valid")
        score = validation_bleu(model, tokenizer, valid, config, config.train.valid_bleu_size)[0]
        output = Path(output) if output else exp / "model"
        names = [p.name for p in paths]
        metadata = {
            **{k: v for k, v in read_metadata(output).items() if k not in ("parameters", "sha256")},
            "weights": f"average of {names}",
            "validation": {
                "steps": [step_of(p) for p in paths],
                "valid_bleu": score.score,
                "valid_bleu_signature": score.signature,
            },
        }
        save_model_dir(output, config, exp / "tokenizer", model.eval(), metadata)
        log(f"averaged {len(paths)} checkpoints ({', '.join(names)}), valid BLEU {score.score:.2f}")
    return output
