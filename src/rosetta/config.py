"""Typed experiment configuration, loaded from one YAML file.

Every section is a pydantic model that forbids unknown keys, so a typo such as
``modle:`` or ``d_modle: 256`` is an error naming the key, and a bad value names
the key and what was expected. ``load_config`` also applies ``--set key=value``
overrides from the command line before validation.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key."""


class Section(BaseModel):
    """Base for all sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ToyData(Section):
    """Settings of the built-in toy task (see ``rosetta.data.toy``)."""

    seed: int = 1
    train_size: int = Field(20000, gt=0)
    valid_size: int = Field(500, gt=0)
    test_size: int = Field(500, gt=0)


class DataConfig(Section):
    """Where the parallel corpus lives and how it is filtered."""

    root: Path | None = None
    src_lang: str = "en"
    tgt_lang: str = "de"
    train: str = "train"
    valid: str = "valid"
    test: str | None = "test"
    toy: ToyData | None = None
    max_len: int = Field(128, gt=0)
    max_ratio: float = Field(3.0, gt=1.0)

    @model_validator(mode="after")
    def _root_or_toy(self) -> DataConfig:
        if self.root is None and self.toy is None:
            raise ValueError("set data.root (a folder holding the corpus) or data.toy")
        return self


class TokenizerConfig(Section):
    """SentencePiece subword model."""

    type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = Field(8000, ge=16)
    joint: bool = True
    character_coverage: float = Field(1.0, gt=0.0, le=1.0)
    byte_fallback: bool = True
    input_sentence_size: int = Field(0, ge=0)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "toy": dict(d_model=128, d_ff=512, heads=4, encoder_layers=2, decoder_layers=2, dropout=0.1),
    "small": dict(d_model=256, d_ff=1024, heads=4, encoder_layers=3, decoder_layers=3, dropout=0.1),
    "base": dict(d_model=512, d_ff=2048, heads=8, encoder_layers=6, decoder_layers=6, dropout=0.1),
    "rnn_small": dict(
        arch="rnn",
        d_model=256,
        hidden_size=512,
        rnn_cell="lstm",
        attention="bahdanau",
        encoder_layers=1,
        decoder_layers=1,
        dropout=0.3,
    ),
}


class ModelConfig(Section):
    """Architecture and sizes. A ``preset`` fills the sizes; explicit keys win.

    ``d_model`` is the embedding (and output) size of both architectures; the
    Transformer-only keys are d_ff, heads, attention_dropout, activation, norm
    and positional; the RNN-only keys are rnn_cell, hidden_size, attention and
    input_feeding.
    """

    arch: Literal["transformer", "rnn"] = "transformer"
    preset: Literal["toy", "small", "base", "rnn_small"] | None = None
    d_model: int = Field(512, gt=0)
    d_ff: int = Field(2048, gt=0)
    heads: int = Field(8, gt=0)
    encoder_layers: int = Field(6, ge=1)
    decoder_layers: int = Field(6, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu"] = "relu"
    norm: Literal["pre", "post"] = "pre"
    positional: Literal["sinusoidal", "learned"] = "sinusoidal"
    max_positions: int = Field(1024, gt=0)
    tie_output: bool = True
    tie_all: bool = True
    rnn_cell: Literal["lstm", "gru"] = "lstm"
    hidden_size: int = Field(512, gt=0)
    attention: Literal["bahdanau", "dot", "general"] = "bahdanau"
    input_feeding: bool = True

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("preset") in MODEL_PRESETS:
            return {**MODEL_PRESETS[values["preset"]], **values}
        return values

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.arch == "transformer" and self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if self.arch == "rnn" and self.hidden_size % 2:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be even: "
                "the bidirectional encoder gives each direction half"
            )
        return self


class TrainConfig(Section):
    """Optimisation, validation and stopping."""

    max_tokens: int = Field(4096, gt=0)
    accumulate: int = Field(1, ge=1)
    lr: float | None = Field(None, gt=0.0)
    warmup: int = Field(4000, ge=1)
    schedule: Literal["noam", "inverse_sqrt", "constant", "plateau"] = "noam"
    plateau_factor: float = Field(0.5, gt=0.0, lt=1.0)
    plateau_patience: int = Field(1, ge=1)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-9, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    clip_norm: float = Field(1.0, ge=0.0)
    max_steps: int = Field(0, ge=0)
    max_epochs: int = Field(0, ge=0)
    max_time: str | None = None
    valid_every: int = Field(1000, ge=1)
    valid_bleu: bool = True
    valid_bleu_size: int = Field(0, ge=0)
    log_every: int = Field(50, ge=1)
    keep_last: int = Field(5, ge=1)
    max_nonfinite: int = Field(10, ge=1)  # consecutive NaN/inf losses before training stops
    patience: int = Field(0, ge=0)
    average_last: int = Field(0, ge=0)
    attention_samples: int = Field(0, ge=0)
    seed: int = 1
    threads: int = Field(0, ge=0)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_off(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `off` (in a file or a --set override) as False
        return "off" if value is False else value

    @model_validator(mode="after")
    def _check_time(self) -> TrainConfig:
        if self.max_time is not None:
            parse_duration(self.max_time)
        return self


class DecodeConfig(Section):
    """Search settings used by validation BLEU, ``translate`` and ``evaluate``."""

    beam: int = Field(5, ge=1)
    length_penalty: float = Field(0.6, ge=0.0)
    max_len_a: float = Field(1.5, ge=0.0)
    max_len_b: int = Field(10, ge=1)
    max_tokens: int = Field(4000, gt=0)
    batch_size: int = Field(64, ge=1)


class ExperimentConfig(Section):
    """One experiment: data, tokenizer, model, training and decoding."""

    experiment_dir: Path
    data: DataConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    decode: DecodeConfig = DecodeConfig()

    def to_yaml(self) -> str:
        """The resolved configuration (presets expanded), as saved next to checkpoints."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """Parses ``90``, ``90s``, ``60m``, ``1.5h`` or ``1d`` into seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"bad duration {text!r}: expected a number with s, m, h or d, e.g. 60m")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def _format_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def _yaml_problem(error: Exception) -> str:
    """One line for a YAML error: what is wrong and where (line and column, 1-based)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


# PyYAML raises ValueError or RecursionError on a few malformed scalars and on very
# deep nesting rather than a YAMLError; all of them mean "not valid YAML"
_YAML_ERRORS = (yaml.YAMLError, ValueError, RecursionError)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Applies one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"bad override {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = [part.strip() for part in key.split(".")]
    if not all(parts):
        raise ConfigError(f"bad override {assignment!r}: expected a key such as train.lr")
    try:
        value = yaml.safe_load(raw)
    except _YAML_ERRORS as error:
        raise ConfigError(
            f"bad override {assignment!r}: the value is not valid YAML: {_yaml_problem(error)}"
        ) from None
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"bad override {assignment!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validates a plain dict into an ``ExperimentConfig``, with readable errors."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"invalid configuration in {source}:\n{_format_error(error)}") from None


def packaged_config(name: str) -> Path:
    """A configuration shipped inside the package (``toy.yaml``: the demo's), so that
    ``rosetta demo`` works from any directory."""
    return Path(str(resources.files("rosetta") / "configs" / name))


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Reads a YAML experiment file, applies ``key=value`` overrides and validates it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a leading BOM is not YAML
    except OSError as error:
        raise ConfigError(f"cannot read configuration {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start + 1})") from None
    try:
        data = yaml.safe_load(text)
    except _YAML_ERRORS as error:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (data, model, train, ...)")
    for assignment in overrides:
        apply_override(data, assignment)
    return config_from_dict(data, str(path))
