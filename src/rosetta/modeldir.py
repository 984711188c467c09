"""The self-contained model directory: everything needed to translate.

    MODEL_DIR/config.yaml       resolved experiment configuration
    MODEL_DIR/spm.model, .vocab the SentencePiece model(s) = the vocabulary
    MODEL_DIR/model.safetensors weights (no pickle is loaded to translate)
    MODEL_DIR/metadata.json     sizes, training steps, scores, SHA-256 of every file

Copy the folder anywhere and ``rosetta translate MODEL_DIR`` works.

A directory is written in a staging folder and swapped in whole, so a crash
leaves the previous one. Loading checks that its parts belong together, and
names the part that does not: each file against the checksum recorded in
``metadata.json``; ``config.yaml``'s model section against the one stored
inside ``model.safetensors``; the SentencePiece model against the fingerprint
of the one the weights were trained with; every tensor's shape against the
model the configuration builds.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from rosetta.config import ConfigError, ExperimentConfig, load_config, model_config
from rosetta.data.tokenizer import Tokenizer
from rosetta.device import resolve_device
from rosetta.model import model_for
from rosetta.safeio import atomic_write_text, replace_directory, sha256_file

CONFIG, WEIGHTS, METADATA = "config.yaml", "model.safetensors", "metadata.json"
# keys of the safetensors header's metadata (strings only, by the format's rules)
MODEL_KEY, TOKENIZER_KEY = "rosetta.model", "rosetta.tokenizer"


class ModelDirError(ValueError):
    """A model directory that is incomplete, damaged, or whose parts do not match."""


def check_finite(state: dict[str, torch.Tensor], what: str, doing: str = "write") -> None:
    """Raises if any floating-point tensor holds NaN or infinity: such weights are
    neither written (``doing="write"``) nor used to translate (``"use"``)."""
    bad = [
        name
        for name, tensor in state.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise ModelDirError(
            f"refusing to {doing} {what}: {len(bad)} tensors hold NaN or infinity "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
        )


def save_model_dir(
    directory: Path,
    config: ExperimentConfig,
    tokenizer_dir: Path,
    model: torch.nn.Module,
    metadata: dict[str, Any],
) -> Path:
    """Writes (or replaces) a model directory in one swap, after checking the weights."""
    directory = Path(directory)
    check_finite(model.state_dict(), str(directory))
    if any(p.device.type != "cpu" for p in model.parameters()):
        # on a GPU, cuDNN keeps each nn.LSTM/GRU's weights as views of one flat
        # buffer, which safetensors refuses to save; a CPU copy gives each its own
        model = copy.deepcopy(model).cpu()
    tokenizer = Tokenizer.load(tokenizer_dir)
    embedded = {
        MODEL_KEY: json.dumps(config.model.model_dump(mode="json"), sort_keys=True),
        TOKENIZER_KEY: tokenizer.fingerprint(),
    }
    with replace_directory(directory) as staging:
        atomic_write_text(staging / CONFIG, config.to_yaml())
        for name in tokenizer.files():
            shutil.copyfile(Path(tokenizer_dir) / name, staging / name)
        save_model(model, str(staging / WEIGHTS), metadata=embedded)
        parameters = sum(p.numel() for p in model.parameters())
        write_metadata(staging, {"parameters": parameters, **metadata})
    return directory


def write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    """Writes ``metadata.json``: ``metadata`` and the SHA-256 of every other file in
    ``directory`` (a model directory, or a CTranslate2 export), checked at load."""
    checksums = {
        path.name: sha256_file(path)
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != METADATA
    }
    info = {**metadata, "sha256": checksums}
    atomic_write_text(directory / METADATA, json.dumps(info, indent=2, ensure_ascii=False))


def load_model_dir(
    directory: str | Path, device: str | torch.device | None = None
) -> tuple[ExperimentConfig, Tokenizer, torch.nn.Module]:
    """Loads configuration, tokenizer and weights after checking they belong together;
    the model is in eval mode, on ``device`` (None: the model's ``decode.device``).
    Any problem is a ``ModelDirError`` naming the file."""
    directory = Path(directory)
    if not directory.is_dir() or not (directory / WEIGHTS).exists():
        raise ModelDirError(f"{directory} is not a rosetta model directory (no {WEIGHTS})")
    verify_checksums(directory)
    try:
        config = load_config(directory / CONFIG)
    except ConfigError as error:
        raise ModelDirError(str(error)) from None
    try:
        tokenizer = Tokenizer.load(directory)
    except (FileNotFoundError, ValueError) as error:
        raise ModelDirError(f"{directory}: {error}") from None
    try:
        with safe_open(str(directory / WEIGHTS), framework="pt") as weights:
            embedded = weights.metadata() or {}
            shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelDirError(f"{directory / WEIGHTS} is not readable ({error})") from None
    _check_config(directory, config, embedded)
    if embedded.get(TOKENIZER_KEY, tokenizer.fingerprint()) != tokenizer.fingerprint():
        raise ModelDirError(
            f"the SentencePiece model in {directory} ({', '.join(tokenizer.files()[:2])}) is "
            f"not the one {WEIGHTS} was trained with: its ids would mean other pieces"
        )
    if not isinstance(device, torch.device):
        device = resolve_device(device or config.decode.device)
    model = model_for(config.model, tokenizer)
    _check_shapes(directory, model, shapes)
    try:
        load_model(model, str(directory / WEIGHTS), strict=True, device=str(device))
    except (SafetensorError, RuntimeError) as error:
        raise ModelDirError(f"cannot load {directory / WEIGHTS}: {error}") from None
    check_finite(model.state_dict(), str(directory / WEIGHTS), doing="use")
    return config, tokenizer, model.to(device).eval()


# model keys a fine-tuning run may set otherwise than the model it starts from: they
# act in training only, not on what the weights compute
FINE_TUNING_KEYS = frozenset({"dropout", "attention_dropout"})


def resolve_init(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` with its model section taken from ``config.init``'s directory.

    A key the configuration sets itself must agree with the directory's (a
    ``ConfigError`` names each that does not), but for ``FINE_TUNING_KEYS``,
    which it may change; every other key comes from the directory. Without
    ``init``, ``config`` as it is. Applying it twice changes nothing."""
    if config.init is None:
        return config
    init = Path(config.init)
    if not (init / WEIGHTS).exists() or not (init / CONFIG).exists():
        raise ConfigError(f"init: {init} is not a rosetta model directory (no {WEIGHTS})")
    try:
        pretrained = load_config(init / CONFIG).model
    except ConfigError as error:
        raise ConfigError(f"init: {error}") from None
    given = config.model.model_dump(mode="json") if "model" in config.model_fields_set else {}
    stated = {key: given[key] for key in config.model.model_fields_set if key in given}
    wanted = pretrained.model_dump(mode="json")
    conflicts = [
        f"model.{key}: {value!r} here, {wanted.get(key)!r} in {init / CONFIG}"
        for key, value in sorted(stated.items())
        if key not in FINE_TUNING_KEYS and key != "preset" and value != wanted.get(key)
    ]
    if conflicts:
        raise ConfigError(
            "the model section disagrees with the model it starts from (init); leave "
            "these keys out to take the model's: " + "; ".join(conflicts)
        )
    changes = {key: stated[key] for key in FINE_TUNING_KEYS & stated.keys()}
    model = model_config({**wanted, **changes})
    return config.model_copy(update={"model": model})


def verify_checksums(directory: Path) -> None:
    """Checks every file ``metadata.json`` lists against its SHA-256 (``config.yaml``
    excepted: its decode section may be edited, its model section is checked against
    the weights); warns when none are recorded (directories of older versions)."""
    if not (directory / METADATA).exists():  # every rosetta version has written one
        raise ModelDirError(
            f"{directory / METADATA} is missing: it holds the checksums that show the "
            "files are the ones written together; restore it from where the model came from"
        )
    metadata = read_metadata(directory)
    recorded = metadata.get("sha256")
    if not recorded:
        warnings.warn(
            f"{directory / METADATA} records no checksums (written by an older rosetta): "
            "damage to the files cannot be detected",
            stacklevel=3,
        )
        return
    for name, digest in recorded.items():
        path = directory / name
        if not path.exists():
            raise ModelDirError(f"{path} is missing")
        if name == CONFIG:
            continue  # a user may edit the decode section; its model section is checked below
        if sha256_file(path) != digest:
            raise ModelDirError(
                f"{path} is damaged or was replaced: its SHA-256 differs from the one in {METADATA}"
            )


def _check_config(directory: Path, config: ExperimentConfig, embedded: dict[str, str]) -> None:
    """Compares config.yaml's model section with the one the weights were saved with."""
    if MODEL_KEY not in embedded:
        return
    trained = model_config(json.loads(embedded[MODEL_KEY])).model_dump(mode="json")
    stated = config.model.model_dump(mode="json")
    differences = [
        f"model.{key}: {stated.get(key)!r} in {CONFIG}, {trained.get(key)!r} in {WEIGHTS}"
        for key in sorted(trained.keys() | stated.keys())
        if trained.get(key) != stated.get(key)
    ]
    if differences:
        raise ModelDirError(
            f"{directory / CONFIG} does not describe the weights beside it: "
            + "; ".join(differences)
        )


def _check_shapes(
    directory: Path, model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]
) -> None:
    """Every stored tensor must exist in the configured model with the same shape (tied
    weights are stored once, so the model may have names the file lacks)."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    problems = [f"{name} unexpected" for name in shapes if name not in expected]
    problems += [
        f"{name} is {shapes[name]}, the configuration builds {expected[name]}"
        for name in shapes
        if name in expected and shapes[name] != expected[name]
    ]
    if problems:
        raise ModelDirError(
            f"{directory / WEIGHTS} does not fit {directory / CONFIG} and its vocabulary: "
            + "; ".join(problems[:4])
            + ("; ..." if len(problems) > 4 else "")
        )


def read_metadata(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / METADATA
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelDirError(f"{path} is not valid JSON") from None
