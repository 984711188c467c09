"""``rosetta average``: the mean of an experiment's last step checkpoints as its
model directory (the paper averages the last 5 checkpoints); the averaging itself is
``rosetta.train.checkpoint.average_checkpoints``."""

from __future__ import annotations

from pathlib import Path

from rosetta.config import ExperimentConfig
from rosetta.data.prepare import binding, load_split
from rosetta.data.tokenizer import Tokenizer
from rosetta.model import model_for
from rosetta.modeldir import read_metadata, save_model_dir
from rosetta.safeio import one_writer
from rosetta.train.checkpoint import average_checkpoints, step_checkpoints, step_of
from rosetta.train.selection import validation_bleu


def average_into_model_dir(
    config: ExperimentConfig, last: int, output: Path | None = None, log=print
) -> Path:
    """``rosetta average``: averages the last ``last`` step checkpoints of an experiment,
    scores the result on (``train.valid_bleu_size`` sentences of) the validation split
    and writes a model directory (default ``EXP/model``)."""
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
