"""Where the benchmark scripts put their figures: benchmarks/results/<name>.json
(everything measured) and <name>.md (the table for the README)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_results(name: str, results: dict, table: str) -> None:
    """Prints ``table`` and writes both files."""
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{name}.md").write_text(table)
