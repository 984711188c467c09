"""Training throughput on several processes (PyTorch DDP) against one, on Multi30k.

    python benchmarks/ddp_scaling.py [--config configs/multi30k_en_de.yaml]
                                     [--steps 150] [--repeats 2]

On a CPU: one process with 2 threads taking two batches per update
(``accumulate 2``) against two processes with 1 thread each taking one batch
(``rosetta train --nproc-per-node 2``): the same updates on the same data, so
the only difference is how the work is split. With CUDA: one GPU against every
GPU of the machine, one process each. The runs alternate (``--repeats``), since
this machine's speed drifts; the figure is real target tokens per second from
rank 0's ``metrics.jsonl``, the first logged window (warm-up) left out.
Writes benchmarks/results/ddp_scaling.{json,md}.

Bar (the issue's): 2 processes x 1 thread reach at least 0.9x the tokens/s of
1 process x 2 threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from results_io import write_results
from rosetta.config import load_config
from rosetta.data.prepare import prepare


def tokens_per_second(experiment: Path) -> float:
    """Mean real target tokens/s over the logged windows after the first."""
    records = [json.loads(line) for line in (experiment / "metrics.jsonl").open()]
    windows = [r["tgt_tokens_per_s"] for r in records if r["type"] == "train"][1:]
    return statistics.mean(windows)


def run(
    config: str, name: str, arguments: list[str], prepared: Path, work: Path, settings: list[str]
) -> float:
    """Trains a copy of the prepared experiment; returns its tokens/s."""
    experiment = work / name
    shutil.rmtree(experiment, ignore_errors=True)
    experiment.mkdir(parents=True)
    for part in ("corpus", "data", "tokenizer"):
        if (prepared / part).exists():
            shutil.copytree(prepared / part, experiment / part)
    overrides = [f"experiment_dir={experiment}", *settings]
    command = [sys.executable, "-m", "rosetta", "train", config, *arguments]
    command += [item for override in overrides for item in ("--set", override)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return tokens_per_second(experiment)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/multi30k_en_de.yaml")
    parser.add_argument("--steps", type=int, default=150, help="updates per run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds")
    parser.add_argument("--work", type=Path, default=Path("experiments/ddp_scaling"))
    parser.add_argument("--name", default="ddp_scaling")
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    prepared = args.work / "prepared"
    config = load_config(args.config, [f"experiment_dir={prepared}"])
    prepare(config)
    common = [
        f"train.max_steps={args.steps}",
        "train.max_time=null",
        f"train.valid_every={args.steps}",
        "train.valid_bleu=false",
        "train.average_last=0",
        "train.log_every=25",
    ]
    gpus = torch.cuda.device_count()
    if gpus:
        machine = f"{gpus} x {torch.cuda.get_device_name(0)}"
        systems = {
            "1 GPU": (["--device", "cuda"], ["train.accumulate=" + str(max(gpus, 1))]),
            f"{gpus} GPUs, 1 process each": (
                ["--nproc-per-node", str(gpus), "--device", "cuda"],
                ["train.accumulate=1"],
            ),
        }
    else:
        machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
        systems = {
            "1 process x 2 threads": ([], ["train.threads=2", "train.accumulate=2"]),
            "2 processes x 1 thread": (
                ["--nproc-per-node", "2"],
                ["train.threads=1", "train.accumulate=1"],
            ),
        }
    figures: dict[str, list[float]] = {name: [] for name in systems}
    for round_ in range(args.repeats):
        for name, (arguments, settings) in systems.items():
            label = name.replace(" ", "_")
            speed = run(args.config, label, arguments, prepared, args.work, common + settings)
            figures[name].append(speed)
            print(f"round {round_ + 1}, {name}: {speed:,.0f} target tokens/s", flush=True)

    baseline, scaled = (statistics.mean(v) for v in figures.values())
    ratio = scaled / baseline
    bar = ratio >= 0.9 if not gpus else None
    results = {
        "command": command,
        "machine": machine,
        "steps": args.steps,
        "tokens_per_s": figures,
        "ratio": ratio,
        "bar_2x1_at_least_0.9x_1x2": bar,
    }
    lines = [
        f"`{command}` ({machine}; {args.steps} updates per run, each update the same "
        f"batches in every system; {args.repeats} alternating rounds)",
        "",
        "| system | target tokens/s (each round) | mean | vs first |",
        "|---|---|---:|---:|",
    ]
    for name, values in figures.items():
        lines.append(
            f"| {name} | {', '.join(f'{v:,.0f}' for v in values)} | "
            f"{statistics.mean(values):,.0f} | {statistics.mean(values) / baseline:.2f}x |"
        )
    if bar is not None:
        lines += ["", f"- {'PASS' if bar else 'FAIL'} 2 processes x 1 thread >= 0.9x "
                      f"1 process x 2 threads ({ratio:.2f}x)"]  # fmt: skip
    write_results(args.name, results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
