"""Non-autoregressive translation against autoregressive baselines: the
speed-quality frontier on Multi30k En->De, measured on this machine.

    python benchmarks/nat.py [--config configs/multi30k_en_de.yaml] [--budget 60m | --steps N]
                             [--teacher EXP/model] [--work experiments/nat] [--set K=V]
                             [--glancing 0.5] [--no-cmlm] [--no-glat] [--no-deep-shallow]
    python benchmarks/nat.py --report    # re-writes nat.md and nat.png from nat.json
    python benchmarks/nat.py --config configs/toy.yaml --budget 1m --work /tmp/nat \
        --sentences 100 --name nat_look      # the whole pipeline in minutes, as a check

Stages (each skipped when its output is already there, so a run can be spread
over sessions; the times are those of the run that did the stage):

1. the AR teacher: the config's recipe trained for ``--budget`` or ``--steps``
   (or ``--teacher``); a stage stopped part-way resumes from its ``last.pt``;
2. the distilled set: the teacher's beam translations of the training sources
   (``rosetta.decode.distill``; its time reported apart);
3. NAT (``model.arch: nat``, CMLM, the config's sizes) trained on the distilled
   set for ``--budget`` (``--no-cmlm`` leaves it out);
4. the same NAT trained with glancing instead (GLAT, Qian et al. 2021:
   ``model.glancing`` = ``--glancing``), the training meant for single-pass
   decoding (``--no-glat`` leaves it out);
5. a deep-encoder, one-layer-decoder AR model (Kasai et al. 2021) trained on the
   distilled set for ``--budget``: the baseline NAT papers rarely show
   (``--no-deep-shallow`` leaves it out, saying so in the table);
6. NATs that need no length classifier, with glancing (``--glancing``):
   ``model.length: ctc`` (the encoder output up-sampled ``--upsample`` times,
   CTC), ``model.length: eos`` (that many ``<mask>`` positions, cut at <eos>)
   and ``model.length: crf`` (``eos``'s positions decoded by a linear-chain
   CRF), one pass each (``--no-ctc`` / ``--no-eos`` / ``--no-crf`` leave them out).

Then, on test2016: BLEU (sacreBLEU, signature printed) and sentences/s at batch
1 and batch 32 (and at batch 1 for the search alone, without SentencePiece
either way) for AR greedy and beam 5 (teacher and deep-shallow), NAT k = 1
(length beam 1 and 5), k = 2, 4 and 10 (length beam 5), GLAT k = 1 (length beam
1 and 5) and k = 10. Writes benchmarks/results/nat.{json,md} and nat.png (BLEU
against sentences/s).

Bars (the issue's), on the better of NAT and GLAT: k = 10, length beam 5 within
2 BLEU of the teacher's greedy BLEU; single pass at least 4x the teacher's
greedy sentences/s at batch 1. For the length-free NATs: a single pass with no
length search of at least 34.0 BLEU at 3x the teacher's greedy sentences/s at
batch 1; the best NAT row not dominated at batch 1 by deep-shallow greedy. Each
NAT row also gives its model's last validation length accuracy (and, for the
length-free ones, output / reference length).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import NullFormatter

from results_io import RESULTS, write_results
from rosetta.config import ExperimentConfig, load_config
from rosetta.data.prepare import corpus_root, prepare
from rosetta.data.text import read_lines
from rosetta.decode.distill import distill
from rosetta.decode.translator import Translator
from rosetta.evaluate.metrics import bleu
from rosetta.modeldir import read_metadata
from rosetta.train import checkpoint
from rosetta.train.trainer import train


def trained(config: ExperimentConfig, label: str) -> Path:
    """Trains ``config`` unless its model directory exists; returns the directory."""
    model_dir = config.experiment_dir / "model"
    if model_dir.exists():
        print(f"{label}: using {model_dir}")
        return model_dir
    prepare(config)
    start = time.monotonic()
    # a stage stopped part-way (a session's end) continues from its last state
    train(config, resume=(config.experiment_dir / "checkpoints" / checkpoint.LAST).exists())
    print(f"{label}: trained in {(time.monotonic() - start) / 60:.1f} min")
    return model_dir


def deep_shallow(args: argparse.Namespace, base: ExperimentConfig, student: list[str]) -> Path:
    """The AR baseline of Kasai et al. (2021), trained on the distilled set: the
    teacher's layers all moved to the encoder but one."""
    shallow = base.model.decoder_layers + base.model.encoder_layers - 1
    deep_config = load_config(
        args.config,
        [
            *student,
            f"model.encoder_layers={shallow}",
            "model.decoder_layers=1",
            f"experiment_dir={args.work / 'deep_shallow'}",
        ],
    )
    return trained(deep_config, "deep-shallow AR")


