"""Fine-tuning a model that already translates (``--init``) against training from
scratch on the new domain, at the same budget, on two domains cut from Multi30k.

    python benchmarks/fine_tuning.py [--multi30k ../shared/data/multi30k]
        [--base-steps 1500] [--steps 300] [--work experiments/fine_tuning]

No pretrained model can be downloaded where this runs, so a rosetta model trained
on one domain stands in for one. Multi30k's captions are cut in two by topic: a
pair whose English holds a word of ``NEW_DOMAIN`` (water, snow, sports, animals)
is in the *new* domain, every other pair in the *old* one; val and test2016 are
cut the same way. Then, with the Transformer of ``configs/multi30k_en_de.yaml``
made smaller (``SIZES``: 128 wide, 2+2 layers, so that the comparison takes
minutes), each run a budget in updates:

1. **old**: trained from scratch on the old domain, ``--base-steps`` updates;
2. **fine-tuned**: ``rosetta train --init old/model`` on the new domain,
   ``--steps`` updates (old's tokenizer; learning rate 5e-4, warm-up 30);
3. **scratch**: trained from scratch on the new domain, ``--steps`` updates (its
   own tokenizer; learning rate 1e-3, warm-up 100: a schedule fitted to its
   short budget, not the 500-update warm-up of the 60-minute recipe).

BLEU (greedy, sacreBLEU) of each on the old and the new domain's test sets: what
fine-tuning gains on the new domain, and what it forgets of the old. A run whose
model directory exists is not retrained. Writes benchmarks/results/fine_tuning.{json,md}.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path

from results_io import write_results
from rosetta.config import load_config
from rosetta.data.prepare import prepare
from rosetta.data.text import read_lines, write_lines_atomic
from rosetta.decode.translator import Translator
from rosetta.evaluate.metrics import bleu
from rosetta.train.trainer import train

_TOPIC_WORDS = """
    water ocean sea beach pool swimming swims swim surf surfer surfing surfboard wave waves
    boat boats lake river snow snowy ski skiing skier snowboard snowboarder ice hockey
    ball soccer football basketball baseball tennis volleyball rugby player players team
    dog dogs puppy cat horse horses cow bird animal animals
"""
NEW_DOMAIN = frozenset(_TOPIC_WORDS.split())
SIZES = [
    "model.d_model=128",
    "model.d_ff=512",
    "model.heads=4",
    "model.encoder_layers=2",
    "model.decoder_layers=2",
]
SPLITS = {"train": "train", "valid": "val", "test": "test2016"}


def in_new_domain(english: str) -> bool:
    return not NEW_DOMAIN.isdisjoint(re.findall(r"[a-z]+", english.lower()))


def cut(multi30k: Path, work: Path) -> dict[str, dict[str, int]]:
    """Writes the two domains' corpora, ``WORK/old`` and ``WORK/new``; returns sizes."""
    sizes: dict[str, dict[str, int]] = {"old": {}, "new": {}}
    for split, name in SPLITS.items():
        english, german = read_lines(multi30k / f"{name}.en"), read_lines(multi30k / f"{name}.de")
        for domain in ("old", "new"):
            pairs = [
                (e, g) for e, g in zip(english, german) if in_new_domain(e) == (domain == "new")
            ]
            folder = work / domain
            folder.mkdir(parents=True, exist_ok=True)
            write_lines_atomic(folder / f"{split}.en", [e for e, _ in pairs])
            write_lines_atomic(folder / f"{split}.de", [g for _, g in pairs])
            sizes[domain][split] = len(pairs)
    return sizes


def run(work: Path, label: str, domain: str, steps: int, extra: list[str]) -> tuple[Path, float]:
    """Trains one system unless its model directory exists; returns it and the minutes."""
    overrides = [
        *SIZES,
        f"experiment_dir={work / label}",
        f"data.root={work / domain}",
        "data.valid=valid",
        "data.test=test",
        "train.max_time=null",
        f"train.max_steps={steps}",
        f"train.valid_every={max(steps // 4, 1)}",
        "train.average_last=4",
        "train.length_penalty_grid=[]",
        *extra,
    ]
    config = load_config("configs/multi30k_en_de.yaml", overrides)
    if (config.experiment_dir / "model").exists():
        return config.experiment_dir / "model", float("nan")
    start = time.monotonic()
    if config.init is not None:
        from rosetta.modeldir import resolve_init

        config = resolve_init(config)
    prepare(config)
    model_dir = train(config)
    return model_dir, (time.monotonic() - start) / 60


def score(model_dir: Path, folder: Path) -> float:
    sources, references = read_lines(folder / "test.en"), read_lines(folder / "test.de")
    outputs = [t.text for t in Translator.load(model_dir, beam=1).translate(sources)]
    return bleu(outputs, references).score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--multi30k", type=Path, default=Path("../shared/data/multi30k"))
    parser.add_argument("--base-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--work", type=Path, default=Path("experiments/fine_tuning"))
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    work = args.work.resolve()
    sizes = cut(args.multi30k, work)
    print(f"domains: {sizes}", flush=True)

    old, old_minutes = run(work, "old_model", "old", args.base_steps, [])
    systems = {
        "old": (old, old_minutes),
        "fine-tuned": run(
            work, "fine_tuned", "new", args.steps,
            [f"init={old}", "train.lr=0.0005", "train.warmup=30"],
        ),
        "scratch": run(work, "scratch", "new", args.steps, ["train.lr=0.001", "train.warmup=100"]),
    }  # fmt: skip
    rows = {}
    for name, (model_dir, minutes) in systems.items():
        rows[name] = {
            "minutes": minutes,
            "old": score(model_dir, work / "old"),
            "new": score(model_dir, work / "new"),
        }
        print(f"{name}: {rows[name]}", flush=True)
    gain = rows["fine-tuned"]["new"] - rows["scratch"]["new"]
    forgetting = rows["old"]["old"] - rows["fine-tuned"]["old"]
    lines = [
        f"`{command}` (Multi30k cut by topic: new domain = captions with a word of "
        f"water, snow, sports or animals; train/val/test pairs old {sizes['old']}, "
        f"new {sizes['new']}; Transformer 128 wide, 2+2 layers; greedy BLEU on each "
        "domain's part of test2016)",
        "",
        "| system | updates | minutes | BLEU old domain | BLEU new domain |",
        "|---|---:|---:|---:|---:|",
    ]
    steps = {"old": args.base_steps, "fine-tuned": args.steps, "scratch": args.steps}
    for name, row in rows.items():
        lines.append(
            f"| {name} | {steps[name]:,} | {row['minutes']:.1f} | {row['old']:.2f} | "
            f"{row['new']:.2f} |"
        )
    lines += [
        "",
        f"Fine-tuned minus scratch on the new domain: {gain:+.2f} BLEU "
        f"({'PASS' if gain >= 5 else 'FAIL'}, bar +5); forgetting on the old domain: "
        f"{forgetting:.2f} BLEU.",
    ]
    results = {"command": command, "sizes": sizes, "steps": steps, "rows": rows}
    write_results("fine_tuning", results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
