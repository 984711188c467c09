"""``rosetta demo`` / ``make demo``: the whole data flow on the built-in toy task."""

from __future__ import annotations

from pathlib import Path

from rosetta.config import ExperimentConfig
from rosetta.data.prepare import corpus_root, prepare
from rosetta.decode.translator import Translator
from rosetta.evaluate import evaluate_files
from rosetta.train.trainer import train

EXAMPLES = 5


def fresh_directory(wanted: Path) -> Path:
    """``wanted``, or ``wanted-2``, ``wanted-3``, ... : the first that holds no earlier run
    (the demo never deletes or continues someone's work)."""
    candidate, number = Path(wanted), 1
    while (candidate / "checkpoints").exists() or (candidate / "model").exists():
        number += 1
        candidate = Path(f"{wanted}-{number}")
    if candidate != Path(wanted):
        print(f"{wanted} holds an earlier run (left untouched); this demo runs in {candidate}")
    return candidate


def run_demo(config: ExperimentConfig) -> float:
    """Prepares, trains, evaluates on the test split with beam search, translates
    a few examples; returns the test BLEU."""
    config = config.model_copy(update={"experiment_dir": fresh_directory(config.experiment_dir)})
    prepare(config)
    model_dir = train(config)
    translator = Translator.load(model_dir)
    root = corpus_root(config)
    src = root / f"{config.data.test}.{config.data.src_lang}"
    ref = root / f"{config.data.test}.{config.data.tgt_lang}"
    result = evaluate_files(translator, src, ref)
    search = ", ".join(f"{k} {v}" for k, v in translator.search.describe().items())
    print(f"\ntest set ({src.name}; search: {search}):")
    print(result["bleu_text"])
    print(f"  signature: {result['bleu_signature']}")
    print(f"chrF2 = {result['chrf']:.2f}")
    print("\nexamples:")
    sources = src.read_text(encoding="utf-8").splitlines()[:EXAMPLES]
    references = ref.read_text(encoding="utf-8").splitlines()[:EXAMPLES]
    for source, reference, output in zip(sources, references, result["hypotheses"]):
        print(f"  source:    {source}\n  reference: {reference}\n  rosetta:   {output}\n")
    print(f"model directory: {model_dir}  (try: rosetta translate {model_dir})")
    return result["bleu"]
