"""How the cost of ``rosetta prepare`` and ``rosetta train`` grows with the size of
the corpus, measured on a real corpus resampled to each size.

    python benchmarks/data_scale.py --sizes 100000,400000,1600000,6400000
                                    [--work experiments/data_scale] [--updates 200]
                                    [--multi30k ../shared/data/multi30k]
    python benchmarks/data_scale.py --sizes 2000,8000 --updates 40 --work /tmp/data_scale \
        --name data_scale_look --bar-sizes 2000,4000,8000   # the whole pipeline in a minute
    python benchmarks/data_scale.py --report   # re-writes data_scale.md and .png from .json

The corpus of size N (``WORK/corpus_N``, reused when its ``done.json``, written last,
is there and says the same settings): N pairs drawn with replacement from Multi30k's
29,000 training pairs, each followed on both sides by the same name and number: a
pseudo-word (two or three syllables, the frequent ones shorter) drawn from a lexicon
of 500,000 with Zipf probabilities (exponent 1.1), and a number uniform in
0..999,999, e.g. "A hiker with a backpack is walking near a waterfall. Rocha 47021"
(and "Ein Wanderer ... Rocha 47021"). The names make the
vocabulary grow with the corpus as real corpora's does (Heaps' law) and keep the
pairs distinct, so that ``remove_duplicates`` removes next to none; the sentences
themselves are Multi30k's. Every draw has its own seeded stream (numpy, seed 1),
so each corpus is the first N pairs of every larger one. Written gzip-compressed
(level 1) in the two-file Moses layout, ``train.en.gz`` and ``train.de.gz``, beside
Multi30k's val as ``valid.en`` and ``valid.de``.

Per size, each command a fresh child process of this script, one after the other,
on a new experiment ``WORK/exp_N`` (config ``WORK/config_N.yaml``; the children's
output in ``WORK/logs``):

1. ``rosetta prepare``: joint SentencePiece BPE, 8,000 pieces, trained on at most
   ``--sample`` (1,000,000) sampled sentences; pairs over 128 pieces, duplicates and copies removed.
   Wall time (which includes what the CLI does after preparing: it counts an
   epoch's batches), pairs/s, peak RSS (the child's own ``ru_maxrss``, from
   ``os.wait4``), the size of ``exp_N/data`` and ``exp_N/tokenizer``.
2. ``rosetta train``, ``--updates`` updates of the toy Transformer (4,096 tokens a
   batch, 2 threads, a record in ``exp_N/metrics.jsonl`` every 10 updates, validation
   only at the end):
   - first update: the time from launch until the first record (step 10) is in
     ``metrics.jsonl``, which is polled every 0.15 s. An upper bound: it includes
     10 updates, and the bar is checked on it. The start-up beside it is that time
     less the record's ``elapsed``, i.e. launch to the first update's start: imports,
     the data check ``train`` does first (it hashes the corpus files), loading the
     id arrays, building the model;
   - ``RssAnon`` (``/proc/PID/status``) read as soon as the record of step
     ``--updates`` is there; when the process had ended by then, the last value read
     after the record of step ``--updates`` - 10 appeared (the table marks it *);
   - target tokens/s: the mean of the records' ``tgt_tokens_per_s`` after the first
     (warm-up) one;
   - peak RSS (``ru_maxrss`` via ``os.wait4``), which covers the final validation
     and the model directory too.
   Without ``--nproc-per-node``, ``rosetta train`` trains in the process it starts,
   with no worker processes (the script records the children it sees), so these
   are the training's own figures.

MB are 10^6 bytes. Writes benchmarks/results/data_scale.{json,md,png}: a row per
size, the log-log slope (least squares of log value on log size) of every measure,
and a plot with one panel per measure, its slope in the legend.

Bars (the issue's), checked only when their sizes were run (``--bar-sizes``: the
smallest, the reference and the largest, 0.1M, 0.4M and 6.4M pairs):
prepare-time slope from 0.4M to 6.4M <= 1.05; prepare peak RSS at 6.4M <= 1.5 GB
and <= 1.3x that at 0.4M; 6.4M prepared in <= 10 min; first update at 6.4M <= 20 s;
RssAnon at 6.4M <= that at 0.1M + 300 MB; training tokens/s at 6.4M >= 0.95x
that at 0.1M.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import yaml
from matplotlib.ticker import FuncFormatter, NullFormatter

from results_io import RESULTS, write_results
from rosetta.data.text import read_lines

SEED = 1
LEXICON = 500_000  # pseudo-words the names are drawn from
ZIPF = 1.1  # exponent of the names' rank-frequency law
NUMBERS = 1_000_000  # the number after each name is uniform in 0..NUMBERS-1
CHUNK = 500_000  # pairs generated and written at a time
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh", "tr"]
VOWELS = ["a", "e", "i", "o", "u"]
POLL = 0.15  # seconds between looks at a training process
MB = 1e6
CORPUS = (
    "Multi30k train resampled with replacement, each pair followed on both sides by a "
    f"Zipf-drawn pseudo-word (exponent {ZIPF}, lexicon {LEXICON:,}) and a number in "
    f"0..{NUMBERS - 1:,}"
)
MEASURES = {  # key: (label, unit)
    "prepare_s": ("prepare", "s"),
    "pairs_per_s": ("prepare speed", "pairs/s"),
    "prepare_peak_rss_mb": ("prepare peak RSS", "MB"),
    "data_mb": ("exp/data on disk", "MB"),
    "first_update_s": ("first update (step-10 record)", "s"),
    "startup_s": ("training start-up", "s"),
    "rss_anon_mb": ("training RssAnon at the last update", "MB"),
    "train_tok_s": ("training speed", "target tokens/s"),
    "train_peak_rss_mb": ("training peak RSS", "MB"),
}


def size_label(pairs: int) -> str:
    """0.4M, 6.4M, 8k: a corpus size as the issue writes it."""
    return f"{pairs / 1e6:g}M" if pairs >= 100_000 else f"{pairs / 1e3:g}k"


# ---- the corpus ---------------------------------------------------------------------


def lexicon(rng: np.random.Generator) -> list[str]:
    """``LEXICON`` capitalised pseudo-words, all two-syllable ones first (the
    frequent ranks), then three-syllable ones, each group in a random order."""
    syllables = [onset + vowel for onset in ONSETS for vowel in VOWELS]
    words: list[str] = []
    for length in itertools.count(2):
        group = ["".join(parts) for parts in itertools.product(syllables, repeat=length)]
        order = rng.permutation(len(group))[: LEXICON - len(words)]
        words += [group[i].capitalize() for i in order.tolist()]
        if len(words) == LEXICON:
            return words
    raise AssertionError("unreachable")


def generate_corpus(multi30k: Path, folder: Path, pairs: int) -> float | None:
    """Writes the corpus of ``pairs`` pairs into ``folder`` (see the module's
    docstring); returns the seconds it took, or None when it was already there."""
    settings = {
        "pairs": pairs,
        "seed": SEED,
        "lexicon": LEXICON,
        "zipf": ZIPF,
        "numbers": NUMBERS,
        "multi30k": str(multi30k.resolve()),
    }
    marker = folder / "done.json"
    if marker.exists() and json.loads(marker.read_text())["settings"] == settings:
        return None
    start = time.monotonic()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sources, targets = read_lines(multi30k / "train.en"), read_lines(multi30k / "train.de")
    # one stream per kind of draw: a chunk of any corpus draws the same values
    picks, names, numbers, shuffle = (
        np.random.default_rng(seed) for seed in np.random.SeedSequence(SEED).spawn(4)
    )
    words = lexicon(shuffle)
    cdf = np.cumsum(np.arange(1, LEXICON + 1, dtype=np.float64) ** -ZIPF)
    cdf /= cdf[-1]
    paths = [folder / "train.en.gz", folder / "train.de.gz"]
    partial = [path.with_suffix(".gz.part") for path in paths]
    with (
        gzip.open(partial[0], "wb", compresslevel=1) as en,
        gzip.open(partial[1], "wb", compresslevel=1) as de,
    ):
        for offset in range(0, pairs, CHUNK):
            n = min(CHUNK, pairs - offset)
            chosen = picks.integers(0, len(sources), n).tolist()
            ranks = np.minimum(np.searchsorted(cdf, names.random(n), side="right"), LEXICON - 1)
            tails = [
                f" {words[r]} {x}\n"
                for r, x in zip(ranks.tolist(), numbers.integers(0, NUMBERS, n).tolist())
            ]
            en.write("".join(sources[i] + t for i, t in zip(chosen, tails)).encode())
            de.write("".join(targets[i] + t for i, t in zip(chosen, tails)).encode())
    for done, path in zip(partial, paths):
        done.replace(path)
    shutil.copyfile(multi30k / "val.en", folder / "valid.en")
    shutil.copyfile(multi30k / "val.de", folder / "valid.de")
    seconds = time.monotonic() - start
    marker.write_text(json.dumps({"settings": settings, "seconds": seconds}, indent=2))
    return seconds


def write_config(work: Path, pairs: int, updates: int, sample: int) -> Path:
    """The experiment of one size: ``WORK/config_N.yaml``."""
    config = {
        "experiment_dir": str(work / f"exp_{pairs}"),
        "data": {
            "root": str(work / f"corpus_{pairs}"),
            "src_lang": "en",
            "tgt_lang": "de",
            "train": "train",
            "valid": "valid",
            "test": None,
            "max_len": 128,
            "remove_duplicates": True,
            "remove_copies": True,
        },
        "tokenizer": {
            "type": "bpe",
            "vocab_size": 8000,
            "joint": True,
            "input_sentence_size": sample,
        },
        "model": {"preset": "toy"},
        "train": {
            "max_tokens": 4096,
            "max_steps": updates,
            "valid_every": 10**9,  # validation only when max_steps ends the run
            "valid_bleu": False,
            "log_every": 10,
            "seed": 1,
            "threads": 2,
        },
    }
    path = work / f"config_{pairs}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---- the measurements -----------------------------------------------------------------


def rosetta(verb: str, config: Path) -> list[str]:
    """The command line of ``rosetta VERB CONFIG`` with this Python."""
    return [sys.executable, "-m", "rosetta", verb, str(config)]


def megabytes(path: Path) -> float:
    """The bytes of the files under ``path`` (or of the file), in MB."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / MB