def timed(call: Callable[[list], list], items: list, batch: int) -> tuple[list, float]:
    """``call``'s outputs on ``items`` taken ``batch`` at a time, and items/s."""
    call(items[:batch])  # warm-up
    start = time.perf_counter()
    out: list = []
    for i in range(0, len(items), batch):
        out += call(items[i : i + batch])
    return out, len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/multi30k_en_de.yaml")
    parser.add_argument("--budget", default="60m", help="training budget of each model")
    parser.add_argument("--steps", type=int, default=0, help="budget in updates instead")
    parser.add_argument("--teacher", type=Path, help="an AR model directory to use as teacher")
    parser.add_argument("--work", type=Path, default=Path("experiments/nat"))
    parser.add_argument("--sentences", type=int, default=0, help="test sentences (0: all)")
    parser.add_argument("--name", default="nat")
    parser.add_argument(
        "--glancing", type=float, default=0.5, help="GLAT's share of errors revealed"
    )
    parser.add_argument("--no-cmlm", action="store_true", help="leave out the CMLM NAT")
    parser.add_argument("--no-glat", action="store_true", help="leave out the GLAT model")
    parser.add_argument("--no-ctc", action="store_true", help="leave out the CTC NAT")
    parser.add_argument("--no-eos", action="store_true", help="leave out the cut-at-<eos> NAT")
    parser.add_argument("--no-crf", action="store_true", help="leave out the CRF NAT")
    parser.add_argument("--upsample", type=float, default=2.0, help="positions per source piece")
    parser.add_argument(
        "--no-deep-shallow",
        action="store_true",
        help="leave out the deep-shallow AR baseline (a third model to train)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every model, e.g. train.threads=2")  # fmt: skip
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="train the missing stages and stop (time the comparison later, alone)",
    )
    parser.add_argument(
        "--report", action="store_true", help="only re-write NAME.md and NAME.png from NAME.json"
    )
    args = parser.parse_args()
    if args.report:
        results = json.loads((RESULTS / f"{args.name}.json").read_text())
        write_results(args.name, results, report(results))
        plot(results["systems"], RESULTS / f"{args.name}.png")
        return
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    budget = [*args.set, f"train.max_time={args.budget}"]
    if args.steps:
        budget = [*args.set, "train.max_time=null", f"train.max_steps={args.steps}"]
    stated = f"{args.steps} updates" if args.steps else args.budget

    base = load_config(args.config, [*budget, f"experiment_dir={args.work / 'teacher'}"])
    teacher_dir = args.teacher or trained(base, "teacher")
    teacher = Translator.load(teacher_dir)

    distilled = args.work / "distilled"
    manifest = distilled / "distill.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("state") == "done":
        print(f"distilled set: using {distilled}")
    else:
        distill(teacher, teacher_dir, base, distilled)
    distill_seconds = json.loads((distilled / "distill.json").read_text())["seconds"]

    student = [
        *budget,
        f"data.root={distilled}",
        "data.toy=null",  # a toy config's generated corpus gives way to the distilled one
        "data.train=train",
        "data.valid=valid",
        "data.test=test",
    ]

    def nat(name: str, label: str, *overrides: str) -> Path:
        """A NAT trained on the distilled set in ``WORK/name``."""
        config = load_config(
            args.config,
            # decode.search={}: the NAT's own search (mask-predict), not the config's beam
            [
                *student,
                "model.arch=nat",
                "decode.search={}",
                *overrides,
                f"experiment_dir={args.work / name}",
            ],
        )
        return trained(config, label)

    nat_dir = None if args.no_cmlm else nat("nat", "NAT")
    glat_dir = None if args.no_glat else nat("glat", "GLAT", f"model.glancing={args.glancing}")
    length_free = [f"model.glancing={args.glancing}", f"model.upsample={args.upsample}"]
    ctc_dir = None if args.no_ctc else nat("ctc", "CTC", "model.length=ctc", *length_free)
    eos_dir = None if args.no_eos else nat("eos", "NAT eos", "model.length=eos", *length_free)
    crf_dir = None if args.no_crf else nat("crf", "NAT CRF", "model.length=crf", *length_free)
    deep_dir = None if args.no_deep_shallow else deep_shallow(args, base, student)
    if args.train_only:
        return

    root = corpus_root(base)
    test = base.data.test
    sources = read_lines(root / f"{test}.{base.data.src_lang}")
    references = read_lines(root / f"{test}.{base.data.tgt_lang}")
    if args.sentences:
        sources, references = sources[: args.sentences], references[: args.sentences]
    systems = {
        "AR teacher, greedy": (teacher_dir, {"beam": 1}),
        "AR teacher, beam 5": (teacher_dir, {"beam": 5}),
        "AR deep-shallow, greedy": (deep_dir, {"beam": 1}),
        "AR deep-shallow, beam 5": (deep_dir, {"beam": 5}),
        "NAT k=1, length beam 1": (nat_dir, {"iterations": 1, "length_beam": 1}),
        "NAT k=1, length beam 5": (nat_dir, {"iterations": 1, "length_beam": 5}),
        "NAT k=2, length beam 5": (nat_dir, {"iterations": 2, "length_beam": 5}),
        "NAT k=4, length beam 5": (nat_dir, {"iterations": 4, "length_beam": 5}),
        "NAT k=10, length beam 5": (nat_dir, {"iterations": 10, "length_beam": 5}),
        "GLAT k=1, length beam 1": (glat_dir, {"iterations": 1, "length_beam": 1}),
        "GLAT k=1, length beam 5": (glat_dir, {"iterations": 1, "length_beam": 5}),
        "GLAT k=10, length beam 5": (glat_dir, {"iterations": 10, "length_beam": 5}),
        "CTC, one pass": (ctc_dir, {}),
        "NAT eos, one pass": (eos_dir, {}),
        "NAT CRF, one pass": (crf_dir, {}),
    }
    trained_nats = (nat_dir, glat_dir, ctc_dir, eos_dir, crf_dir)
    lengths = {d: last_valid(d) for d in trained_nats if d is not None}
    rows = {}
    for name, (model_dir, search) in systems.items():
        if model_dir is None:
            continue
        translator = Translator.load(model_dir, **search)
        figures = {}
        for batch in (1, 32):
            translations, speed = timed(translator.translate, sources, batch)
            figures[f"batch_{batch}_sentences_per_s"] = speed
        # the search alone (no SentencePiece either way): what the model costs
        encoded = [source.ids for source in translator.encode(sources)]
        _, figures["batch_1_search_sentences_per_s"] = timed(translator.search_ids, encoded, 1)
        outputs = [t.text for t in translations]
        score = bleu(outputs, references)
        figures |= {"bleu": score.score, "bleu_signature": score.signature}
        figures |= lengths.get(model_dir, {})
        rows[name] = figures
        print(
            f"{name}: BLEU {score.score:.1f}, {figures['batch_1_sentences_per_s']:.1f} sent/s "
            f"at batch 1, {figures['batch_32_sentences_per_s']:.1f} at batch 32",
            flush=True,
        )

    teacher_greedy = rows["AR teacher, greedy"]

    def best_nat(setting: str, figure: str) -> float:
        """The better of NAT's and GLAT's ``figure`` at ``setting``."""
        return max(
            rows[f"{n} {setting}"][figure] for n in ("NAT", "GLAT") if f"{n} {setting}" in rows
        )

    bars = {}
    if nat_dir or glat_dir:  # the length-classifier NATs' bars
        bars["NAT k=10, length beam 5 within 2 BLEU of the teacher's greedy"] = (
            best_nat("k=10, length beam 5", "bleu") >= teacher_greedy["bleu"] - 2
        )
        bars["NAT single pass >= 4x the teacher's greedy sentences/s at batch 1"] = (
            best_nat("k=1, length beam 1", "batch_1_sentences_per_s")
            >= 4 * teacher_greedy["batch_1_sentences_per_s"]
        )
    free = [
        rows[n] for n in ("CTC, one pass", "NAT eos, one pass", "NAT CRF, one pass") if n in rows
    ]
    if free:
        bars["a length-free single pass >= 34.0 BLEU at >= 3x the teacher's greedy at batch 1"] = (
            any(
                r["bleu"] >= 34.0
                and r["batch_1_sentences_per_s"] >= 3 * teacher_greedy["batch_1_sentences_per_s"]
                for r in free
            )
        )
    if "AR deep-shallow, greedy" in rows:
        deep = rows["AR deep-shallow, greedy"]
        nats = [r for n, r in rows.items() if not n.startswith("AR ")]
        bars["a NAT row not dominated by deep-shallow greedy at batch 1"] = any(
            r["bleu"] > deep["bleu"]
            or r["batch_1_sentences_per_s"] > deep["batch_1_sentences_per_s"]
            for r in nats
        )
    labelled = (
        ("teacher", teacher_dir),
        ("nat", nat_dir),
        ("glat", glat_dir),
        ("ctc", ctc_dir),
        ("eos", eos_dir),
        ("crf", crf_dir),
        ("deep_shallow", deep_dir),
    )
    models = {label: read_metadata(path) for label, path in labelled if path is not None}
    results = {
        "command": command,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "budget": stated,
        "distill_seconds": distill_seconds,
        "models": {
            k: {f: m.get(f) for f in ("parameters", "steps", "training_minutes")}
            for k, m in models.items()
        },
        "test_sentences": len(sources),
        "systems": rows,
        "bars": bars,
    }
    write_results(args.name, results, report(results))
    plot(rows, RESULTS / f"{args.name}.png")


