"""Multi30k En->De benchmark: prepare, train for a budget, evaluate.

    python benchmarks/multi30k.py [--config configs/multi30k_en_de.yaml] [--budget 60m | --steps N]
    python benchmarks/multi30k.py --budget 60m --curve 0.5,1,2  # a learning curve, one run
    python benchmarks/multi30k.py --steps N --curve 0.5,1,2     # ... in updates

Reports, on val and test2016, sacreBLEU BLEU and chrF (cased, detokenised,
13a) for greedy search and beam 5, decoding speed, parameter count and
training throughput. Results go to benchmarks/results/<name>.json and .md.
Decoding time is not part of the training budget. Beam 5 decodes with the
model's own length penalty (``train.length_penalty_grid`` chooses it on val).

``--curve 0.5,1,2`` trains one run of twice the budget and scores the model
directory a run of 0.5N, N and 2N updates would have written, N being
``--steps`` or the updates made in ``--budget`` (the last validation within
it; the other points are the validations nearest their multiple of N). The
weights at a point are chosen among the run's first updates only
(``export_at_step``; the learning-rate schedules do not depend on the budget).
Bars: test2016 beam 5 BLEU >= 38.0 at N, and no larger budget more than 0.2
BLEU below a smaller one.

``--length-penalties 0.6,1.0,1.5`` tries those GNMT alphas for beam 5 on val
and decodes the test set with the best one (the test set never takes part in
the choice), for a model trained without ``train.length_penalty_grid``.
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
from rosetta.config import load_config, parse_duration
from rosetta.data.prepare import corpus_root, prepare
from rosetta.decode.translator import Translator
from rosetta.evaluate import evaluate_files
from rosetta.modeldir import read_metadata
from rosetta.train import checkpoint
from rosetta.train.selection import export_at_step
from rosetta.train.trainer import train


def training_throughput(metrics_path: Path) -> float:
    """Mean target tokens/s over the logged training windows."""
    rates = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "train":
            rates.append(record["tgt_tokens_per_s"])
    return sum(rates) / len(rates) if rates else float("nan")


def scored(model_dir: Path, config, alphas: list[float] | None) -> dict:
    """Val and test greedy and beam 5 figures of one model directory; beam 5 with
    the model's length penalty, or the best of ``alphas`` on val."""
    root = corpus_root(config)

    def score(split: str, beam: int, alpha: float | None) -> dict:
        src = root / f"{split}.{config.data.src_lang}"
        ref = root / f"{split}.{config.data.tgt_lang}"
        translator = Translator.load(model_dir, beam=beam, length_penalty=alpha)
        result = evaluate_files(translator, src, ref)
        result.pop("hypotheses")
        result["length_penalty"] = alpha = translator.search.options.length_penalty
        search = "greedy" if beam == 1 else f"beam {beam}, length penalty {alpha}"
        print(
            f"{model_dir.name} {split} {search}: {result['bleu_text']}  "
            f"chrF {result['chrf']:.1f}  {result['sentences_per_s']:.1f} sent/s"
        )
        return result

    valid, test = config.data.valid, config.data.test
    figures: dict = {"scores": {f"{valid}/beam1": score(valid, 1, None)}}
    sweep = {alpha: score(valid, 5, alpha) for alpha in alphas or [None]}
    alpha = max(sweep, key=lambda a: sweep[a]["bleu"])
    if alphas:
        figures["length_penalty_sweep_val_bleu"] = {str(a): r["bleu"] for a, r in sweep.items()}
    figures["scores"][f"{valid}/beam5"] = sweep[alpha]
    figures["scores"][f"{test}/beam1"] = score(test, 1, alpha)
    figures["scores"][f"{test}/beam5"] = score(test, 5, alpha)
    figures["length_penalty"] = figures["scores"][f"{test}/beam5"]["length_penalty"]
    metadata = read_metadata(model_dir)
    for key in ("parameters", "steps", "training_minutes", "weights"):
        figures[key] = metadata.get(key)
    return figures


def multiples_of(curve: str) -> list[float]:
    """``--curve``'s multiples, ascending; the largest sets the run's length."""
    multiples = sorted({float(m) for m in curve.split(",")})
    if multiples[0] <= 0 or 1.0 not in multiples:
        raise SystemExit(f"--curve {curve}: positive multiples of the budget, 1 among them")
    return multiples


def curve_steps(multiples: list[float], steps: int, valid_every: int) -> dict[float, int]:
    """The updates of each point of ``--curve`` with ``--steps``: validated steps
    (the run's choices of weights are made at validations)."""
    points = {}
    for multiple in multiples:
        step = multiple * steps
        if step != int(step) or int(step) % valid_every:
            raise SystemExit(
                f"--curve {multiple:g} x --steps {steps} = {step:g} updates, not a multiple "
                f"of train.valid_every {valid_every}"
            )
        points[multiple] = int(step)
    return points


