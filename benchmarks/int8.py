"""Int8 greedy decoding on a CPU: PyTorch's ``quantize_dynamic`` against torchao.

    python benchmarks/int8.py [MODEL_DIR [--src FILE]] [--repeats 5] [--out PATH]

``--quantize int8`` (``TorchTranslator.from_model_dir``) runs
``torch.ao.quantization.quantize_dynamic`` on the model's linear layers, an API
PyTorch 2.13 announces for removal in favour of torchao. This script times
greedy decoding for:

* ``fp32``: the model as the translator runs it (``prepare_for_inference``);
* ``torch.ao dynamic``: ``quantize_dynamic(as_plain_linear(model), {nn.Linear},
  dtype=torch.qint8)``, exactly as the translator does it. ``quantize_dynamic``
  swaps the layers in ``_modules`` directly, while a ``rosetta.model.layers.Block``
  also keeps each submodule in its instance dict, where attribute lookup finds it
  first: the model keeps calling the float ``nn.Linear`` (column ``stale``);
* ``torch.ao dynamic, refreshed``: the same with the instance dicts pointed at the
  quantized layers, i.e. what torch.ao's int8 kernels actually cost (``torch.ao*``);
* ``torchao int8 dyn-act`` (``Int8DynamicActivationInt8WeightConfig``: int8
  weights per output channel, activations quantized per row on the fly) and
  ``torchao int8 weight-only`` (``Int8WeightOnlyConfig``), through
  ``torchao.quantization.quantize_``, when torchao is installed (a benchmark-only
  dependency: ``pip install torchao==0.18.0``, which wants torch >= 2.11).

Without MODEL_DIR the model is a Transformer of ``--preset`` (small) with random
weights and a vocabulary of ``--vocab`` (8000); with one, the model is loaded by
``rosetta.modeldir.load_model_dir``. Sources are ``--src-len`` (20) random token
ids; decoding is greedy at batch 1 and batch 32 with <eos> suppressed until every
output has the same length (1.5 * 20 + 10 = 40 tokens), so all systems do the same
work. Systems alternate inside every repeat (their order rotates from repeat to
repeat) after a warm-up; the figures are medians. The machine's fp32 GEMM rate
(1024 x 1024 matrices) is measured at the start and the end of the run.

Agreement is the share of sentences whose greedy output (free length) equals
fp32's, and ``rel. err`` the relative L2 distance of the first step's logits to
fp32's. With random weights the logits are nearly flat, so agreement is only a
smoke check; with a trained model and ``--src`` (one sentence a line, tokenised
with the model's SentencePiece) it is the figure that matters.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rosetta.config import MODEL_PRESETS, TransformerConfig
from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from rosetta.model import build_model
from rosetta.model.linear import as_plain_linear

DEFAULT_OUT = Path(__file__).parent / "results" / "int8.json"
AO = "torch.ao dynamic, refreshed"
LEN_A, LEN_B = 1.5, 10  # the default output budget, a * source length + b (DecodeConfig)


# ---- the machine ---------------------------------------------------------------------
def gemm_gflops(size: int = 1024, repeats: int = 15) -> float:
    """Median fp32 (size x size) @ (size x size) rate with the current torch threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- the systems ---------------------------------------------------------------------
def stale_attributes(model: nn.Module) -> int:
    """Submodules a ``Block`` (``rosetta.model.layers``) still reaches through its
    instance dict after a tool swapped them in ``_modules`` behind ``__setattr__``'s
    back (as ``quantize_dynamic`` does): such a model runs the old module."""
    return sum(
        1
        for module in model.modules()
        for name, child in module._modules.items()
        if name in module.__dict__ and module.__dict__[name] is not child
    )


def refresh_attributes(model: nn.Module) -> nn.Module:
    """Points every ``Block``'s instance-dict copy of a submodule at the one in
    ``_modules`` (what the swapped-in quantized layers need to be called)."""
    for module in model.modules():
        for name, child in module._modules.items():
            if name in module.__dict__:
                module.__dict__[name] = child
    return model


def torchao_version() -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
    except Exception:  # not installed, or it does not import against this torch
        return None
    return torchao.__version__


def make_systems(base: nn.Module) -> tuple[dict[str, nn.Module], dict[str, list[str]]]:
    """Each system's model (copies of ``base``) and the warnings making it raised."""
    makers: dict[str, Callable[[], nn.Module]] = {
        "fp32": lambda: copy.deepcopy(base).prepare_for_inference(),
        # exactly the translator's call
        "torch.ao dynamic": lambda: torch.ao.quantization.quantize_dynamic(
            as_plain_linear(copy.deepcopy(base)), {nn.Linear}, dtype=torch.qint8
        ),
        # the same, with the quantized layers made reachable (see stale_attributes)
        "torch.ao dynamic, refreshed": lambda: refresh_attributes(
            torch.ao.quantization.quantize_dynamic(
                as_plain_linear(copy.deepcopy(base)), {nn.Linear}, dtype=torch.qint8
            )
        ),
    }
    if torchao_version() is not None:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )

        def torchao_system(config) -> Callable[[], nn.Module]:
            def make() -> nn.Module:
                # as_plain_linear: rosetta's Linear would take an Int8Tensor weight
                # for a float one in prepare_for_inference
                model = as_plain_linear(copy.deepcopy(base)).eval()
                quantize_(model, config)
                return model

            return make

        makers["torchao int8 dyn-act"] = torchao_system(
            Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
        )
        makers["torchao int8 weight-only"] = torchao_system(
            Int8WeightOnlyConfig(set_inductor_config=False)
        )
    systems, raised = {}, {}
    for name, make in makers.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                systems[name] = make().eval()
            except Exception as error:  # a config this torch/torchao cannot run
                print(f"{name}: not measured ({type(error).__name__}: {error})")
        raised[name] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    return systems, raised


