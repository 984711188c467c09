"""Where rosetta's CPU decoding time goes, and the floor under it.

    python benchmarks/decode_floor.py --preset small [--threads 2] [--repeats 5]

The same systems and settings as ``speed.py`` (random weights, the first test
sentences of Multi30k, exactly --new-tokens outputs, systems alternating within
each repeat, medians), greedy at batch 32 and batch 1 and beam 5 at batch 32.
For rosetta's own search it splits the time per generated token into:

* **products**: every linear layer's product (the GEMMs; GEMVs at batch 1),
  encoder included;
* **everything else**: attention, LayerNorm, the search's own work, Python.
  Measured by running the same search with each product's result played back
  from a recording of that search (``ProductTape``), so only the products are
  left out. The played-back search must give the recorded tokens.

Beside it, per step: the **weight-read floor**, the time to read every weight a
decoder step multiplies by once (a ``sum`` over each, in decode order), which
no fp32 engine can go below at batch 1; and HF's and CTranslate2's time per
token, with what rosetta would need for the issue's bars (2x HF at batch 32,
3x at batch 1, 2x for beam 5; 0.8x CTranslate2).

Peers are benchmark-only dependencies: pip install transformers ctranslate2.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

from results_io import write_results
from rosetta.data.prepare import load_split
from rosetta.decode.common import Hypothesis
from rosetta.model import build_model
from rosetta.model.linear import InferenceWeights
from speed import (
    VOCAB,
    CTranslate2Process,
    arguments,
    command_line,
    hf_pieces,
    hf_runner,
    in_process,
    marian,
    marian_to_ctranslate2,
    prepared,
    rosetta_runner,
)

SETTINGS = {"greedy_b32": (1, 32), "greedy_b1": (1, 1), "beam5_b32": (5, 32)}
BARS = {"greedy_b32": 2.0, "greedy_b1": 3.0, "beam5_b32": 2.0}  # x HF
CT2_BAR = 0.8


class ProductTape:
    """Records the result of every linear product (``InferenceWeights.__call__``)
    during a search, then plays them back in the same order instead of
    multiplying.

    Searches edit the logits in place (forbidden tokens), so those (outputs
    ``vocab`` wide) are recorded before the edit and played back as fresh
    copies; ``copy_seconds`` is what the copies cost, to subtract."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.outputs: list[torch.Tensor] = []
        self.position = 0
        self._multiply = InferenceWeights.__call__

    def _edited(self, out: torch.Tensor) -> bool:
        return out.size(-1) == self.vocab

    def recording(self) -> mock._patch:
        def record(weights: InferenceWeights, rows: torch.Tensor) -> torch.Tensor:
            out = self._multiply(weights, rows)
            self.outputs.append(out.clone() if self._edited(out) else out)
            return out

        self.outputs.clear()
        return mock.patch.object(InferenceWeights, "__call__", record)

    def playing(self) -> mock._patch:
        def play(weights: InferenceWeights, rows: torch.Tensor) -> torch.Tensor:
            out = self.outputs[self.position]
            self.position += 1
            return out.clone() if self._edited(out) else out

        self.position = 0
        return mock.patch.object(InferenceWeights, "__call__", play)

    def copy_seconds(self, repeats: int) -> float:
        edited = [out for out in self.outputs if self._edited(out)]
        return seconds(lambda: [out.clone() for out in edited], repeats)