def ended(process: subprocess.Popen, status: int, log: Path) -> None:
    """Records a child's exit (reaped by ``os.wait4``) and fails if it failed."""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-20:])
        raise SystemExit(
            f"{shlex.join(process.args)} failed ({process.returncode}); "
            f"its log, {log}, ends:\n{tail}"
        )


def measure_prepare(config: Path, experiment: Path, pairs: int, log: Path) -> dict:
    """Runs ``rosetta prepare`` on a new experiment; its time, peak RSS and output sizes."""
    shutil.rmtree(experiment, ignore_errors=True)
    start = time.monotonic()
    with log.open("wb") as output:
        process = subprocess.Popen(
            rosetta("prepare", config), stdout=output, stderr=subprocess.STDOUT
        )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - start
    ended(process, status, log)
    kept = re.search(r"train: ([\d,]+) of ([\d,]+) pairs kept", log.read_text(errors="replace"))
    return {
        "prepare_s": seconds,
        "pairs_per_s": pairs / seconds,
        "prepare_peak_rss_mb": usage.ru_maxrss * 1024 / MB,  # ru_maxrss is in KiB on Linux
        "data_mb": megabytes(experiment / "data"),
        "tokenizer_mb": megabytes(experiment / "tokenizer"),
        "train_pairs_kept": int(kept.group(1).replace(",", "")) if kept else None,
    }


