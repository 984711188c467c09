"""Training loop: checkpoints, exact resume, averaging, the model directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import copy_prepared, quiet, toy_config
from rosetta.decode.translator import Translator
from rosetta.modeldir import load_model_dir
from rosetta.train import checkpoint
from rosetta.train.average import average_checkpoints
from rosetta.train.trainer import train


def test_interrupted_and_resumed_training_equals_uninterrupted(prepared, tmp_path):
    straight = copy_prepared(prepared, tmp_path / "straight")
    train(toy_config(straight), log=quiet)

    interrupted = copy_prepared(prepared, tmp_path / "interrupted")
    train(toy_config(interrupted, train={"max_steps": 6, "valid_every": 3}), log=quiet)
    # a new process would reload everything from last.pt; so does --resume
    train(toy_config(interrupted, train={"valid_every": 3}), resume=True, log=quiet)

    a = checkpoint.load(straight / "checkpoints" / "last.pt")
    b = checkpoint.load(interrupted / "checkpoints" / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == 12
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0, msg=name)
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])


def test_training_refuses_to_overwrite_without_resume(prepared, tmp_path):
    exp = copy_prepared(prepared, tmp_path / "exp")
    config = toy_config(exp, train={"max_steps": 2, "valid_every": 2})
    train(config, log=quiet)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, log=quiet)


def test_outputs_checkpoints_metrics_and_model_directory(prepared, tmp_path):
    exp = copy_prepared(prepared, tmp_path / "exp")
    config = toy_config(exp, train={"keep_last": 2, "average_last": 2})
    model_dir = train(config, log=quiet)
    names = sorted(p.name for p in (exp / "checkpoints").iterdir())
    assert names == ["best.pt", "last.pt", "previous.pt", "step_12.pt", "step_8.pt"]
    records = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert {r["type"] for r in records} == {"train", "valid"}
    assert [r["step"] for r in records if r["type"] == "valid"] == [4, 8, 12]
    assert all("valid_bleu" in r for r in records if r["type"] == "valid")
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "config.yaml",
        "metadata.json",
        "model.safetensors",
        "spm.model",
        "spm.vocab",
    ]
    metadata = json.loads((model_dir / "metadata.json").read_text())
    assert metadata["steps"] == 12 and metadata["parameters"] > 0


def test_average_of_checkpoints_is_the_elementwise_mean(tmp_path):
    first = {"model": {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}}
    second = {"model": {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([1.0])}}
    checkpoint.save(first, tmp_path / "step_1.pt")
    checkpoint.save(second, tmp_path / "step_2.pt")
    averaged = average_checkpoints(checkpoint.step_checkpoints(tmp_path))
    assert averaged["w"].tolist() == [2.0, 4.0] and averaged["b"].tolist() == [0.5]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {}}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(checkpoint.CheckpointError, match=r"damaged.*cut short"):
        checkpoint.load(path)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save({"v": Unpicklable()}, path)
    assert checkpoint.load(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_model_directory_translates_after_being_moved(prepared, tmp_path):
    import shutil

    exp = copy_prepared(prepared, tmp_path / "exp")
    model_dir = train(toy_config(exp, train={"max_steps": 4}), log=quiet)
    moved = shutil.move(str(model_dir), tmp_path / "elsewhere")
    shutil.rmtree(exp)
    config, tokenizer, model = load_model_dir(moved)
    assert config.model.d_model == 32 and not model.training
    assert model.tgt_vocab_size == tokenizer.tgt_vocab_size
    result = Translator.load(moved, beam=2).translate(["the dog sees a cat .", ""])
    assert len(result) == 2 and result[1].text == ""


def test_decoding_leaves_the_random_streams_alone(untrained_model_dir):
    """Validation decodes in the middle of training; whatever the first decode in a
    process sets up (capability checks, caches, inference layouts) must not draw
    from the global streams that exact resume replays. A fresh process, so that
    nothing is set up yet."""
    script = f"""
import random, numpy, torch
from rosetta.decode.translator import TorchTranslator
from rosetta.modeldir import load_model_dir
config, tokenizer, model = load_model_dir({str(untrained_model_dir)!r})
model.train()  # as the trainer holds it
before = torch.get_rng_state(), numpy.random.get_state()[1].copy(), random.getstate()
options = config.decode.with_overrides(beam=1)
TorchTranslator(model, tokenizer, options).translate(["a b c", "d"])
after = torch.get_rng_state(), numpy.random.get_state()[1].copy(), random.getstate()
assert torch.equal(before[0], after[0]), "torch"
assert (before[1] == after[1]).all() and before[2] == after[2], "numpy or random"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_length_penalty_is_chosen_on_validation_and_recorded(prepared, tmp_path):
    experiment = copy_prepared(prepared, tmp_path / "alpha")
    grid = [0.0, 1.0, 4.0]
    config = toy_config(experiment, train={"length_penalty_grid": grid})
    model_dir = train(config, log=quiet)
    sweep = json.loads((model_dir / "metadata.json").read_text())["validation"][
        "length_penalty_valid_bleu"
    ]
    assert list(sweep) == ["0.0", "1.0", "4.0"]
    best = max(grid, key=lambda a: sweep[str(a)])
    assert load_model_dir(model_dir)[0].decode.search["length_penalty"] == best
    assert Translator.load(model_dir).search.options.length_penalty == best  # translate uses it
