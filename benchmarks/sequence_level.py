"""Sequence-level fine-tuning (minimum risk, REINFORCE) against more teacher
forcing, at the same extra wall time, on Multi30k En->De.

    python benchmarks/sequence_level.py --init MODEL_DIR [--config configs/multi30k_en_de.yaml]
        [--minutes 6] [--seeds 1,2] [--work experiments/sequence_level]

Every run is a new experiment ``--init MODEL_DIR`` (the recipe's model: its
tokenizer, architecture and weights; the directory is only read) trained for
``--minutes`` of wall time (validations included) with its own ``train.seed``,
under the same fine-tuning settings (``FINE_TUNING``: a constant learning rate
after a short warm-up, a fresh Adam, smaller batches, validation BLEU choosing
the checkpoint, the length penalty chosen on val). The systems differ only in
``train.sequence_level`` and in how often they validate (about once a minute
each, so validation takes the same share of every budget) (``SYSTEMS``):

a. **teacher forcing**: more of the recipe's label-smoothed cross-entropy;
b. **MRT, BLEU**: minimum risk over beam search's 8-best, sentence BLEU cost;
c. **MRT, chrF**: the same with chrF;
d. **REINFORCE**: 8 samples, sentence BLEU reward, the leave-one-out baseline.

The sequence-level systems mix in the token-level loss with weight 0.3 (Edunov
et al. 2018). The runs alternate between systems, seed by seed; a run whose
model directory exists is not retrained. Reported per run and as mean ± sd:
test2016 greedy and beam-5 BLEU and chrF (beam 5 at the length penalty the
model directory chose on val), the mean output length (words per reference
word, beam 5), updates made and seconds per update; and the start model's
figures. Writes benchmarks/results/sequence_level.{json,md,png}: the plot
shows validation BLEU during fine-tuning and the sequence-level runs' mean
reward.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from results_io import RESULTS, mean_sd, write_results
from rosetta.config import load_config
from rosetta.data.prepare import corpus_root, prepare
from rosetta.data.text import read_lines
from rosetta.decode.translator import Translator
from rosetta.evaluate.metrics import bleu, chrf
from runs import trained

FINE_TUNING = [
    "train.schedule=constant",
    "train.lr=0.0001",
    "train.warmup=20",
    "train.max_steps=0",
    "train.max_tokens=1024",
    "train.log_every=5",
    "train.average_last=0",
    "train.length_penalty_grid=[0.6, 1.0, 1.4]",
]
SEQUENCE = "{{method: {}, metric: {}, candidates: 8, generate: {}, token_weight: 0.3}}"
# validation every ~1 minute for each (an update of teacher forcing takes ~0.4 s here,
# one of the sequence-level systems ~5 s): the same share of the budget for every system
SEQUENTIAL_VALID = "train.valid_every=12"
MRT, REINFORCE = "mrt", "reinforce"
SYSTEMS = {
    "teacher forcing": ["train.valid_every=150"],
    "MRT BLEU": [SEQUENTIAL_VALID, "train.sequence_level=" + SEQUENCE.format(MRT, "bleu", "beam")],
    "MRT chrF": [SEQUENTIAL_VALID, "train.sequence_level=" + SEQUENCE.format(MRT, "chrf", "beam")],
    "REINFORCE BLEU": [
        SEQUENTIAL_VALID, "train.sequence_level=" + SEQUENCE.format(REINFORCE, "bleu", "sample")
    ],
}  # fmt: skip


def scores(model_dir: Path, sources: list[str], references: list[str]) -> dict[str, float]:
    """Greedy and beam-5 BLEU and chrF on the test set, and beam 5's length ratio."""
    figures: dict[str, float] = {}
    for search, beam in (("greedy", 1), ("beam", 5)):
        outputs = [t.text for t in Translator.load(model_dir, beam=beam).translate(sources)]
        figures[f"{search}_bleu"] = bleu(outputs, references).score
        figures[f"{search}_chrf"] = chrf(outputs, references).score
        if beam == 5:
            words = sum(len(o.split()) for o in outputs)
            figures["length_ratio"] = words / sum(len(r.split()) for r in references)
    config = load_config(model_dir / "config.yaml")
    figures["length_penalty"] = config.decode.search.get("length_penalty", 0.6)
    return figures