def rss_anon_mb(pid: int) -> float | None:
    """``RssAnon`` of a running process in MB; None once it has ended (or is a zombie)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^RssAnon:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) * 1024 / MB if found else None


def children(pid: int) -> int:
    """How many child processes ``pid`` has now (over all its threads)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            total += len((task / "children").read_text().split())
    return total


def new_records(path: Path, offset: int) -> tuple[list[dict], int]:
    """The whole lines appended to a JSONL file since ``offset``, and the new offset."""
    if not path.exists():
        return [], offset
    with path.open("rb") as handle:
        handle.seek(offset)
        text = handle.read()
    whole = text[: text.rfind(b"\n") + 1]
    return [json.loads(line) for line in whole.splitlines()], offset + len(whole)


def measure_training(config: Path, experiment: Path, updates: int, log: Path) -> dict:
    """Runs ``rosetta train``, watching its ``metrics.jsonl`` and ``/proc`` as it goes."""
    metrics = experiment / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    start = time.monotonic()
    with log.open("wb") as output:
        process = subprocess.Popen(
            rosetta("train", config), stdout=output, stderr=subprocess.STDOUT
        )
    records: list[dict] = []
    offset, first_seen, at_end, after_last_but_one, spawned = 0, None, None, None, 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        found, offset = new_records(metrics, offset)
        found = [r for r in found if r.get("type") == "train"]
        if found and first_seen is None:
            first_seen = time.monotonic() - start
        records += found
        if pid:  # ended (and reaped): /proc/PID is no longer its
            break
        steps = {r["step"] for r in records}
        rss = rss_anon_mb(process.pid)
        spawned = max(spawned, children(process.pid))
        if updates - 10 in steps and rss is not None:
            after_last_but_one = rss
        if updates in steps and at_end is None and rss is not None:
            at_end = rss
        time.sleep(POLL)
    seconds = time.monotonic() - start
    ended(process, status, log)
    if not records:
        raise SystemExit(f"{metrics} holds no training record: see {log}")
    if at_end is None and after_last_but_one is None:  # 10 updates take far longer than POLL
        raise SystemExit(f"no RssAnon read after the step-{updates - 10} record: see {log}")
    windows = [r["tgt_tokens_per_s"] for r in records[1:]] or [records[0]["tgt_tokens_per_s"]]
    return {
        "first_update_s": first_seen,
        "startup_s": first_seen - records[0]["elapsed"],
        "rss_anon_mb": at_end if at_end is not None else after_last_but_one,
        "rss_anon_at_last_step": at_end is not None,
        "train_tok_s": float(np.mean(windows)),
        "train_peak_rss_mb": usage.ru_maxrss * 1024 / MB,
        "train_s": seconds,
        "train_steps": max(r["step"] for r in records),
        "train_child_processes": spawned,
    }


