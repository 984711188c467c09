"""rosetta: neural machine translation, from a parallel corpus to translations.

The Python API::

    from rosetta import Translator, evaluate_files

    translator = Translator.load("experiments/toy/model", beam=4)
    translator.translate(["the dog sees a cat."])[0].text
"""

from __future__ import annotations

from typing import Any

from rosetta.version import __version__

__all__ = ["Translator", "__version__", "evaluate_files"]


def __getattr__(name: str) -> Any:
    # imported on first use: ``import rosetta`` (and ``rosetta --version``) stays light
    if name == "Translator":
        from rosetta.decode.translator import Translator

        return Translator
    if name == "evaluate_files":
        from rosetta.evaluate import evaluate_files

        return evaluate_files
    raise AttributeError(f"module 'rosetta' has no attribute {name!r}")