def step_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weights a decoder step multiplies by, in decode order (the cross-attention
    K/V projection runs once per sentence, not per step)."""
    weights = []
    for layer in model.decoder.layers:
        for linear in (
            layer.self_attn.qkv_proj,
            layer.self_attn.out_proj,
            layer.cross_attn.q_proj,
            layer.cross_attn.out_proj,
            layer.feed_forward.fc1,
            layer.feed_forward.fc2,
        ):
            weights.append(linear.weight.detach())
    weights.append(model.output.weight.detach())
    return weights


def tokens_of(found: list) -> list:
    """The token lists of every hypothesis in a list of search results (greedy:
    hypotheses; beam: a list of hypotheses per sentence)."""
    if isinstance(found, Hypothesis):
        return found.tokens
    return [tokens_of(item) for item in found]


def seconds(work: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` runs of ``work`` after one warm-up run."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = arguments(__doc__.split("\n")[0], repeats=5).parse_args()
    command = command_line()
    config, cfg = prepared(args)
    model = build_model(cfg, VOCAB, VOCAB).prepare_for_inference()
    hf_model = marian(cfg).eval()
    work = Path(tempfile.mkdtemp(prefix="rosetta-floor-"))
    ct2 = CTranslate2Process(
        {"ct2": (marian_to_ctranslate2(hf_model, work / "hf_ct2"), hf_pieces())},
        args.threads,
        args.new_tokens,
    )
    test = load_split(config, "test")
    sources = [test.source(i).tolist() for i in range(32)]
    rosetta = rosetta_runner(model, args.new_tokens)
    timers = {
        "rosetta": in_process(rosetta),
        "hf": in_process(hf_runner(hf_model, args.new_tokens)),
        "ct2": ct2.timer("ct2"),
    }

    weights = step_weights(model)
    floor = seconds(lambda: [w.sum() for w in weights], 5 * args.repeats)
    results: dict = {
        "command": command,
        "preset": args.preset,
        "threads": args.threads,
        "step_weight_mb": sum(w.numel() for w in weights) * 4 / 1e6,
        "weight_read_floor_ms_per_step": floor * 1e3,
        "settings": {},
    }
    tape = ProductTape(VOCAB)
    for setting, (beam, batch) in SETTINGS.items():
        calls = [sources[:batch]] if batch > 1 else [[s] for s in sources[:8]]
        tokens = sum(len(c) for c in calls) * args.new_tokens

        def decode(calls=calls, beam=beam) -> list:
            return [rosetta(seqs, beam) for seqs in calls]

        with tape.recording():
            recorded = decode()
        with tape.playing():
            played = decode()
        if tokens_of(recorded) != tokens_of(played):
            raise RuntimeError(f"{setting}: the played-back search gave other tokens")

        def replayed(calls, beam) -> float:
            start = time.perf_counter()
            with tape.playing():
                decode()
            return time.perf_counter() - start

        runs: dict[str, list[float]] = {name: [] for name in [*timers, "replayed"]}
        for _ in range(args.repeats + 1):  # systems alternate; the first round warms up
            for name, timed in {**timers, "replayed": replayed}.items():
                runs[name].append(timed(calls, beam))
        per_token = {name: statistics.median(times[1:]) / tokens for name, times in runs.items()}
        rest = per_token["replayed"] - tape.copy_seconds(args.repeats) / tokens
        results["settings"][setting] = {
            "rosetta_ms_per_token": per_token["rosetta"] * 1e3,
            "products_ms_per_token": (per_token["rosetta"] - rest) * 1e3,
            "everything_else_ms_per_token": rest * 1e3,
            "hf_ms_per_token": per_token["hf"] * 1e3,
            "ct2_ms_per_token": per_token["ct2"] * 1e3,
            # rows per step: the floor is paid once per step, shared by its rows
            "weight_read_floor_ms_per_token": floor * 1e3 / (batch * beam),
        }
    ct2.close()
    report(results)


def report(results: dict) -> None:
    lines = [
        f"`{results['command']}`",
        "",
        f"{results['preset']} preset, {results['threads']} threads; a decoder step reads "
        f"{results['step_weight_mb']:.1f} MB of fp32 weights, "
        f"{results['weight_read_floor_ms_per_step']:.2f} ms per step just to read them "
        "(the weight-read floor). Milliseconds per generated token:",
        "",
        "| setting | rosetta | its products | everything else | weight-read floor "
        "| HF | CTranslate2 | bar: 2-3x HF | bar: 0.8x CT2 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, r in results["settings"].items():
        lines.append(
            f"| {setting.replace('_', ', ')} | {r['rosetta_ms_per_token']:.3f} "
            f"| {r['products_ms_per_token']:.3f} | {r['everything_else_ms_per_token']:.3f} "
            f"| {r['weight_read_floor_ms_per_token']:.3f} | {r['hf_ms_per_token']:.3f} "
            f"| {r['ct2_ms_per_token']:.3f} "
            f"| ≤ {r['hf_ms_per_token'] / BARS[setting]:.3f} "
            f"| ≤ {r['ct2_ms_per_token'] / CT2_BAR:.3f} |"
        )
    write_results(f"decode_floor_{results['preset']}", results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