# ---- slopes, bars, table, plot --------------------------------------------------------


def slope(points: list[tuple[int, float | None]]) -> float | None:
    """Least-squares slope of log(value) on log(size); None with fewer than 2 points."""
    points = [(size, value) for size, value in points if value is not None and value > 0]
    if len(points) < 2:
        return None
    sizes, values = zip(*points)
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def check_bars(rows: list[dict], bar_sizes: list[int]) -> dict[str, bool]:
    """The issue's bars whose sizes were run, each named with its measured figures."""
    smallest, reference, largest = bar_sizes
    by_size = {row["pairs"]: row for row in rows}
    small, ref, large = (by_size.get(size) for size in bar_sizes)
    s, r, lg = size_label(smallest), size_label(reference), size_label(largest)
    bars = {}
    if ref and large:
        fitted = slope(
            [
                (row["pairs"], row["prepare_s"])
                for row in rows
                if reference <= row["pairs"] <= largest
            ]
        )
        bars[f"prepare-time slope from {r} to {lg} <= 1.05 ({fitted:.3f})"] = fitted <= 1.05
    if large:
        rss = large["prepare_peak_rss_mb"]
        bars[f"prepare peak RSS at {lg} <= 1.5 GB ({rss:,.0f} MB)"] = rss <= 1500
        if ref:
            ratio = rss / ref["prepare_peak_rss_mb"]
            bars[f"prepare peak RSS at {lg} <= 1.3x that at {r} ({ratio:.2f}x)"] = ratio <= 1.3
        seconds = large["prepare_s"]
        bars[f"{lg} prepared in <= 10 min ({seconds / 60:.1f} min)"] = seconds <= 600
        first = large["first_update_s"]
        bars[f"first update at {lg} <= 20 s ({first:.1f} s, the step-10 record)"] = first <= 20
    if small and large:
        grown = large["rss_anon_mb"] - small["rss_anon_mb"]
        bars[f"training RssAnon at {lg} <= that at {s} + 300 MB ({grown:+,.0f} MB)"] = grown <= 300
        ratio = large["train_tok_s"] / small["train_tok_s"]
        bars[f"training tokens/s at {lg} >= 0.95x that at {s} ({ratio:.2f}x)"] = ratio >= 0.95
    return bars


