"""Where the benchmark scripts put their figures: benchmarks/results/<name>.json
(everything measured) and <name>.md (the table for the README)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rosetta.safeio import atomic_write_text

RESULTS = Path(__file__).parent / "results"


def write_results(name: str, results: dict, table: str) -> None:
    """Prints ``table`` and writes both files (each whole or not at all: a run
    stopped while writing leaves the previous figures)."""
    print(table)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(results, indent=2))
    atomic_write_text(RESULTS / f"{name}.md", table)


def mean_sd(values: list[float]) -> str:
    """``mean ± sd`` to two decimals (the mean alone for one value)."""
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}"
