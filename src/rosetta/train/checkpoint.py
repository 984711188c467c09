"""Checkpoints, written atomically so a crash never leaves a half-written file.

``last.pt`` holds everything exact resume needs (model, optimizer, scaler,
schedule position, data position, RNG states); ``best.pt`` and the rolling
``step_N.pt`` files hold model weights for translation and averaging.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or from an incompatible model."""


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: Path) -> dict[str, Any]:
    """Loads a checkpoint on the CPU with a clear error for missing or corrupt files."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for a damaged zip
        raise CheckpointError(f"{path} is not a readable checkpoint ({error})") from None


def rng_states() -> dict[str, Any]:
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def step_checkpoints(directory: Path) -> list[Path]:
    """The rolling ``step_N.pt`` files, oldest first."""
    found = []
    for path in directory.glob("step_*.pt"):
        match = _STEP_FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def prune(directory: Path, keep: int) -> None:
    """Deletes all but the newest ``keep`` step checkpoints."""
    for path in step_checkpoints(directory)[:-keep]:
        path.unlink()
