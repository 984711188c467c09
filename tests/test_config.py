"""Configuration: the shipped files load; every error names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from rosetta.config import ConfigError, load_config, parse_duration

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


MINIMAL = "experiment_dir: exp\ndata:\n  root: corpus\n"


@pytest.mark.parametrize("name", ["toy.yaml", "multi30k_en_de.yaml", "multi30k_en_de_rnn.yaml"])
def test_shipped_configs_load(name):
    config = load_config(ROOT / "configs" / name)
    assert config.model.arch == ("rnn" if "rnn" in name else "transformer")


def test_each_architecture_checks_its_own_keys(tmp_path):
    """The model section is a union by ``arch``: another architecture's key is an error
    that names it; older saved configurations (every key, at its default) still load."""
    from rosetta.config import ConfigError, RNNConfig, TransformerConfig

    with pytest.raises(
        ConfigError, match=r"model\.hidden_size: unknown key \(for model\.arch transformer"
    ):
        load_config(write_config(tmp_path, MINIMAL + "model:\n  hidden_size: 256\n"))
    with pytest.raises(ConfigError, match=r"model\.heads: unknown key \(for model\.arch rnn"):
        load_config(write_config(tmp_path, MINIMAL + "model:\n  arch: rnn\n  heads: 4\n"))
    rnn = load_config(write_config(tmp_path, MINIMAL + "model:\n  preset: rnn_small\n"))
    assert isinstance(rnn.model, RNNConfig) and rnn.model.hidden_size == 512
    old_flat_dump = "model:\n  arch: transformer\n  d_model: 64\n  heads: 4\n  rnn_cell: lstm\n"
    old_flat_dump += "  hidden_size: 512\n  attention: bahdanau\n  input_feeding: true\n"
    old = load_config(write_config(tmp_path, MINIMAL + old_flat_dump))
    assert isinstance(old.model, TransformerConfig) and old.model.heads == 4


def test_defaults_and_presets(tmp_path):
    config = load_config(write_config(tmp_path, MINIMAL + "model:\n  preset: small\n"))
    assert config.model.d_model == 256 and config.model.encoder_layers == 3
    assert config.train.label_smoothing == 0.1 and config.train.betas == (0.9, 0.98)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "modle: {}\n", "modle: unknown key"),
        (MINIMAL + "model:\n  d_modle: 3\n", "model.d_modle: unknown key"),
        ("data:\n  root: x\n", "experiment_dir: required key is missing"),
        (MINIMAL + "train:\n  max_tokens: lots\n", "train.max_tokens: Input should be a valid"),
        (MINIMAL + "model:\n  norm: middle\n", "model.norm: Input should be 'pre' or 'post'"),
        (MINIMAL + "model:\n  d_model: 100\n  heads: 8\n", "divisible by heads"),
        (MINIMAL + "train:\n  max_time: soon\n", "bad duration 'soon'"),
        ("experiment_dir: x\ndata:\n  src_lang: en\n", "set data.root"),
        ("experiment_dir: x\ndata: [1, 2\n", "not valid YAML"),
        ("- a list\n", "must hold a mapping"),
    ],
)
def test_errors_name_the_key(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=None) as error:
        load_config(write_config(tmp_path, text))
    assert expected in str(error.value)


def test_overrides(tmp_path):
    path = write_config(tmp_path, MINIMAL)
    config = load_config(path, ["train.lr=5e-4", "model.preset=toy", "data.root=/elsewhere"])
    assert config.train.lr == 5e-4 and config.model.d_model == 128
    assert str(config.data.root) == "/elsewhere"
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["train.lr"])


def test_amp_off_survives_yaml(tmp_path):
    """YAML 1.1 reads an unquoted ``off`` as False; it still means ``off``."""
    path = write_config(tmp_path, MINIMAL + "train:\n  amp: off\n")
    assert load_config(path).train.amp == "off"
    assert load_config(write_config(tmp_path, MINIMAL), ["train.amp=off"]).train.amp == "off"
    with pytest.raises(ConfigError, match=r"train\.amp"):
        load_config(write_config(tmp_path, MINIMAL), ["train.amp=on"])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "nope.yaml")


def test_parse_duration():
    assert parse_duration("60m") == 3600
    assert parse_duration("90") == 90
    assert parse_duration("1.5h") == 5400


@pytest.mark.parametrize("name", ["toy.yaml", "multi30k_en_de.yaml", "multi30k_en_de_rnn.yaml"])
def test_shipped_configs_list_every_key(name):
    """The shipped configurations are the reference: every key of every section (the
    model's architecture's own), with its default in a comment."""
    import yaml

    from rosetta.config import ARCHITECTURES, DecodeConfig, TokenizerConfig, TrainConfig

    data = yaml.safe_load((ROOT / "configs" / name).read_text(encoding="utf-8"))
    model_class = ARCHITECTURES[data["model"]["arch"]]
    for section, cls in (
        ("tokenizer", TokenizerConfig),
        ("model", model_class),
        ("train", TrainConfig),
        ("decode", DecodeConfig),
    ):
        assert set(data[section]) == set(cls.model_fields), section
