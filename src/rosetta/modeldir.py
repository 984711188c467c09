"""The self-contained model directory: everything needed to translate.

    MODEL_DIR/config.yaml       resolved experiment configuration
    MODEL_DIR/spm.model, .vocab the SentencePiece model(s) = the vocabulary
    MODEL_DIR/model.safetensors weights (no pickle is loaded to translate)
    MODEL_DIR/metadata.json     sizes, training steps, scores with signatures

Copy the folder anywhere and ``rosetta translate MODEL_DIR`` works.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_model, save_model

from rosetta.config import ExperimentConfig, config_from_dict
from rosetta.data.tokenizer import Tokenizer
from rosetta.model import build_model

CONFIG, WEIGHTS, METADATA = "config.yaml", "model.safetensors", "metadata.json"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_model_dir(
    directory: Path,
    config: ExperimentConfig,
    tokenizer_dir: Path,
    model: torch.nn.Module,
    metadata: dict[str, Any],
) -> Path:
    """Writes (or refreshes) a model directory; each file is replaced atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(directory / CONFIG, config.to_yaml())
    tokenizer = Tokenizer.load(tokenizer_dir)
    for name in tokenizer.files():
        if Path(tokenizer_dir).resolve() != directory.resolve():
            shutil.copyfile(Path(tokenizer_dir) / name, directory / f".{name}.tmp")
            os.replace(directory / f".{name}.tmp", directory / name)
    tmp = directory / f".{WEIGHTS}.tmp"
    if any(p.device.type != "cpu" for p in model.parameters()):
        # on a GPU, cuDNN keeps each nn.LSTM/GRU's weights as views of one flat
        # buffer, which safetensors refuses to save; a CPU copy gives each its own
        model = copy.deepcopy(model).cpu()
    save_model(model, str(tmp))
    os.replace(tmp, directory / WEIGHTS)
    parameters = sum(p.numel() for p in model.parameters())
    info = {"parameters": parameters, **metadata}
    _atomic_write_text(directory / METADATA, json.dumps(info, indent=2, ensure_ascii=False))
    return directory


def load_model_dir(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[ExperimentConfig, Tokenizer, torch.nn.Module]:
    """Loads configuration, tokenizer and weights; the model is in eval mode."""
    directory = Path(directory)
    if not (directory / WEIGHTS).exists():
        raise FileNotFoundError(f"{directory} is not a rosetta model directory (no {WEIGHTS})")
    data = yaml.safe_load((directory / CONFIG).read_text(encoding="utf-8"))
    config = config_from_dict(data, str(directory / CONFIG))
    tokenizer = Tokenizer.load(directory)
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    try:
        load_model(model, str(directory / WEIGHTS), device=str(device))
    except Exception as error:
        raise RuntimeError(f"cannot load weights from {directory / WEIGHTS}: {error}") from None
    return config, tokenizer, model.to(device).eval()


def read_metadata(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / METADATA
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