# ---- greedy search -------------------------------------------------------------------
def own_greedy(model: nn.Module, src: torch.Tensor, min_len: int) -> list[list[int]]:
    """Greedy search on the ``encode``/``init_state``/``decode_step`` interface, the
    fallback when ``rosetta.decode.greedy`` does not import: <pad>/<bos> never, <eos>
    not before ``min_len`` tokens, at most 1.5 * source length + 10 tokens (<eos>
    included); finished rows stay in the batch (their tokens are dropped)."""
    budget = int(src.ne(PAD_ID).sum(dim=1).max()) * LEN_A + LEN_B
    steps = max(int(budget), min_len + 1)
    state = model.init_state(model.encode(src))
    tokens = torch.full((src.size(0),), BOS_ID, dtype=torch.long)
    out = []
    for step in range(steps):
        logits = model.decode_step(tokens, state).float()
        logits[:, [PAD_ID, BOS_ID]] = float("-inf")
        if step < min_len:
            logits[:, EOS_ID] = float("-inf")
        tokens = logits.argmax(dim=-1)
        out.append(tokens)
    rows = torch.stack(out, dim=1).tolist()
    return [row[: row.index(EOS_ID)] if EOS_ID in row else row for row in rows]


def greedy_decoder() -> tuple[str, Callable[[nn.Module, torch.Tensor, int], list[list[int]]]]:
    """rosetta's greedy search (batched, finished rows leave the batch), or the
    benchmark's own loop when the decode package is not importable."""
    try:
        from rosetta.decode.common import Lengths
        from rosetta.decode.greedy import greedy_search
    except Exception as error:
        print(f"rosetta.decode.greedy not importable ({error}): using the benchmark's loop")
        return "benchmarks/int8.py own_greedy", own_greedy

    def run(model: nn.Module, src: torch.Tensor, min_len: int) -> list[list[int]]:
        found = greedy_search(model, src, Lengths(min_len=min_len), with_scores=False)
        return [h.tokens for h in found]

    return "rosetta.decode.greedy.greedy_search", run


# ---- inputs --------------------------------------------------------------------------
def random_sources(count: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (count, length), generator=generator)


def pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows], dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", help="a trained model directory (default: random)")
    parser.add_argument("--src", help="with MODEL_DIR: sentences for the agreement check")
    parser.add_argument("--preset", default="small", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--src-len", type=int, default=20)
    parser.add_argument("--b1-sentences", type=int, default=6, help="sentences timed at batch 1")
    parser.add_argument("--b32-batches", type=int, default=1, help="batches timed at batch 32")
    parser.add_argument("--agree", type=int, default=64, help="sentences in the agreement check")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python " + shlex.join(["benchmarks/int8.py", *sys.argv[1:]])
    print(command)
    torch.manual_seed(0)

    tokenizer = None
    if args.model_dir:
        from rosetta.modeldir import load_model_dir

        _, tokenizer, base = load_model_dir(args.model_dir, "cpu")
        vocab = base.tgt_vocab_size
        shape = {"model_dir": args.model_dir}
    else:
        cfg = TransformerConfig(preset=args.preset)
        base = build_model(cfg, args.vocab, args.vocab)
        vocab = args.vocab
        shape = {"preset": args.preset, "vocab": vocab, "weights": "random"}
    base.eval()
    decoder_name, decode = greedy_decoder()
    systems, raised = make_systems(base)
    names = list(systems)

    min_len = int(args.src_len * LEN_A + LEN_B) - 1  # every output: budget tokens, <eos> last
    b1 = random_sources(args.b1_sentences, args.src_len, vocab, seed=1)
    b32 = [random_sources(32, args.src_len, vocab, seed=2 + i) for i in range(args.b32_batches)]
    if args.src and tokenizer is not None:
        lines = Path(args.src).read_text(encoding="utf-8").splitlines()[: args.agree]
        agree_src = [ids[:200] for ids in tokenizer.encode_source([x for x in lines if x.strip()])]
    else:
        agree_src = random_sources(args.agree, args.src_len, vocab, seed=99).tolist()

    gemm_start = gemm_gflops()
    with torch.inference_mode():
        # agreement (free length) and the first step's logits, against fp32
        outputs, first_logits = {}, {}
        probe = pad(agree_src[:32])
        for name in names:
            model = systems[name]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outputs[name] = []
                for i in range(0, len(agree_src), 32):
                    outputs[name] += decode(model, pad(agree_src[i : i + 32]), 0)
                state = model.init_state(model.encode(probe))
                first_logits[name] = model.decode_step(
                    torch.full((probe.size(0),), BOS_ID, dtype=torch.long), state
                ).float()
            raised[name] = sorted(
                set(raised[name]) | {f"{w.category.__name__}: {w.message}" for w in caught}
            )
        # warm-up, then alternate
        for name in names:
            decode(systems[name], b1[:1], min_len)
            decode(systems[name], b32[0], min_len)
        times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in names for b in (1, 32)}
        start_run = time.perf_counter()
        for repeat in range(args.repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                model = systems[name]
                start = time.perf_counter()
                for row in b1:
                    decode(model, row[None], min_len)
                times[name, 1].append((time.perf_counter() - start) / len(b1) * 1e3)
                start = time.perf_counter()
                for batch in b32:
                    decode(model, batch, min_len)
                times[name, 32].append((time.perf_counter() - start) / (32 * len(b32)) * 1e3)
        timed_s = time.perf_counter() - start_run
    gemm_end = gemm_gflops()

    ms = {key: statistics.median(value) for key, value in times.items()}
    reference = outputs["fp32"]
    rows = []
    for name in names:
        same = sum(a == b for a, b in zip(outputs[name], reference)) / len(reference)
        error = (first_logits[name] - first_logits["fp32"]).norm() / first_logits["fp32"].norm()
        row = {
            "system": name,
            "ms_per_sentence_b1": ms[name, 1],
            "ms_per_sentence_b32": ms[name, 32],
            "speedup_vs_fp32_b1": ms["fp32", 1] / ms[name, 1],
            "speedup_vs_fp32_b32": ms["fp32", 32] / ms[name, 32],
            # against torch.ao's int8 layers actually running (the refreshed model)
            "speedup_vs_torch_ao_b1": ms[AO, 1] / ms[name, 1],
            "speedup_vs_torch_ao_b32": ms[AO, 32] / ms[name, 32],
            "agreement_with_fp32": same,
            "first_step_logits_rel_err": float(error),
            "stale_submodule_attributes": stale_attributes(systems[name]),
            "times_ms_b1": times[name, 1],
            "times_ms_b32": times[name, 32],
            "warnings": raised[name],
        }
        rows.append(row)

    header = (
        "| system | ms/sent b1 | ms/sent b32 | vs fp32 b1 | vs fp32 b32 | vs torch.ao* b1 "
        "| vs torch.ao* b32 | same as fp32 | rel. err | stale |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['ms_per_sentence_b1']:.1f} | {r['ms_per_sentence_b32']:.2f} "
            f"| {r['speedup_vs_fp32_b1']:.2f}x | {r['speedup_vs_fp32_b32']:.2f}x "
            f"| {r['speedup_vs_torch_ao_b1']:.2f}x | {r['speedup_vs_torch_ao_b32']:.2f}x "
            f"| {r['agreement_with_fp32']:.1%} | {r['first_step_logits_rel_err']:.4f} "
            f"| {r['stale_submodule_attributes']} |"
        )
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchao": torchao_version(),
    }
    machine = {
        "cpu": cpu_name(),
        "threads": args.threads,
        "gemm_1024_fp32_gflops_start": gemm_start,
        "gemm_1024_fp32_gflops_end": gemm_end,
    }
    table = "\n".join(lines)
    notes = (
        f"{shape}; sources of {args.src_len} tokens, outputs forced to {min_len + 1} tokens; "
        f"b1: {len(b1)} sentences, b32: {len(b32)} batch(es); median of {args.repeats} "
        f"repeats ({timed_s:.0f} s timed); search: {decoder_name}; agreement on "
        f"{len(reference)} sentences; torch.ao* = {AO}; stale: submodules a Block "
        "still reaches in its instance dict after they were swapped in _modules"
        + ("" if args.src and args.model_dir else " (random weights or ids: a smoke check only)")
        + f"\n{machine['cpu']}, {args.threads} threads, fp32 GEMM 1024^3: "
        f"{gemm_start:.0f} GFLOP/s (start), {gemm_end:.0f} GFLOP/s (end); "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    print(table)
    print(notes)
    for r in rows:
        for w in r["warnings"]:
            print(f"warning ({r['system']}): {w[:300]}")
    results = {
        "command": command,
        "versions": versions,
        "machine": machine,
        "setup": {
            **shape,
            "src_len": args.src_len,
            "output_tokens": min_len + 1,
            "b1_sentences": len(b1),
            "b32_batches": len(b32),
            "repeats": args.repeats,
            "search": decoder_name,
            "agreement_sentences": len(reference),
            "timed_seconds": timed_s,
        },
        "systems": rows,
        "table": table,
        "notes": notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
