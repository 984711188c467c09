"""What attention costs as the input grows: full (SDPA) against local, linear,
low-rank, sparse-with-global and LSH attention (``rosetta.model.efficient_attention``).

Measured for one encoder self-attention sub-layer with its projections (the
module a Transformer layer calls: W_QKV, the attention product, W_O), batch 1,
at n = 64, 128, ... up to --max-n positions, for d_model 256 (4 heads) and 512
(8 heads), head_dim 64:

* time of the forward pass (no autograd) and of forward + backward;
* peak tensor memory of each, from PyTorch's profiler (every allocation and
  free of the CPU allocator in order; the peak of what is live above the
  inputs, not the process's RSS);
* the time of one decoding step (``SelfAttention.step``, 8 rows: a beam) at
  growing positions, for the causal variants (full, local, linear, sparse).

Variants are measured in interleaved rounds (each round runs every variant
once, in rotated order), and the median of the rounds is reported, so a change
in the machine's speed during the run hits all of them alike. A variant stops
growing n once one call takes longer than --point-limit seconds.

Prints and writes benchmarks/results/attention_cost.{json,md,png}: the tables,
the crossover length from which each variant is faster than full attention,
the measured time slopes (log-log, over n = 1,024 to 16,384) beside the
complexity the notes give, and the plot. Also checks what
``torch.nn.attention.flex_attention`` does on this CPU (eager and compiled,
forward and backward).

    python benchmarks/attention_cost.py                # ~15 minutes on 2 cores
    python benchmarks/attention_cost.py --max-n 1024 --repeats 1   # a quick look
    python benchmarks/attention_cost.py --parts steps   # re-measure one part, keep the rest
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from results_io import RESULTS, write_results
from rosetta.config import AttentionConfig, TransformerConfig
from rosetta.model.efficient_attention import self_attention

VARIANTS = {
    "full": AttentionConfig(),
    "local": AttentionConfig(variant="local", radius=64),
    "linear": AttentionConfig(variant="linear"),
    "favor": AttentionConfig(variant="linear", feature_map="favor", features=64),
    "lowrank": AttentionConfig(variant="lowrank", rank=64),
    "sparse": AttentionConfig(variant="sparse", radius=64, global_tokens=16),
    "lsh": AttentionConfig(variant="lsh", bucket_size=64, hashes=2),
}
CAUSAL = ["full", "local", "linear", "favor", "sparse"]
COMPLEXITY = {  # the notes' table (time per layer), and the slope in n it predicts
    "full": ("O(n²·d)", 2),
    "local": ("O(r·n·d)", 1),
    "linear": ("O(n·d²)", 1),
    "favor": ("O(n·m·d)", 1),
    "lowrank": ("O(n·k·d)", 1),
    "sparse": ("O(n·(r+g)·d)", 1),
    "lsh": ("O(h·n·c·d) + sort", 1),
}
STEP_POSITIONS = [100, 250, 500, 1000, 2000, 4000, 8000]
STEP_ROWS = 8
STEPS_PER_SAMPLE = 20
WARM_STEPS = 3
MIN_SECONDS = 0.05  # one timed sample repeats the call until it takes this long


def module(name: str, d_model: int, max_n: int) -> torch.nn.Module:
    cfg = TransformerConfig(
        d_model=d_model, heads=d_model // 64, d_ff=4 * d_model, dropout=0.0, max_positions=max_n
    )
    torch.manual_seed(0)
    return self_attention(cfg, VARIANTS[name], "encoder.0.self")


def call(layer: torch.nn.Module, x: torch.Tensor, backward: bool) -> None:
    if backward:
        out, _ = layer(x.detach().requires_grad_())
        out.sum().backward()
    else:
        with torch.no_grad():
            layer(x)


def timed(fn, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return (time.perf_counter() - start) / count


def peak_memory(fn) -> int:
    """Peak bytes live during ``fn`` above what was live before, from the profiler's
    allocation events in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def measure_layers(args) -> list[dict]:
    rows = []
    for d_model in args.d_model:
        for backward in (False, True):
            mode = "forward+backward" if backward else "forward"
            alive = list(VARIANTS)
            n = 64
            while n <= args.max_n and alive:
                layers = {name: module(name, d_model, args.max_n) for name in alive}
                x = torch.randn(1, n, d_model)
                samples: dict[str, list[float]] = {name: [] for name in alive}
                counts = {}
                calls = {name: functools.partial(call, layers[name], x, backward) for name in alive}
                for name in alive:  # warm up, and choose the calls per sample
                    once = timed(calls[name], 1)
                    counts[name] = max(1, math.ceil(MIN_SECONDS / max(once, 1e-6)))
                for round_ in range(args.repeats):
                    order = alive[round_ % len(alive) :] + alive[: round_ % len(alive)]
                    for name in order:
                        samples[name].append(timed(calls[name], counts[name]))
                for name in list(alive):
                    seconds = statistics.median(samples[name])
                    memory = peak_memory(calls[name])
                    rows.append(
                        dict(
                            d_model=d_model,
                            mode=mode,
                            variant=name,
                            n=n,
                            seconds=seconds,
                            peak_bytes=memory,
                        )
                    )
                    print(
                        f"d={d_model} {mode:16s} n={n:6d} {name:8s} {seconds * 1e3:10.2f} ms "
                        f"{memory / 2**20:9.1f} MiB",
                        flush=True,
                    )
                    if seconds > args.point_limit:
                        alive.remove(name)
                n *= 2
    return rows


