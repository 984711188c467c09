"""What a run ships, chosen on validation: weights (best or averaged) and, from one
long run, the model directory a shorter run would have written."""

from __future__ import annotations

import json
import re

import pytest
from safetensors.torch import load_file

from conftest import copy_prepared, quiet, toy_config
from rosetta.train import checkpoint
from rosetta.train.selection import averaging_sizes, export_at_step
from rosetta.train.trainer import train


@pytest.mark.parametrize(
    ("last", "sizes"),
    [(0, []), (1, []), (2, [2]), (4, [2, 4]), (5, [2, 4, 5]), (10, [2, 4, 8, 10])],
)
def test_averaging_sizes(last, sizes):
    assert averaging_sizes(last) == sizes


def test_a_step_of_a_long_run_gives_the_model_a_short_run_writes(prepared, tmp_path):
    keep_all = {"keep_last": 100, "average_last": 2}
    long = copy_prepared(prepared, tmp_path / "long")
    long_config = toy_config(long, train={"max_steps": 12, **keep_all})
    train(long_config, log=quiet)
    lines: list[str] = []
    at_8 = export_at_step(long_config, 8, tmp_path / "at_8", log=lines.append)

    short = copy_prepared(prepared, tmp_path / "short")
    short_dir = train(toy_config(short, train={"max_steps": 8, **keep_all}), log=quiet)

    a, b = load_file(at_8 / "model.safetensors"), load_file(short_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    made, wrote = (json.loads((d / "metadata.json").read_text()) for d in (at_8, short_dir))
    for key in ("steps", "weights", "validation", "best_validation_score"):
        if key == "validation":  # the same but for the clock
            made[key].pop("elapsed", None), wrote[key].pop("elapsed", None)
        assert made[key] == wrote[key], key
    assert made["steps"] == 8

    # the choice among the best checkpoint and the averages is the best on validation
    [line] = [x for x in lines if x.startswith("valid BLEU at step 8")]
    found = re.findall(r"(best checkpoint|last \d+ averaged) ([\d.]+)", line)
    tried = {name: float(value) for name, value in found}
    assert set(tried) == {"best checkpoint", "last 2 averaged"}
    chosen = "last 2 averaged" if made["weights"].startswith("average") else "best checkpoint"
    assert tried[chosen] == max(tried.values())


def test_a_step_that_was_not_validated_or_whose_checkpoint_is_gone_is_refused(prepared, tmp_path):
    exp = copy_prepared(prepared, tmp_path / "exp")
    # selection by NLL, which falls step after step this early: step 8's weights are
    # not the best of the run, so best.pt does not hold them, and keep_last 1 drops them
    config = toy_config(exp, train={"keep_last": 1, "valid_bleu": False})
    train(config, log=quiet)
    assert checkpoint.load(exp / "checkpoints" / checkpoint.BEST)["step"] == 12
    with pytest.raises(ValueError, match="step 6 was not validated; validated steps: 4, 8, 12"):
        export_at_step(config, 6, tmp_path / "at_6")
    with pytest.raises(checkpoint.CheckpointError, match=r"step 8 is gone.*train\.keep_last"):
        export_at_step(config, 8, tmp_path / "at_8")
    assert not (tmp_path / "at_8").exists()


def test_averages_reach_as_far_back_as_the_checkpoints_kept(prepared, tmp_path):
    exp = copy_prepared(prepared, tmp_path / "exp")
    lines: list[str] = []
    config = toy_config(exp, train={"max_steps": 16, "keep_last": 3, "average_last": 8})
    train(config, log=lines.append)
    [line] = [x for x in lines if x.startswith("valid BLEU at step 16")]
    assert re.findall(r"last (\d+) averaged", line) == ["2", "3"]  # 8 and 4 > 3 kept
