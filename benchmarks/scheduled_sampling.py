"""Scheduled sampling against teacher forcing at the same training budget, on
Multi30k En->De, over several seeds.

    python benchmarks/scheduled_sampling.py [--config configs/multi30k_en_de.yaml]
        [--steps 1350] [--seeds 1,2] [--end 0.25] [--work experiments/scheduled_sampling]

Every run trains the config's recipe for ``--steps`` updates (a budget in
updates, so a busy or faster machine does not change the result) with its own
``train.seed``; the scheduled-sampling runs add ``train.scheduled_sampling``
with Bengio et al.'s inverse-sigmoid schedule from 0 to ``--end``, its speed
``k`` chosen so the rate is halfway at half the run (``k ln k = steps / 2``).
The runs alternate between the two systems; each is skipped when its model
directory exists and resumes from its ``last.pt`` when stopped part-way, so the
whole comparison can span sessions. Test2016 BLEU (greedy and beam 5, the
config's length penalty) per run, then mean and spread per system. Writes
benchmarks/results/scheduled_sampling.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

from results_io import mean_sd, write_results
from rosetta.config import load_config
from rosetta.data.prepare import corpus_root, prepare
from rosetta.data.text import read_lines
from rosetta.decode.translator import Translator
from rosetta.evaluate.metrics import bleu
from runs import trained


def speed_for(steps: int) -> float:
    """k with k ln k = steps / 2: the inverse sigmoid's rate is halfway at half the run."""
    low, high = 1.0 + 1e-9, float(max(steps, 3))
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if middle * math.log(middle) < steps / 2 else (low, middle)
    return round(low, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/multi30k_en_de.yaml")
    parser.add_argument("--steps", type=int, default=1350, help="updates per run")
    parser.add_argument("--seeds", default="1,2", help="comma-separated train.seed values")
    parser.add_argument("--end", type=float, default=0.25, help="the final sampling rate")
    parser.add_argument("--work", type=Path, default=Path("experiments/scheduled_sampling"))
    parser.add_argument("--sentences", type=int, default=0, help="test sentences (0: all)")
    parser.add_argument("--name", default="scheduled_sampling")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run")  # fmt: skip
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    speed = speed_for(args.steps)
    budget = [*args.set, "train.max_time=null", f"train.max_steps={args.steps}"]
    schedule = (
        f"train.scheduled_sampling={{schedule: inverse_sigmoid, start: 0.0, "
        f"end: {args.end}, speed: {speed}, sample: false}}"
    )
    systems = {"teacher forcing": [], "scheduled sampling": [schedule]}

    prepared = args.work / "prepared"
    base = load_config(args.config, [*budget, f"experiment_dir={prepared}"])
    prepare(base)
    root = corpus_root(base)
    sources = read_lines(root / f"{base.data.test}.{base.data.src_lang}")
    references = read_lines(root / f"{base.data.test}.{base.data.tgt_lang}")
    if args.sentences:
        sources, references = sources[: args.sentences], references[: args.sentences]

    runs: dict[str, list[dict]] = {name: [] for name in systems}
    for seed in seeds:
        for name, extra in systems.items():
            label = f"{name.replace(' ', '_')}_seed{seed}"
            config = load_config(
                args.config,
                [*budget, *extra, f"train.seed={seed}", f"experiment_dir={args.work / label}"],
            )
            start = time.monotonic()
            model_dir = trained(config, prepared)
            figures = {"seed": seed, "train_minutes": (time.monotonic() - start) / 60}
            for search, beam in (("greedy", 1), ("beam 5", 5)):
                outputs = [t.text for t in Translator.load(model_dir, beam=beam).translate(sources)]
                score = bleu(outputs, references)
                figures[search] = score.score
                figures["signature"] = score.signature
            runs[name].append(figures)
            print(f"{label}: greedy {figures['greedy']:.2f}, beam 5 {figures['beam 5']:.2f}",
                  flush=True)  # fmt: skip

    lines = [
        f"`{command}` ({args.steps} updates per run; scheduled sampling: inverse sigmoid "
        f"from 0 to {args.end}, k = {speed}; {base.data.test}, {len(sources)} sentences)",
        "",
        "| system | seed | greedy BLEU | beam 5 BLEU |",
        "|---|---:|---:|---:|",
    ]
    for name, figures in runs.items():
        for f in figures:
            lines.append(f"| {name} | {f['seed']} | {f['greedy']:.2f} | {f['beam 5']:.2f} |")
    lines += ["", "| system | greedy, mean ± sd | beam 5, mean ± sd |", "|---|---:|---:|"]
    for name, figures in runs.items():
        lines.append(
            f"| {name} | {mean_sd([f['greedy'] for f in figures])} | "
            f"{mean_sd([f['beam 5'] for f in figures])} |"
        )
    signature = runs["teacher forcing"][0]["signature"]
    lines += ["", f"BLEU signature: `{signature}`"]
    results = {"command": command, "steps": args.steps, "speed": speed, "runs": runs}
    write_results(args.name, results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