def measure_steps(args) -> list[dict]:
    rows = []
    for d_model in args.d_model:
        layers = {name: module(name, d_model, args.max_n).eval() for name in CAUSAL}
        caches = {name: layers[name].new_cache() for name in CAUSAL}
        position = 0
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for target in STEP_POSITIONS:
                while position < target:  # every variant takes the same inputs
                    x = torch.randn(STEP_ROWS, d_model, generator=generator)
                    for name in CAUSAL:
                        layers[name].step(x, caches[name])
                    position += 1
                samples: dict[str, list[float]] = {name: [] for name in CAUSAL}
                for round_ in range(args.repeats * 3):
                    x = torch.randn(STEP_ROWS, d_model, generator=generator)
                    order = CAUSAL[round_ % 4 :] + CAUSAL[: round_ % 4]
                    for name in order:
                        step = functools.partial(layers[name].step, x, caches[name])
                        timed(step, WARM_STEPS)  # its weights back in the caches: the steady
                        # state of a search, not the previous variant's (full's cache, grown
                        # to tens of MB, evicts the others' weights)
                        samples[name].append(timed(step, STEPS_PER_SAMPLE))
                position += (WARM_STEPS + STEPS_PER_SAMPLE) * args.repeats * 3
                for name in CAUSAL:
                    seconds = statistics.median(samples[name])
                    rows.append(
                        dict(d_model=d_model, variant=name, position=target, seconds=seconds)
                    )
                    print(
                        f"d={d_model} step at {target:5d} {name:8s} {seconds * 1e6:9.1f} µs",
                        flush=True,
                    )
    return rows


