"""An experiment's checkpoints folder (``EXP/checkpoints``): what its files are named.

    last.pt       the state exact resume needs, written at every validation
    previous.pt   the state before it, kept in case last.pt is damaged
    best.pt       the best validated weights
    step_N.pt     the rolling weights of step N, for averaging

Reading and writing them is ``rosetta.train.checkpoint``'s; the names live here,
below the data layer, because ``rosetta prepare`` must know whether an experiment
holds trained work before it re-prepares the data that work is bound to.
"""

from __future__ import annotations

import re
from pathlib import Path

LAST, PREVIOUS, BEST = "last.pt", "previous.pt", "best.pt"

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def step_of(path: Path) -> int:
    """The N of a ``step_N.pt`` file."""
    match = _STEP_FILE.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a step checkpoint (step_N.pt)")
    return int(match.group(1))


def step_checkpoints(directory: Path) -> list[Path]:
    """The rolling ``step_N.pt`` files, oldest first."""
    found = []
    for path in Path(directory).glob("step_*.pt"):
        match = _STEP_FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def holds_training(directory: Path) -> bool:
    """Whether a checkpoints folder holds any checkpoint (trained work to protect)."""
    return Path(directory).is_dir() and any(Path(directory).glob("*.pt"))