def history(experiment: Path) -> dict[str, list]:
    """Validation BLEU and training reward over the run's minutes (metrics.jsonl)."""
    records = [json.loads(line) for line in (experiment / "metrics.jsonl").open()]
    valid = [r for r in records if r["type"] == "valid" and "valid_bleu" in r]
    trained = [r for r in records if r["type"] == "train"]
    return {
        "valid": [(r["elapsed"] / 60, r["valid_bleu"]) for r in valid],
        "reward": [(r["elapsed"] / 60, r["reward"]) for r in trained if "reward" in r],
        "steps": max((r["step"] for r in records), default=0),
        "elapsed": max((r["elapsed"] for r in records), default=0.0),
    }


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colours = dict(zip(runs, ("tab:gray", "tab:blue", "tab:green", "tab:red")))
    for name, figures in runs.items():
        for k, f in enumerate(figures):
            label = name if k == 0 else None
            if f["valid"]:
                left.plot(*zip(*f["valid"]), color=colours[name], label=label, marker=".")
            if f["reward"]:
                right.plot(*zip(*f["reward"]), color=colours[name], label=label, alpha=0.8)
    left.set(xlabel="minutes of fine-tuning", ylabel="val BLEU (greedy)",
             title="validation during fine-tuning")  # fmt: skip
    right.set(xlabel="minutes of fine-tuning", ylabel="mean reward of the candidates",
              title="training reward (sequence-level runs)")  # fmt: skip
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init", type=Path, required=True, help="the model to start from")
    parser.add_argument("--config", default="configs/multi30k_en_de.yaml")
    parser.add_argument("--minutes", type=float, default=6.0, help="wall time per run")
    parser.add_argument("--seeds", default="1,2", help="comma-separated train.seed values")
    parser.add_argument("--work", type=Path, default=Path("experiments/sequence_level"))
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="a subset, comma-separated")
    parser.add_argument("--name", default="sequence_level")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run")  # fmt: skip
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = [name.strip() for name in args.systems.split(",")]
    common = [*FINE_TUNING, *args.set, f"train.max_time={args.minutes * 60:.0f}s",
              f"init={args.init}"]  # fmt: skip

    prepared = args.work / "prepared"
    base = load_config(args.config, [*common, f"experiment_dir={prepared}"])
    prepare(base)
    root = corpus_root(base)
    sources = read_lines(root / f"{base.data.test}.{base.data.src_lang}")
    references = read_lines(root / f"{base.data.test}.{base.data.tgt_lang}")
    start = scores(args.init, sources, references)
    print(f"start model: {start}", flush=True)

    runs: dict[str, list[dict]] = {name: [] for name in chosen}
    for seed in seeds:
        for name in chosen:
            label = f"{name.replace(' ', '_').lower()}_seed{seed}"
            config = load_config(
                args.config,
                [*common, *SYSTEMS[name], f"train.seed={seed}",
                 f"experiment_dir={args.work / label}"],
            )  # fmt: skip
            model_dir = trained(config, prepared, restart=True)
            figures = {"seed": seed, **scores(model_dir, sources, references)}
            figures.update(history(config.experiment_dir))
            figures["seconds_per_update"] = figures["elapsed"] / max(figures["steps"], 1)
            runs[name].append(figures)
            shown = {k: v for k, v in figures.items() if k not in ("valid", "reward")}
            print(f"{label}: {shown}", flush=True)

    lines = [
        f"`{command}` (each run {args.minutes:g} min of fine-tuning from the same model; "
        f"{base.data.test}, {len(sources)} sentences; 2 CPU cores)",
        "",
        f"Start model: greedy {start['greedy_bleu']:.2f} BLEU / {start['greedy_chrf']:.2f} chrF, "
        f"beam 5 {start['beam_bleu']:.2f} / {start['beam_chrf']:.2f} "
        f"(length penalty {start['length_penalty']}, length {start['length_ratio']:.3f}).",
        "",
        "| system | seed | greedy BLEU | greedy chrF | beam 5 BLEU | beam 5 chrF | length penalty "
        "| length | updates | s / update |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, figures in runs.items():
        for f in figures:
            lines.append(
                f"| {name} | {f['seed']} | {f['greedy_bleu']:.2f} | {f['greedy_chrf']:.2f} | "
                f"{f['beam_bleu']:.2f} | {f['beam_chrf']:.2f} | {f['length_penalty']} | "
                f"{f['length_ratio']:.3f} | {f['steps']} | {f['seconds_per_update']:.2f} |"
            )
    lines += [
        "",
        "| system | greedy BLEU | beam 5 BLEU | beam 5 chrF | beam 5 BLEU vs teacher forcing |",
        "|---|---:|---:|---:|---:|",
    ]
    reference = runs.get("teacher forcing")
    base_beam = statistics.mean(f["beam_bleu"] for f in reference) if reference else None
    for name, figures in runs.items():
        beam = [f["beam_bleu"] for f in figures]
        delta = f"{statistics.mean(beam) - base_beam:+.2f}" if base_beam is not None else "-"
        lines.append(
            f"| {name} | {mean_sd([f['greedy_bleu'] for f in figures])} | {mean_sd(beam)} | "
            f"{mean_sd([f['beam_chrf'] for f in figures])} | {delta} |"
        )
    if base_beam is not None:
        best = max((n for n in runs if n != "teacher forcing"), default=None,
                   key=lambda n: statistics.mean(f["beam_bleu"] for f in runs[n]))  # fmt: skip
        if best:
            gain = statistics.mean(f["beam_bleu"] for f in runs[best]) - base_beam
            verdict = "PASS" if gain >= 0.5 else "FAIL"
            lines += ["", f"- {verdict} best sequence-level system ({best}) >= teacher forcing "
                          f"+ 0.5 beam-5 BLEU ({gain:+.2f})"]  # fmt: skip
    plot(runs, RESULTS / f"{args.name}.png")
    lines += ["", f"![validation BLEU and reward]({args.name}.png)"]
    results = {"command": command, "minutes": args.minutes, "start": start, "runs": runs,
               "settings": FINE_TUNING, "systems": {n: SYSTEMS[n] for n in chosen}}  # fmt: skip
    write_results(args.name, results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
