"""Checkpoints: atomic, checksummed, and loadable without running any pickled code.

``last.pt`` holds everything exact resume needs (model, optimizer, scaler,
schedule position, data position, RNG states); ``previous.pt`` is the state
before it, kept so a damaged ``last.pt`` costs one validation interval, not the
run; ``best.pt`` and the rolling ``step_N.pt`` files hold model weights for
translation and averaging (``average_checkpoints``; the file names are
``rosetta.checkpointdir``'s).

The file format is a two-line header followed by a ``torch.save`` archive::

    ROSETTA-CHECKPOINT 1
    sha256 <hex digest of the archive> <archive length in bytes>
    <archive>

A file is accepted only when the digest and length match, so a checkpoint cut
short by a crash or damaged on disk is an error that names it, never NaN
weights. The archive holds only tensors and plain Python values (dicts, lists,
numbers, strings) and is read with ``torch.load(weights_only=True)``, whose
unpickler refuses anything else: a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rosetta.checkpointdir import BEST, LAST, PREVIOUS, holds_training, step_checkpoints, step_of
from rosetta.safeio import TEMP_PREFIX, sha256_bytes, write_chunks_atomic

# the file names come from rosetta.checkpointdir (the data layer reads them too) and
# stay part of this module's API: checkpoint.LAST, checkpoint.step_of, ...
__all__ = [
    "BEST",
    "LAST",
    "MAGIC",
    "PREVIOUS",
    "CheckpointError",
    "average_checkpoints",
    "describe_fallback",
    "holds_training",
    "load",
    "prune",
    "restore_rng_states",
    "rng_states",
    "save",
    "save_training_state",
    "step_checkpoints",
    "step_of",
]

MAGIC = b"ROSETTA-CHECKPOINT 1\n"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, unsafe or from an incompatible run."""


def save(obj: dict[str, Any], path: Path) -> None:
    """Serialises ``obj`` (tensors and plain values only) and writes it atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    archive = buffer.getbuffer()
    header = f"sha256 {sha256_bytes(archive)} {len(archive)}\n".encode()
    try:
        write_chunks_atomic(Path(path), [MAGIC, header, archive])
    except OSError as error:  # a full disk, a folder made read-only: say so, keep the rest
        raise CheckpointError(
            f"could not save {path}: {error.strerror or error}; the checkpoints saved "
            "before are intact (free space, then continue with --resume)"
        ) from None


def load(path: Path, bound_to: dict[str, str] | None = None) -> dict[str, Any]:
    """Reads and verifies a checkpoint on the CPU; any problem is a ``CheckpointError``.

    With ``bound_to`` (the experiment's data and tokenizer fingerprints, see
    ``rosetta.data.prepare.binding``), a checkpoint trained on anything else is
    refused too.
    """
    state = _read(Path(path))
    if bound_to is not None and state.get("binding") != bound_to:
        found = state.get("binding") or {}
        changed = [name for name in ("data", "tokenizer") if found.get(name) != bound_to[name]]
        raise CheckpointError(
            f"{path} was trained with another {' and '.join(changed)} than this experiment "
            "now has: it cannot be used with them (start a new experiment_dir for new data)"
        )
    return state


def _read(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror}") from None
    if not data.startswith(MAGIC):
        raise CheckpointError(
            f"{path} is not a rosetta checkpoint (it lacks the checksummed header; files "
            "from other programs or older rosetta versions are refused)"
        )
    header_end = data.find(b"\n", len(MAGIC))
    fields = data[len(MAGIC) : header_end].split()
    if header_end < 0 or len(fields) != 3 or fields[0] != b"sha256" or not fields[2].isdigit():
        raise CheckpointError(f"{path} is damaged: its header is unreadable")
    archive = memoryview(data)[header_end + 1 :]
    if len(archive) != int(fields[2]):
        raise CheckpointError(
            f"{path} is damaged: {len(archive):,} bytes where {int(fields[2]):,} were written "
            "(cut short?)"
        )
    if sha256_bytes(archive) != fields[1].decode("ascii", "replace"):
        raise CheckpointError(f"{path} is damaged: its contents do not match its checksum")
    try:
        return torch.load(io.BytesIO(archive), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"{path} holds objects that only pickle code could rebuild ({reason}); "
            "rosetta refuses to run code from a file"
        ) from None
    except Exception as error:  # a checksummed archive that torch cannot parse
        raise CheckpointError(f"{path} is not a readable checkpoint ({error})") from None


def save_training_state(obj: dict[str, Any], directory: Path) -> Path:
    """Writes ``last.pt``, first keeping the state it replaces as ``previous.pt``.

    At every instant ``last.pt`` is a complete file (the old one or the new one).
    """
    last, previous = directory / LAST, directory / PREVIOUS
    if last.exists():
        tmp = directory / f"{TEMP_PREFIX}{PREVIOUS}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(last, tmp)  # a second name for the same bytes: no copy
        except OSError:
            shutil.copyfile(last, tmp)
        os.replace(tmp, previous)
    save(obj, last)
    return last


def describe_fallback(path: Path) -> str:
    """What to do when ``path`` cannot be resumed: name an intact earlier state, if any."""
    previous = path.parent / PREVIOUS
    if path.name == PREVIOUS or not previous.exists():
        return "start a new experiment_dir or restore the file from a backup"
    try:
        step = load(previous)["progress"]["step"]
    except (CheckpointError, KeyError, TypeError):
        return f"{previous} is not usable either; start a new experiment_dir"
    return f"the state before it is intact: resume from step {step} with --resume {previous}"


def rng_states() -> dict[str, Any]:
    """Every random generator's state, as tensors and plain values."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def prune(directory: Path, keep: int) -> None:
    """Deletes all but the newest ``keep`` step checkpoints."""
    for path in step_checkpoints(directory)[:-keep]:
        path.unlink()


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