def report(results: dict) -> str:
    """The Markdown table of a run's ``results`` (as written to its JSON file)."""
    updates = results["updates"]
    lines = [
        f"`{results['command']}` ({results['machine']}; corpus: {results['corpus']}; "
        f"prepare: joint BPE 8,000 pieces from <= {results.get('sample', 1_000_000):,} "
        "sampled sentences, max_len 128, "
        f"duplicates and copies removed; train: the toy Transformer, {updates} updates of "
        f"4,096 tokens, 2 threads; each command a fresh process; MB = 10^6 bytes)",
        "",
        "| pairs | corpus MB (gz) | prepare s | pairs/s | prep peak RSS MB | data MB "
        f"| first update s (start-up) | RssAnon MB at step {updates} | train tok/s "
        "| train peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        late = "" if row["rss_anon_at_last_step"] else "*"
        lines.append(
            f"| {row['pairs']:,} | {row['corpus_mb']:,.1f} | {row['prepare_s']:,.1f} "
            f"| {row['pairs_per_s']:,.0f} | {row['prepare_peak_rss_mb']:,.0f} "
            f"| {row['data_mb']:,.1f} | {row['first_update_s']:.1f} ({row['startup_s']:.1f}) "
            f"| {row['rss_anon_mb']:,.0f}{late} | {row['train_tok_s']:,.0f} "
            f"| {row['train_peak_rss_mb']:,.0f} |"
        )
    if not all(row["rss_anon_at_last_step"] for row in results["rows"]):
        lines += [
            "",
            f"\\* read after the step-{updates - 10} record: the process had ended "
            f"before the step-{updates} record was seen",
        ]
    if any(row["train_child_processes"] for row in results["rows"]):
        lines += [
            "",
            "Note: a training process had child processes; RssAnon and peak RSS "
            "are the parent's alone.",
        ]
    lines += ["", "Log-log slopes (least squares of log value on log pairs):", ""]
    for key, value in results["slopes"].items():
        lines.append(f"- {key}: {'-' if value is None else f'{value:.3f}'}")
    lines.append("")
    if results["bars"]:
        lines += [f"- {'PASS' if ok else 'FAIL'} {name}" for name, ok in results["bars"].items()]
    else:
        sizes = ", ".join(size_label(size) for size in results["bar_sizes"])
        lines.append(f"No bar checked: the issue's sizes ({sizes}) were not run.")
    return "\n".join(lines) + "\n"


def slopes(rows: list[dict], reference: int) -> dict[str, float | None]:
    """Every measure's slope over all sizes, and prepare time's from ``reference`` up."""
    fitted = {
        f"{MEASURES[key][0]} ({key})": slope([(row["pairs"], row[key]) for row in rows])
        for key in MEASURES
    }
    above = [(row["pairs"], row["prepare_s"]) for row in rows if row["pairs"] >= reference]
    fitted[f"prepare time from {size_label(reference)} up"] = slope(above)
    return fitted


def plot(rows: list[dict], path: Path, reference: int) -> None:
    """Each measure against corpus size on log-log axes, one panel each, with its fit
    (and, for prepare time, the fit from ``reference`` up that the bar is on)."""
    figure, axes = plt.subplots(3, 3, figsize=(14, 11))
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 100 else f"{value:.3g}")
    for axis, (key, (label, unit)) in zip(axes.flat, MEASURES.items()):
        points = [(row["pairs"], row[key]) for row in rows if row[key] and row[key] > 0]
        axis.plot(*zip(*points), "o", label=label)
        fits = [("", points)]
        if key == "prepare_s":
            above = [point for point in points if point[0] >= reference]
            if 2 <= len(above) < len(points):
                fits.append((f" from {size_label(reference)}", above))
        for note, fitted in fits:
            if len(fitted) < 2:
                continue
            x, y = np.log(np.array(fitted, dtype=np.float64)).T
            a, b = np.polyfit(x, y, 1)
            ends = np.array([fitted[0][0], fitted[-1][0]], dtype=np.float64)
            axis.plot(ends, np.exp(b) * ends**a, "--", label=f"slope{note} {a:.2f}")
        axis.set_xscale("log")
        axis.set_yscale("log")
        sizes = [size for size, _ in points]
        axis.set_xticks(sizes, [size_label(size) for size in sizes])
        axis.xaxis.set_minor_formatter(NullFormatter())
        low, high = min(value for _, value in points), max(value for _, value in points)
        if high < 2 * low:  # a flat measure looks flat: no zoom into a few per cent
            middle = (low * high) ** 0.5
            low, high = middle / 1.5, middle * 1.5
            axis.set_ylim(low, high)
        axis.yaxis.set_major_formatter(plain)  # minor labels too when no decade is marked
        axis.yaxis.set_minor_formatter(plain if high < 3 * low else NullFormatter())
        axis.tick_params(which="minor", labelsize=7)
        axis.set_xlabel("training pairs")
        axis.set_ylabel(unit)
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        default="100000,400000,1600000,6400000",
        help="training pairs of each corpus, comma-separated",
    )
    parser.add_argument("--work", type=Path, default=Path("experiments/data_scale"))
    parser.add_argument("--updates", type=int, default=200, help="training updates per size")
    parser.add_argument(
        "--sample",
        type=int,
        default=1_000_000,
        help="tokenizer.input_sentence_size: sentences SentencePiece trains on (default 1M)",
    )
    parser.add_argument(
        "--multi30k",
        type=Path,
        default=Path("../shared/data/multi30k"),
        help="folder with Multi30k's train.{en,de} and val.{en,de}",
    )
    parser.add_argument(
        "--bar-sizes",
        default="100000,400000,6400000",
        help="the bars' smallest, reference and largest sizes",
    )
    parser.add_argument("--name", default="data_scale")
    parser.add_argument(
        "--report", action="store_true", help="only re-write NAME.md and NAME.png from NAME.json"
    )
    args = parser.parse_args()
    if args.report:
        results = json.loads((RESULTS / f"{args.name}.json").read_text())
        write_results(args.name, results, report(results))
        plot(results["rows"], RESULTS / f"{args.name}.png", results["bar_sizes"][1])
        return
    sizes = sorted(int(size) for size in args.sizes.split(","))
    bar_sizes = [int(size) for size in args.bar_sizes.split(",")]
    if len(bar_sizes) != 3 or args.updates < 20 or args.updates % 10:
        parser.error("--bar-sizes takes 3 sizes; --updates a multiple of 10, at least 20")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)

    rows = []
    for pairs in sizes:
        corpus = work / f"corpus_{pairs}"
        generated = generate_corpus(args.multi30k, corpus, pairs)
        config = write_config(work, pairs, args.updates, args.sample)
        experiment = work / f"exp_{pairs}"
        corpus_mb = sum(megabytes(corpus / f"train.{lang}.gz") for lang in ("en", "de"))
        row = {"pairs": pairs, "corpus_mb": corpus_mb, "generate_s": generated}
        row |= measure_prepare(config, experiment, pairs, work / "logs" / f"prepare_{pairs}.log")
        row |= measure_training(
            config, experiment, args.updates, work / "logs" / f"train_{pairs}.log"
        )
        rows.append(row)
        print(
            f"{pairs:,} pairs: prepared in {row['prepare_s']:.1f} s "
            f"({row['prepare_peak_rss_mb']:,.0f} MB peak), first update {row['first_update_s']:.1f}"
            f" s, RssAnon {row['rss_anon_mb']:,.0f} MB, {row['train_tok_s']:,.0f} tok/s",
            flush=True,
        )

    results = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "corpus": CORPUS,
        "updates": args.updates,
        "sample": args.sample,
        "bar_sizes": bar_sizes,
        "rows": rows,
        "slopes": slopes(rows, bar_sizes[1]),
        "bars": check_bars(rows, bar_sizes),
    }
    write_results(args.name, results, report(results))
    plot(rows, RESULTS / f"{args.name}.png", bar_sizes[1])


if __name__ == "__main__":
    main()
