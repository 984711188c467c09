"""One trained model through every inference path: quality, agreement and speed.

    python benchmarks/inference_variants.py MODEL_DIR --src test2016.en --ref test2016.de

Paths: rosetta's own PyTorch search in fp32 and with dynamic int8 linear layers
(``--quantize int8``), and, for a Transformer, CTranslate2 on the model
exported by ``rosetta export`` in fp32 and int8. For each: sacreBLEU BLEU and
chrF with greedy search and beam 5, sentences/s, and the share of sentences
whose greedy output is the same as rosetta fp32's greedy output (the export's
fidelity, and what quantization changes). Each path runs in a process of its
own. Results go to benchmarks/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shlex
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from results_io import write_results
from rosetta.config import load_config
from rosetta.decode.translator import Translator
from rosetta.evaluate import evaluate_files


def variants(model_dir: Path, work: Path) -> dict[str, Callable[[int], object]]:
    """Name -> a function making that path's translator for a beam size (the
    CTranslate2 paths export the model into ``work`` first)."""
    found: dict[str, Callable[[int], object]] = {
        "rosetta fp32": lambda beam: Translator.load(model_dir, beam=beam),
        "rosetta int8": lambda beam: Translator.load(model_dir, quantize="int8", beam=beam),
    }
    config = load_config(model_dir / "config.yaml")
    if config.model.arch == "transformer":
        from rosetta.export.ctranslate2 import CTranslate2Translator, export_ctranslate2

        for quantization in ("fp32", "int8"):

            def make(beam: int, quantization: str = quantization) -> CTranslate2Translator:
                out = work / quantization
                if not out.exists():
                    export_ctranslate2(
                        model_dir, out, None if quantization == "fp32" else quantization
                    )
                options = config.decode.with_overrides(beam=beam)
                return CTranslate2Translator(out, options)

            found[f"CTranslate2 {quantization}"] = make
    return found


def evaluate_path(path: str, args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """One path, greedy and beam 5, in a process of its own: once CTranslate2 (which
    brings its own OpenMP runtime) has run in a process, PyTorch's parallel
    regions there run slower (``speed.CTranslate2Process`` has the figures)."""
    torch.set_num_threads(args.threads)
    make = variants(args.model_dir, work)[path]
    return {f"beam{beam}": evaluate_files(make(beam), args.src, args.ref) for beam in (1, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--ref", type=Path, required=True)
    parser.add_argument("--name", default=None, help="result file name")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    name = args.name or f"inference_{args.model_dir.parent.name}"
    results: dict = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "threads": args.threads,
        "paths": {},
    }
    reference: list[str] = []
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="rosetta-variants-") as work:
        for path in variants(args.model_dir, Path(work)):
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as process:
                scores = process.submit(evaluate_path, path, args, Path(work)).result()
            results["paths"][path] = scores
            for beam in (1, 5):
                result = scores[f"beam{beam}"]
                hypotheses = result.pop("hypotheses")
                if beam == 1:
                    reference = reference or hypotheses  # rosetta fp32 comes first
                    same = sum(h == r for h, r in zip(hypotheses, reference))
                    result["same_greedy_as_rosetta_fp32"] = same / len(reference)
                print(
                    f"{path}, beam {beam}: BLEU {result['bleu']:.2f}, chrF "
                    f"{result['chrf']:.1f}, {result['sentences_per_s']:.1f} sentences/s",
                    flush=True,
                )

    rows = [
        f"`{results['command']}`",
        "",
        "| path | greedy BLEU | beam 5 BLEU | beam 5 chrF | greedy same as rosetta fp32 "
        "| greedy sent/s | beam 5 sent/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for path, scores in results["paths"].items():
        greedy, beam = scores["beam1"], scores["beam5"]
        rows.append(
            f"| {path} | {greedy['bleu']:.2f} | {beam['bleu']:.2f} | {beam['chrf']:.1f} | "
            f"{100 * greedy['same_greedy_as_rosetta_fp32']:.1f}% | "
            f"{greedy['sentences_per_s']:.0f} | {beam['sentences_per_s']:.0f} |"
        )
    signature = results["paths"]["rosetta fp32"]["beam5"]["bleu_signature"]
    table = "\n".join(rows) + f"\n\nBLEU signature: `{signature}`\n"
    write_results(name, results, table)


if __name__ == "__main__":
    main()