def timed_curve_steps(multiples: list[float], budget: str, history: list[dict]) -> dict[float, int]:
    """The points of ``--curve`` with ``--budget`` T: 1x is the last validated step
    within T of training time, each other multiple the validated step nearest it
    times 1x (the largest: the end of the run)."""
    within = [r["step"] for r in history if r["elapsed"] <= parse_duration(budget)]
    if not within:
        raise SystemExit(f"no validation within the first {budget} of training")
    validated = [r["step"] for r in history]
    points = {m: min(validated, key=lambda s: abs(s - m * within[-1])) for m in multiples}
    return {**points, 1.0: within[-1], multiples[-1]: validated[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/multi30k_en_de.yaml")
    parser.add_argument("--budget", default="60m", help="training wall-clock budget")
    parser.add_argument("--steps", type=int, default=0,
                        help="budget in updates instead (the same on every machine)")  # fmt: skip
    parser.add_argument("--curve", default=None, metavar="M,M,...",
                        help="multiples of the budget to score from one run")  # fmt: skip
    parser.add_argument("--name", default=None, help="result file name (default: config stem)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--skip-train", action="store_true", help="evaluate an existing model")
    parser.add_argument(
        "--length-penalties",
        default=None,
        help="comma-separated GNMT alphas for beam 5, chosen on val (default: the model's)",
    )
    args = parser.parse_args()

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    config = load_config(args.config, args.set)
    multiples = multiples_of(args.curve) if args.curve else [1.0]
    budget = [f"train.max_time={multiples[-1] * parse_duration(args.budget)}s"]
    curve = {}
    if args.steps:
        curve = curve_steps(multiples, args.steps, config.train.valid_every)
        budget = ["train.max_time=null", f"train.max_steps={curve[multiples[-1]]}"]
    if args.curve:  # every validation's checkpoint, to choose among at each point
        budget.append("train.keep_last=1000000")
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

    if args.curve and not args.steps:
        history = checkpoint.load(exp / "checkpoints" / checkpoint.LAST)["progress"]["history"]
        curve = timed_curve_steps(multiples, args.budget, history)
    points = sorted(set(curve.values())) if args.curve else []
    alphas = [float(a) for a in args.length_penalties.split(",")] if args.length_penalties else None
    model_dirs = {}
    for step in points[:-1]:
        model_dirs[step] = export_at_step(config, step, exp / f"model_at_step_{step}")
    model_dirs[points[-1] if points else read_metadata(exp / "model")["steps"]] = exp / "model"
    results = {
        "command": command,
        "config": args.config,
        "overrides": args.set,
        "budget": f"{config.train.max_steps} updates" if args.steps else config.train.max_time,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch threads, torch {torch.__version__}",
        "train_tgt_tokens_per_s": training_throughput(exp / "metrics.jsonl"),
        "points": {str(step): scored(path, config, alphas) for step, path in model_dirs.items()},
    }
    valid, test = config.data.valid, config.data.test
    lines = [f"`{command}`", ""]
    for step, figures in results["points"].items():
        lines += [
            f"{figures['parameters']:,} parameters, {step} updates in "
            f"{figures['training_minutes']} min, weights: {figures['weights']}; beam length "
            f"penalty {figures['length_penalty']}"
            + (f" (best on val of {figures['length_penalty_sweep_val_bleu']})" if alphas else "")
            + ".",
            "",
            "| split | search | BLEU | chrF | sentences/s |",
            "|---|---|---|---|---|",
        ]
        for key, score in figures["scores"].items():
            split, search = key.split("/")
            lines.append(
                f"| {split} | {search.replace('beam1', 'greedy').replace('beam5', 'beam 5')} | "
                f"{score['bleu']:.1f} | {score['chrf']:.1f} | {score['sentences_per_s']:.1f} |"
            )
        lines.append("")
    last = results["points"][str(max(model_dirs))]["scores"][f"{test}/beam5"]
    lines.append(
        f"{results['train_tgt_tokens_per_s']:,.0f} target tokens/s in training. "
        f"BLEU signature: `{last['bleu_signature']}`"
    )
    if points:
        bleus = {s: results["points"][str(s)]["scores"][f"{test}/beam5"]["bleu"] for s in points}
        lines += ["", "| updates | " + " | ".join(map(str, points)) + " |",
                  "|---|" + "---:|" * len(points),
                  f"| {test} beam 5 | " + " | ".join(f"{b:.2f}" for b in bleus.values()) + " |",
                  f"| {valid} beam 5 | " + " | ".join(
                      f"{results['points'][str(s)]['scores'][f'{valid}/beam5']['bleu']:.2f}"
                      for s in points) + " |"]  # fmt: skip
        bars = {
            "no larger budget more than 0.2 BLEU below a smaller one": all(
                bleus[b] >= bleus[a] - 0.2 for a in points for b in points if b > a
            ),
        }
        one_x = curve[1.0]
        within = "" if args.steps else f", the last validation within {args.budget}"
        bars[f"{test} beam 5 BLEU >= 38.0 at 1x ({one_x} updates{within})"] = bleus[one_x] >= 38.0
        results["bars"] = bars
        lines += ["", *(f"- {'PASS' if ok else 'FAIL'} {bar}" for bar, ok in bars.items())]
    write_results(name, results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