def last_valid(model_dir: Path) -> dict[str, float]:
    """The model's last validation length figures (``valid_length_accuracy``; for
    the length-free modes also ``valid_length_ratio``), from its metrics.jsonl."""
    records = [
        json.loads(line)
        for line in (model_dir.parent / "metrics.jsonl").read_text().splitlines()
        if '"valid_length_accuracy"' in line
    ]
    keys = ("valid_length_accuracy", "valid_length_ratio")
    return {k: records[-1][k] for k in keys if records and k in records[-1]}


def report(results: dict) -> str:
    """The Markdown table of a run's ``results`` (as written to its JSON file)."""
    trained_for = "; ".join(
        f"{label} {m['steps']} updates in {m['training_minutes']} min"
        for label, m in results["models"].items()
    )
    lines = [
        f"`{results['command']}` ({results['machine']}; budget {results['budget']}: "
        f"{trained_for}; distillation {results['distill_seconds'] / 60:.1f} min; "
        f"{results['test_sentences']} test sentences)",
        "",
        "| system | BLEU | sent/s, batch 1 | sent/s, batch 32 | search alone, batch 1 "
        "| val length accuracy | val output / reference length |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = results["systems"]

    def shown(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for name, figures in rows.items():
        search = figures.get("batch_1_search_sentences_per_s")  # runs before it had none
        lines.append(
            f"| {name} | {figures['bleu']:.1f} | {figures['batch_1_sentences_per_s']:.1f} | "
            f"{figures['batch_32_sentences_per_s']:.1f} | {shown(search)} | "
            f"{shown(figures.get('valid_length_accuracy'), 2)} | "
            f"{shown(figures.get('valid_length_ratio'), 3)} |"
        )
    left_out = [
        f"{name} (--no-{flag})"
        for label, name, flag in (
            ("deep_shallow", "the deep-shallow AR baseline", "deep-shallow"),
            ("nat", "the CMLM NAT", "cmlm"),
            ("glat", "the GLAT model", "glat"),
            ("ctc", "the CTC NAT", "ctc"),
            ("eos", "the cut-at-<eos> NAT", "eos"),
            ("crf", "the CRF NAT", "crf"),
        )
        if label not in results["models"]
    ]
    if left_out:
        lines += ["", f"Left out of this run: {', '.join(left_out)}."]
    signature = rows["AR teacher, greedy"]["bleu_signature"]
    lines += ["", f"BLEU signature: `{signature}`", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'} {name}" for name, ok in results["bars"].items()]
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict], path: Path) -> None:
    """BLEU against sentences/s, one panel per batch size."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, batch in zip(axes, (1, 32)):
        for name, figures in rows.items():
            marker = "s" if name.startswith("AR") else "o"
            x = figures[f"batch_{batch}_sentences_per_s"]
            axis.scatter(x, figures["bleu"], marker=marker)
            axis.annotate(name, (x, figures["bleu"]), fontsize=7, xytext=(4, 2),
                          textcoords="offset points")  # fmt: skip
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())  # decades only: no crowded labels
        axis.set_xlabel(f"sentences/s at batch {batch} (log scale)")
        axis.set_ylabel("test2016 BLEU")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
