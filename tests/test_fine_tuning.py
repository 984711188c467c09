"""Starting from a model directory (``init``, ``rosetta train --init``) and freezing parts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import toy_config
from rosetta.config import ConfigError, config_from_dict
from rosetta.data.prepare import prepare
from rosetta.data.tokenizer import Tokenizer
from rosetta.modeldir import WEIGHTS, load_model_dir, resolve_init
from rosetta.train.trainer import train


def fine_tuning_config(tmp_path, pretrained, **sections):
    """Another toy corpus (seed 2), and no model section of its own."""
    config = toy_config(
        tmp_path / "tuned",
        data={"toy": {"seed": 2, "train_size": 600, "valid_size": 30, "test_size": 30}},
        **sections,
    )
    data = config.model_dump(mode="json", exclude={"model"})
    return config_from_dict({**data, "init": str(pretrained)})


def test_the_model_section_comes_from_the_directory(tmp_path, pretrained):
    config = resolve_init(fine_tuning_config(tmp_path, pretrained))
    assert config.model == load_model_dir(pretrained)[0].model
    assert resolve_init(config) == config  # applying it again changes nothing


def test_a_disagreeing_model_key_is_an_error_naming_it(tmp_path, pretrained):
    config = toy_config(tmp_path / "x", model={"d_model": 48})
    config = config.model_copy(update={"init": pretrained})
    with pytest.raises(ConfigError, match=r"model\.d_model: 48 here, 32 in .*config\.yaml"):
        resolve_init(config)
    agreeing = toy_config(tmp_path / "y", model={"dropout": 0.3})  # a training-only key
    resolved = resolve_init(agreeing.model_copy(update={"init": pretrained}))
    assert resolved.model.dropout == 0.3 and resolved.model.d_model == 32


def test_init_that_is_not_a_model_directory_is_an_error(tmp_path):
    config = toy_config(tmp_path / "x").model_copy(update={"init": tmp_path})
    with pytest.raises(ConfigError, match="is not a rosetta model directory"):
        resolve_init(config)


def test_fine_tuning_starts_from_the_weights_and_keeps_frozen_parts(tmp_path, pretrained):
    config = fine_tuning_config(
        tmp_path, pretrained, train={"max_steps": 3, "freeze": ["embeddings", "encoder"]}
    )
    messages: list[str] = []
    prepare(config, log=messages.append)
    assert any("the tokenizer is" in m and "(init)" in m for m in messages)
    assert (
        Tokenizer.load(config.experiment_dir / "tokenizer").fingerprint()
        == Tokenizer.load(pretrained).fingerprint()
    )
    tuned = train(config, log=messages.append)
    assert f"starting from the weights of {pretrained}" in messages
    before, after = load_file(pretrained / WEIGHTS), load_file(tuned / WEIGHTS)
    frozen = [n for n in before if n.startswith(("src_embed.", "tgt_embed.", "encoder."))]
    trained = [n for n in before if n.startswith("decoder.")]
    assert frozen and trained
    for name in frozen:
        assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(before[name], after[name]) for name in trained)


def test_train_init_on_the_command_line(tmp_path, pretrained):
    config = fine_tuning_config(tmp_path, pretrained, train={"max_steps": 2})
    sections = config.model_dump(mode="json", exclude={"model", "init"})
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(sections))
    rosetta = [sys.executable, "-m", "rosetta", "train", str(path)]
    done = subprocess.run([*rosetta, "--init", str(pretrained)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1500:]
    assert f"starting from the weights of {pretrained}" in done.stdout + done.stderr
    tuned = load_model_dir(config.experiment_dir / "model")[0]
    assert tuned.init == pretrained and tuned.model == load_model_dir(pretrained)[0].model

    sections["experiment_dir"] = str(tmp_path / "wrong")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({**sections, "model": {"d_model": 40}}))
    done = subprocess.run(
        [sys.executable, "-m", "rosetta", "train", str(wrong), "--init", str(pretrained)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.d_model: 40 here, 32 in" in lines[0], done.stderr
