"""Multi30k En->De benchmark: prepare, train for a wall-clock budget, evaluate.

    python benchmarks/multi30k.py [--config configs/multi30k_en_de.yaml] [--budget 60m | --steps N]

Reports, on val and test2016, sacreBLEU BLEU and chrF (cased, detokenised,
13a) for greedy search and beam 5, decoding speed, parameter count and
training throughput. Results go to benchmarks/results/<name>.json and .md.
Decoding time is not part of the training budget.

``--length-penalties 0.6,1.0,1.5`` tries those GNMT alphas for beam 5 on val
and decodes the test set with the best one (the test set never takes part in
the choice); by default beam 5 uses the config's ``decode.length_penalty``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from results_io import write_results
from rosetta.config import load_config
from rosetta.data.prepare import corpus_root, prepare
from rosetta.decode.translator import Translator
from rosetta.evaluate import evaluate_files
from rosetta.modeldir import read_metadata
from rosetta.train.trainer import train


def training_throughput(metrics_path: Path) -> float:
    """Mean target tokens/s over the logged training windows."""
    rates = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "train":
            rates.append(record["tgt_tokens_per_s"])
    return sum(rates) / len(rates) if rates else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/multi30k_en_de.yaml")
    parser.add_argument("--budget", default="60m", help="training wall-clock budget")
    parser.add_argument("--steps", type=int, default=0,
                        help="budget in updates instead (the same on every machine)")  # fmt: skip
    parser.add_argument("--name", default=None, help="result file name (default: config stem)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--skip-train", action="store_true", help="evaluate an existing model")
    parser.add_argument(
        "--length-penalties",
        default=None,
        help="comma-separated GNMT alphas for beam 5, chosen on val (default: the config's)",
    )
    args = parser.parse_args()

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    budget = [f"train.max_time={args.budget}"]
    if args.steps:
        budget = ["train.max_time=null", f"train.max_steps={args.steps}"]
    config = load_config(args.config, [*args.set, *budget])
    name = args.name or Path(args.config).stem
    exp = config.experiment_dir
    if not args.skip_train:
        if (exp / "checkpoints").exists():
            raise SystemExit(
                f"{exp}/checkpoints exists: remove it or pass --set experiment_dir=..."
            )
        prepare(config)
        start = time.monotonic()
        train(config)
        print(f"training took {(time.monotonic() - start) / 60:.1f} min")

    model_dir = exp / "model"
    metadata = read_metadata(model_dir)
    root = corpus_root(config)
    results = {
        "command": command,
        "config": args.config,
        "overrides": args.set,
        "budget": f"{args.steps} updates" if args.steps else args.budget,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch threads, torch {torch.__version__}",
        "parameters": metadata.get("parameters"),
        "steps": metadata.get("steps"),
        "training_minutes": metadata.get("training_minutes"),
        "weights": metadata.get("weights"),
        "train_tgt_tokens_per_s": training_throughput(exp / "metrics.jsonl"),
        "scores": {},
    }
    alphas = (
        [float(a) for a in args.length_penalties.split(",")]
        if args.length_penalties
        else [config.decode.length_penalty]
    )

    def score(split: str, beam: int, alpha: float) -> dict:
        src = root / f"{split}.{config.data.src_lang}"
        ref = root / f"{split}.{config.data.tgt_lang}"
        translator = Translator.load(model_dir, beam=beam, length_penalty=alpha)
        result = evaluate_files(translator, src, ref)
        result.pop("hypotheses")
        search = "greedy" if beam == 1 else f"beam {beam}, length penalty {alpha}"
        print(
            f"{split} {search}: {result['bleu_text']}  chrF {result['chrf']:.1f}  "
            f"{result['sentences_per_s']:.1f} sent/s"
        )
        return result

    valid, test = config.data.valid, config.data.test
    results["scores"][f"{valid}/beam1"] = score(valid, 1, alphas[0])
    sweep = {alpha: score(valid, 5, alpha) for alpha in alphas}
    alpha = max(alphas, key=lambda a: sweep[a]["bleu"])
    results["length_penalty"] = alpha
    if len(alphas) > 1:
        results["length_penalty_sweep_val_bleu"] = {str(a): r["bleu"] for a, r in sweep.items()}
    results["scores"][f"{valid}/beam5"] = sweep[alpha]
    results["scores"][f"{test}/beam1"] = score(test, 1, alpha)
    result = results["scores"][f"{test}/beam5"] = score(test, 5, alpha)
    print(f"signature: {result['bleu_signature']}")

    rows = [
        "| split | search | BLEU | chrF | sentences/s |",
        "|---|---|---|---|---|",
    ]
    for key, figures in results["scores"].items():
        split, search = key.split("/")
        rows.append(
            f"| {split} | {search.replace('beam1', 'greedy').replace('beam5', 'beam 5')} | "
            f"{figures['bleu']:.1f} | {figures['chrf']:.1f} | {figures['sentences_per_s']:.1f} |"
        )
    penalty = f"beam length penalty {alpha}"
    if len(alphas) > 1:
        tried = ", ".join(f"{a}: {r['bleu']:.1f}" for a, r in sweep.items())
        penalty += f" (best on val of {tried})"
    summary = (
        f"`{command}`\n\n{results['parameters']:,} parameters, {results['steps']} steps in "
        f"{results['training_minutes']} min, {results['train_tgt_tokens_per_s']:,.0f} target "
        f"tokens/s in training, weights: {results['weights']}; {penalty}.\n\n"
        + "\n".join(rows)
        + f"\n\nBLEU signature: `{result['bleu_signature']}`\n"
    )
    write_results(name, results, summary)


if __name__ == "__main__":
    main()
