"""rosetta's own PyTorch path at two commits, measured in one run, alternating.

    python benchmarks/compare_commits.py --base a16c5c7 --preset small --repeats 5

The base commit is checked out into a temporary ``git worktree``. Every repeat
runs one worker process per version, in alternating order, each importing
rosetta from its own tree, with the same random weights (same seed, same
shapes as ``benchmarks/speed.py``: a vocabulary of 8,000) and the same real
Multi30k batches. A worker measures, after a warm-up:

* training: target tokens/s over Adam steps of <= 4,096-token batches;
* decoding: tokens/s of greedy search at batch 32 and batch 1 and beam 5 at
  batch 32, every output exactly ``--new-tokens`` long (<eos> suppressed), the
  fastest of three timed runs.

Reports the median over repeats of each figure and the ratio new / base, and
writes ``benchmarks/results/compare_<preset>.json`` and ``.md``. The machine's
speed varies between sessions; only the ratio within one run means anything.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8000
MAX_TOKENS = 4096
SCENARIOS = ["train", "greedy_b32", "greedy_b1", "beam5_b32"]


# ---- the worker: runs inside whichever rosetta is on PYTHONPATH ----------------------
def worker(args: argparse.Namespace) -> dict[str, float]:
    import numpy as np
    import torch

    from rosetta import config as config_module
    from rosetta.data.batching import collate, make_batches

    try:
        from rosetta.data.arrays import TokenizedSplit
    except ImportError:  # a commit before the arrays module
        from rosetta.data.prepare import TokenizedSplit
    from rosetta.decode import beam_search, greedy_search
    from rosetta.decode.translator import pad_batch
    from rosetta.model import build_model

    try:
        from rosetta.train import objectives
    except ImportError:  # a commit before the training objectives
        objectives = None
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_config = getattr(config_module, "TransformerConfig", None) or config_module.ModelConfig
    presets = config_module.MODEL_PRESETS[args.preset]
    model = build_model(model_config(**presets, max_positions=512), VOCAB, VOCAB)
    data = Path(args.data)
    train, test = TokenizedSplit.load(data / "train.npz"), TokenizedSplit.load(data / "test.npz")
    figures: dict[str, float] = {}

    # training
    batches = make_batches(train.src_lengths, train.tgt_lengths, MAX_TOKENS)
    order = np.random.RandomState(0).permutation(len(batches))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    model.train()
    tokens, elapsed = 0, 0.0
    for n, index in enumerate(order[: 2 + args.train_steps]):
        batch = collate(train, batches[index])
        start = time.perf_counter()
        if objectives is not None:  # the loss as the training objective's (issue 32)
            loss = objectives.TeacherForcing(0.1).loss(model, batch, 0)["loss"]
        elif hasattr(model, "training_loss"):  # the model's own loss (before issue 32)
            loss = model.training_loss(batch, 0.1)["loss"]
        else:  # the interface before the redesign
            from rosetta.train.loss import label_smoothed_nll

            real = batch.tgt_out.ne(0)
            logits = model(batch.src, batch.tgt_in, label_mask=real)
            loss = label_smoothed_nll(logits, batch.tgt_out[real], 0.1)[0]
        (loss / batch.num_tgt_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if n >= 2:  # two warm-up steps
            elapsed += time.perf_counter() - start
            tokens += batch.num_tgt_tokens
    figures["train"] = tokens / elapsed

    # decoding
    if hasattr(model, "prepare_for_inference"):
        model.prepare_for_inference()
    else:
        model.eval()
    sources = [test.source(i).tolist() for i in range(32)]
    new = args.new_tokens
    try:  # the output budget as one object, or (before the redesign) as four keywords
        from rosetta.decode.common import Lengths

        common = dict(lengths=Lengths(a=0.0, b=new + 1, limit=511, min_len=new))
    except ImportError:
        common = dict(max_len_a=0.0, max_len_b=new + 1, max_len=511, min_len=new)

    def greedy(seqs):
        return greedy_search(model, pad_batch(seqs), **common, with_scores=False)

    def beam(seqs):
        return beam_search(model, pad_batch(seqs), beam=5, alpha=0.6, nbest=1, **common)

    for name, search, calls in (
        ("greedy_b32", greedy, [sources]),
        ("greedy_b1", greedy, [[s] for s in sources[:8]]),
        ("beam5_b32", beam, [sources]),
    ):
        search(calls[0])  # warm-up
        best = float("inf")
        for _ in range(3):  # the fastest of three: the machine's noise only ever slows
            start = time.perf_counter()
            for seqs in calls:
                search(seqs)
            best = min(best, time.perf_counter() - start)
        figures[name] = sum(len(seqs) for seqs in calls) * new / best
    return figures


# ---- the driver ----------------------------------------------------------------------
def run_worker(tree: Path, args: argparse.Namespace, data: Path) -> dict[str, float]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--preset",
        args.preset,
        "--threads",
        str(args.threads),
        "--train-steps",
        str(args.train_steps),
        "--new-tokens",
        str(args.new_tokens),
        "--data",
        str(data),
    ]
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker for {tree} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare_data(config: str) -> Path:
    """The prepared train and test splits, as ``.npz`` files: the one layout every
    version reads (later ones prepare a folder of ``.npy`` files per split)."""
    import numpy as np

    from rosetta.config import load_config
    from rosetta.data.arrays import ARRAYS
    from rosetta.data.prepare import load_split, prepare

    prepared = load_config(config, ["experiment_dir=experiments/speed_data"])
    prepare(prepared, log=lambda _: None)
    folder = prepared.experiment_dir / "npz"
    folder.mkdir(exist_ok=True)
    for split in ("train", "test"):
        arrays = load_split(prepared, split)
        np.savez(folder / f"{split}.npz", **{name: getattr(arrays, name) for name in ARRAYS})
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="a16c5c7", help="the commit to compare against")
    parser.add_argument("--preset", choices=["toy", "small", "base"], default="small")
    parser.add_argument("--config", default="configs/multi30k_en_de.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from results_io import write_results

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    data = prepare_data(args.config).resolve()
    base_tree = Path(tempfile.mkdtemp(prefix="rosetta-base-")) / "tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(base_tree), args.base],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    runs: dict[str, list[dict[str, float]]] = {"base": [], "new": []}
    try:
        for repeat in range(args.repeats):
            order = [("base", base_tree), ("new", ROOT)]
            for version, tree in order if repeat % 2 == 0 else order[::-1]:
                runs[version].append(run_worker(tree, args, data))
                print(f"repeat {repeat + 1} {version}: {runs[version][-1]}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT)
    medians = {
        version: {s: statistics.median(r[s] for r in results) for s in SCENARIOS}
        for version, results in runs.items()
    }
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    # the best repeat of each version too: this machine's noise only ever slows a run
    bests = {
        version: {s: max(r[s] for r in results) for s in SCENARIOS}
        for version, results in runs.items()
    }
    rows = [
        f"| {s} | {medians['base'][s]:,.0f} | {medians['new'][s]:,.0f} | "
        f"{medians['new'][s] / medians['base'][s]:.3f} | {bests['new'][s] / bests['base'][s]:.3f} |"
        for s in SCENARIOS
    ]
    table = "\n".join(
        [
            f"`{command}` ({args.preset}, {args.threads} threads, medians of {args.repeats} "
            f"alternating repeats; target tokens/s)",
            "",
            f"| | {args.base} | {head} | new / base | best / best |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    results = {"command": command, "base": args.base, "new": head, "runs": runs}
    write_results(f"compare_{args.preset}", {**results, "medians": medians, "bests": bests}, table)


if __name__ == "__main__":
    main()