def check_flex(n: int = 8192) -> dict:
    """What flex_attention does on this CPU: eager and compiled, forward and backward."""
    report: dict = {"torch": torch.__version__, "n": n}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        return {**report, "available": False, "error": str(error)}

    def window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 64

    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    mask = create_block_mask(window, None, None, n, n, device="cpu")
    for label, fn in (("eager", flex_attention), ("compiled", torch.compile(flex_attention))):
        try:
            start = time.perf_counter()
            fn(q, k, v, block_mask=mask)
            first = time.perf_counter() - start
            report[f"{label}_forward_first_s"] = first
            report[f"{label}_forward_s"] = timed(functools.partial(fn, q, k, v, block_mask=mask), 3)
        except Exception as error:  # a backend this machine lacks: report it
            report[f"{label}_forward_error"] = f"{type(error).__name__}: {error}"[:300]
        try:
            fn(*(t.clone().requires_grad_() for t in (q, k, v)), block_mask=mask).sum().backward()
            report[f"{label}_backward"] = "ok"
        except Exception as error:
            report[f"{label}_backward_error"] = f"{type(error).__name__}: {error}"[:300]
    report["sdpa_full_forward_s"] = timed(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), 3
    )
    return report


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(seconds) against log(n)."""
    points = [(math.log(n), math.log(s)) for n, s in points]
    if len(points) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    num = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return num / sum((x - mean_x) ** 2 for x, _ in points)


def crossover(rows: list[dict], variant: str) -> int | None:
    """The smallest n from which ``variant`` is faster than full attention at every
    measured n (full attention out of its time limit counts as slower)."""
    times = {r["n"]: r["seconds"] for r in rows if r["variant"] == variant}
    full = {r["n"]: r["seconds"] for r in rows if r["variant"] == "full"}
    found = None
    for n in sorted(times, reverse=True):
        if n in full and times[n] >= full[n]:
            break
        found = n
    return found


def summarise(layers: list[dict], steps: list[dict], args) -> tuple[dict, str]:
    lines = [
        f"# Attention cost against length ({date.today()}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})",
        "",
        "`python benchmarks/attention_cost.py` — one encoder self-attention sub-layer "
        "(W_QKV, attention, W_O), batch 1, head_dim 64; local r = 64, linear elu+1, "
        "favor m = 64 random features, lowrank k = 64; median of "
        f"{args.repeats} interleaved rounds. Peak: tensor memory live above the inputs.",
    ]
    summary: dict = {"crossover": {}, "slopes": {}, "bars": {}}
    for d_model in args.d_model:
        for mode in ("forward", "forward+backward"):
            rows = [r for r in layers if r["d_model"] == d_model and r["mode"] == mode]
            ns = sorted({r["n"] for r in rows})
            cell = {(r["variant"], r["n"]): r for r in rows}
            lines += ["", f"## d_model {d_model}, {mode}: ms (peak MiB)", ""]
            lines.append("| n | " + " | ".join(VARIANTS) + " |")
            lines.append("|---|" + "---|" * len(VARIANTS))
            for n in ns:
                cells = []
                for name in VARIANTS:
                    r = cell.get((name, n))
                    cells.append(
                        "–"
                        if r is None
                        else f"{r['seconds'] * 1e3:.2f} ({r['peak_bytes'] / 2**20:.0f})"
                    )
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
            key = f"d{d_model} {mode}"
            summary["crossover"][key] = {n: crossover(rows, n) for n in VARIANTS if n != "full"}
            summary["slopes"][key] = {
                name: slope(
                    [
                        (r["n"], r["seconds"])
                        for r in rows
                        if r["variant"] == name and 1024 <= r["n"] <= 16384
                    ]
                )
                for name in VARIANTS
            }
    lines += [
        "",
        "## Complexity (the notes) against the measured slope of time in n, n = 1,024 to 16,384",
        "",
    ]
    lines.append(
        "| variant | complexity | slope it predicts | "
        + " | ".join(summary["slopes"])
        + " | crossover n (d256 fwd) |"
    )
    lines.append("|---|---|---|" + "---|" * len(summary["slopes"]) + "---|")
    first = next(iter(summary["crossover"]))
    for name in VARIANTS:
        text, predicted = COMPLEXITY[name]
        measured = [summary["slopes"][key][name] for key in summary["slopes"]]
        cross = "–" if name == "full" else summary["crossover"][first].get(name)
        lines.append(
            f"| {name} | {text} | {predicted} | "
            + " | ".join("–" if m is None else f"{m:.2f}" for m in measured)
            + f" | {cross if cross is not None else 'never'} |"
        )

    if steps:
        lines += ["", f"## One decoding step ({STEP_ROWS} rows), µs, at position", ""]
        lines.append("| d_model | variant | " + " | ".join(map(str, STEP_POSITIONS)) + " |")
        lines.append("|---|---|" + "---|" * len(STEP_POSITIONS))
        for d_model in args.d_model:
            for name in CAUSAL:
                t = {
                    r["position"]: r["seconds"]
                    for r in steps
                    if r["d_model"] == d_model and r["variant"] == name
                }
                lines.append(
                    f"| {d_model} | {name} | "
                    + " | ".join(f"{t[p] * 1e6:.0f}" for p in STEP_POSITIONS if p in t)
                    + " |"
                )

    # the bars
    fwd = {
        (r["variant"], r["n"]): r["seconds"]
        for r in layers
        if r["d_model"] == 256 and r["mode"] == "forward"
    }
    bars = summary["bars"]
    if ("full", 8192) in fwd:
        for name in ("local", "linear", "sparse", "lsh"):
            if (name, 8192) in fwd:
                bars[f"{name} speed-up at n=8192 d256 (>= 4)"] = fwd["full", 8192] / fwd[name, 8192]
    for name in ("local", "linear", "sparse", "lsh"):
        value = summary["slopes"].get("d256 forward", {}).get(name)
        if value is not None:
            bars[f"{name} forward slope 1k-16k (<= 1.2)"] = value
    step256 = {(r["variant"], r["position"]): r["seconds"] for r in steps if r["d_model"] == 256}
    for name in ("linear", "local", "sparse"):
        if (name, 4000) in step256:
            bars[f"{name} step time at 4000 / at 100 (within 0.85-1.15)"] = (
                step256[name, 4000] / step256[name, 100]
            )
    if bars:
        lines += ["", "## Bars", ""]
        lines += [f"- {key}: **{value:.2f}**" for key, value in bars.items()]
    return summary, "\n".join(lines) + "\n"


def plot(layers: list[dict], steps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    panels = [
        (axes[0, 0], "forward", "seconds", "forward time (s)"),
        (axes[0, 1], "forward+backward", "seconds", "forward + backward time (s)"),
        (axes[1, 0], "forward", "peak_bytes", "forward peak memory (bytes)"),
    ]
    colours = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, mode, field, title in panels:
        for d_model, style in zip(sorted({r["d_model"] for r in layers}), ("-", "--")):
            for name in VARIANTS:
                pts = sorted(
                    (r["n"], r[field])
                    for r in layers
                    if r["d_model"] == d_model
                    and r["mode"] == mode
                    and r["variant"] == name
                    and r[field] > 0
                )
                if pts:
                    ax.plot(
                        *zip(*pts),
                        style,
                        marker="o",
                        ms=3,
                        color=colours[name],
                        label=f"{name} d={d_model}",
                    )
        ax.set(xscale="log", yscale="log", xlabel="n (positions)", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=2)
    ax = axes[1, 1]
    for d_model, style in zip(sorted({r["d_model"] for r in steps}), ("-", "--")):
        for name in CAUSAL:
            pts = sorted(
                (r["position"], r["seconds"])
                for r in steps
                if r["d_model"] == d_model and r["variant"] == name
            )
            if pts:
                ax.plot(
                    *zip(*pts),
                    style,
                    marker="o",
                    ms=3,
                    color=colours[name],
                    label=f"{name} d={d_model}",
                )
    ax.set(
        xscale="log", yscale="log", xlabel="position", title=f"decoding step ({STEP_ROWS} rows, s)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle("rosetta: self-attention cost against length (log-log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-n", type=int, default=16384)
    parser.add_argument("--d-model", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--point-limit", type=float, default=20.0, help="seconds per call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="attention_cost")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["layers", "steps", "flex"],
        default=["layers", "steps", "flex"],
        help="measure only these; the others are taken from the last results file",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    earlier = {}
    if set(args.parts) != {"layers", "steps", "flex"}:
        earlier = json.loads((RESULTS / f"{args.name}.json").read_text())
    layers = measure_layers(args) if "layers" in args.parts else earlier["layers"]
    steps = measure_steps(args) if "steps" in args.parts else earlier["steps"]
    summary, table = summarise(layers, steps, args)
    flex = check_flex() if "flex" in args.parts else earlier.get("flex")
    if flex is not None:
        table += "\n## torch.nn.attention.flex_attention on this CPU (n = 8192, r = 64)\n\n"
        table += "\n".join(f"- {key}: {value}" for key, value in flex.items()) + "\n"
    RESULTS.mkdir(exist_ok=True)
    plot(layers, steps, RESULTS / f"{args.name}.png")
    table += f"\n![attention cost](./{args.name}.png)\n"
    results = dict(layers=layers, steps=steps, flex=flex, args=vars(args), **summary)
    write_results(args.name, results, table)


if __name__ == "__main__":
    main()
