"""What one training update costs for each non-autoregressive objective, against
teacher forcing: the figure that decides how many updates a model gets in a
time budget (``benchmarks/nat.py`` trains every model for the same minutes).

One batch shaped like a Multi30k one (280 sentence pairs of 8-24 pieces each,
~4,500 target tokens; random ids from a vocabulary of 8,000), the recipe's
``small`` sizes (256 wide, 3+3 layers, 4 heads, dropout 0.1), label smoothing
0.1; each model updated --updates times after one warm-up, the fastest kept;
the models in turn, alternating over --rounds rounds.

    python benchmarks/nat_update_cost.py [--updates 3] [--rounds 2] [--threads 2]

Writes benchmarks/results/nat_update_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch

from results_io import write_results
from rosetta.config import NATConfig, TransformerConfig
from rosetta.data.batching import Batch
from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from rosetta.model import build_model
from rosetta.train.objectives import MaskedLM, Objective, PositionsNAT, TeacherForcing

VOCAB = 8000
SIZES = dict(
    d_model=256, d_ff=1024, heads=4, encoder_layers=3, decoder_layers=3, dropout=0.1,
    max_positions=256,
)  # fmt: skip


def multi30k_like_batch(sentences: int = 280, seed: int = 0) -> Batch:
    """Random pairs of 8-24 pieces each, padded as the trainer pads them."""
    generator = torch.Generator().manual_seed(seed)

    def side(lengths: torch.Tensor) -> list[list[int]]:
        return [torch.randint(5, VOCAB, (int(n),), generator=generator).tolist() for n in lengths]

    sources = side(torch.randint(8, 25, (sentences,), generator=generator))
    targets = side(torch.randint(8, 25, (sentences,), generator=generator))

    def padded(rows: list[list[int]]) -> torch.Tensor:
        width = max(map(len, rows))
        return torch.tensor([row + [PAD_ID] * (width - len(row)) for row in rows])

    src = padded([[*row, EOS_ID] for row in sources])
    return Batch(
        src=src,
        tgt_in=padded([[BOS_ID, *row] for row in targets]),
        tgt_out=padded([[*row, EOS_ID] for row in targets]),
        src_lengths=src.ne(PAD_ID).sum(1),
        indices=torch.arange(sentences),
    )


SYSTEMS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], Objective]]] = {
    "AR, teacher forcing": (
        lambda: build_model(TransformerConfig(**SIZES), VOCAB, VOCAB),
        lambda: TeacherForcing(0.1),
    ),
    "NAT, CMLM (length classifier)": (
        lambda: build_model(NATConfig(arch="nat", **SIZES), VOCAB, VOCAB),
        lambda: MaskedLM(0.1, 0.1, 0.0),
    ),
    "NAT, GLAT (length classifier, glancing 0.5)": (
        lambda: build_model(NATConfig(arch="nat", glancing=0.5, **SIZES), VOCAB, VOCAB),
        lambda: MaskedLM(0.1, 0.1, 0.5),
    ),
    **{
        f"NAT, length {mode} (upsample 2, glancing 0.5)": (
            lambda mode=mode: build_model(
                NATConfig(arch="nat", length=mode, glancing=0.5, **SIZES), VOCAB, VOCAB
            ),
            lambda mode=mode: PositionsNAT(0.1, 0.5, mode),
        )
        for mode in ("eos", "ctc", "crf")
    },
}


def seconds_per_update(
    model: torch.nn.Module, objective: Objective, batch: Batch, updates: int
) -> float:
    """The fastest of ``updates`` timed updates (forward, backward, Adam step)."""
    optimizer = torch.optim.Adam(model.parameters())
    times = []
    for step in range(updates + 1):  # the first warms up
        start = time.perf_counter()
        loss = objective.loss(model, batch, step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = multi30k_like_batch()
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (make_model, make_objective) in SYSTEMS.items():
            torch.manual_seed(0)
            seconds = seconds_per_update(make_model(), make_objective(), batch, args.updates)
            best[name] = min(best.get(name, seconds), seconds)
            print(f"{name}: {seconds:.2f} s per update", flush=True)
    base = best["AR, teacher forcing"]
    tokens = int(batch.tgt_out.ne(PAD_ID).sum())
    rows = [f"| {name} | {s:.2f} | {s / base:.2f} |" for name, s in best.items()]
    table = (
        f"`python benchmarks/nat_update_cost.py --updates {args.updates} --rounds {args.rounds} "
        f"--threads {args.threads}` ({platform.machine()}, {args.threads} threads; one batch of "
        f"{batch.src.size(0)} pairs, {tokens} target tokens, vocabulary {VOCAB}, the small sizes; "
        "fastest update of all rounds)\n\n"
        "| objective | seconds per update | x teacher forcing |\n|---|---:|---:|\n"
        + "\n".join(rows)
        + "\n"
    )
    write_results(
        "nat_update_cost",
        {"threads": args.threads, "target_tokens": tokens, "seconds_per_update": best},
        table,
    )


if __name__ == "__main__":
    main()
