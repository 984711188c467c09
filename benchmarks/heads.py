"""What each attention head of a Multi30k model does, which ones it can do without,
and how much faster the pruned model decodes.

    python benchmarks/heads.py MODEL_DIR [--data ../shared/data/multi30k]
        [--steps 12] [--repeats 3] [--finetune-steps 300] [--work /tmp/heads_bench]

1. ``rosetta heads`` on test2016 (figures, roles, pruning curve, beam 5, batch 32),
   importance measured on val (masking: BLEU and NLL without each head; Michel et
   al.'s gradient proxy), the curve's orders rebuilt as heads go (masking,
   gradient) and a seeded random order: benchmarks/results/heads.{json,md} and
   heads.png, heads_pruning.png.
2. Pruned model directories: the most heads whose removal costs at most 0.5
   test2016 BLEU on the best importance curve, and one third of the heads (the bar),
   each cut out of the weights; their test2016 beam-5 BLEU measured again.
3. Speed: the original and the pruned directory translating test2016 at batch 32,
   greedy and beam 5, alternating, median of ``--repeats`` after a warm-up; beside
   it the share of decoding FLOPs the removed heads carried (counted from the
   shapes: encoder per source token, decoder per output token and hypothesis).
4. Fine-tuning the one-third model ``--finetune-steps`` updates
   (configs/multi30k_en_de_finetune.yaml with --init) and its BLEU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_io import RESULTS, write_results
from rosetta.config import load_config
from rosetta.decode.translator import Translator
from rosetta.evaluate import heads as H
from rosetta.evaluate.metrics import bleu
from rosetta.modeldir import resolve_init
from rosetta.plotting import plot_head_grid, plot_pruning_curve
from rosetta.train.trainer import train


def decoding_flops(
    model_dir: Path, src_len: float, tgt_len: float, beam: int, vocab: int
) -> dict[str, float]:
    """Multiply-adds x 2 of translating one sentence (``src_len`` source pieces,
    ``tgt_len`` output pieces, ``beam`` hypotheses per step), in total and in the
    attention heads (their projections and their products)."""
    cfg = load_config(model_dir / "config.yaml").model
    d, width, ff = cfg.d_model, cfg.d_model // cfg.heads, cfg.d_ff
    heads = 0.0
    for module in cfg.attention_modules():
        h = cfg.heads_at(module)
        if module.startswith("encoder"):  # per source token: q, k, v, out; scores and mix
            heads += src_len * h * (4 * d * width + 2 * src_len * width)
        elif module.endswith("self"):  # per hypothesis step: q, k, v, out over the cache
            heads += beam * tgt_len * h * (4 * d * width + 2 * (tgt_len / 2) * width)
        else:  # keys and values once per source; per step q, out and the products
            heads += src_len * h * 2 * d * width
            heads += beam * tgt_len * h * (2 * d * width + 2 * src_len * width)
    rest = src_len * cfg.encoder_layers * 2 * d * ff
    rest += beam * tgt_len * (cfg.decoder_layers * 2 * d * ff + d * vocab)
    return {"heads": 2 * heads, "total": 2 * (heads + rest)}


def speed(model_dirs: dict[str, Path], sources: list[str], repeats: int) -> dict:
    """Sentences/s of each directory, greedy and beam 5 at batch 32, alternating."""
    results = {}
    for beam in (1, 5):
        translators = {
            name: Translator.load(path, beam=beam, batch_size=32)
            for name, path in model_dirs.items()
        }
        times: dict[str, list[float]] = {name: [] for name in model_dirs}
        for repeat in range(repeats + 1):  # the first: warm-up
            for name, translator in translators.items():
                start = time.perf_counter()
                translator.translate(sources)
                if repeat:
                    times[name].append(time.perf_counter() - start)
        results[f"beam {beam}"] = {
            name: round(len(sources) / statistics.median(t), 1) for name, t in times.items()
        }
    return results


def test_bleu(model_dir: Path, sources: list[str], references: list[str]) -> float:
    translator = Translator.load(model_dir, beam=5, batch_size=32)
    return round(bleu([t.text for t in translator.translate(sources)], references).score, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/multi30k"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--work", type=Path, default=Path("/tmp/heads_bench"))
    parser.add_argument("--name", default="heads")
    args = parser.parse_args()
    torch.set_num_threads(2)
    read = lambda name: (args.data / name).read_text(encoding="utf-8").splitlines()  # noqa: E731
    sources, references = read("test2016.en"), read("test2016.de")
    valid = (read("val.en"), read("val.de"))
    args.work.mkdir(parents=True, exist_ok=True)
    report_file = args.work / "heads.json"
    translator = Translator.load(args.model_dir, beam=5, batch_size=32)
    start = time.perf_counter()
    if report_file.exists():  # a rerun reuses the analysis (it takes ~30 minutes here)
        report = json.loads(report_file.read_text())
    else:
        report = H.analyse(
            translator, args.model_dir, sources, references, valid, steps=args.steps,
            progress=lambda text: print(f"{time.perf_counter() - start:7.0f}s {text}", flush=True),
        )  # fmt: skip
        report_file.write_text(json.dumps(report, indent=1))
    heads = H.heads_of(translator.model)
    total = len(heads)
    base = report["base"]["bleu"]
    curve = report["curve"]
    # the most heads within 0.5 BLEU on either importance curve, and one third
    best_order, within = max(
        (
            (order, max(p["removed"] for p in curve["points"][order] if base - p["bleu"] <= 0.5))
            for order in ("masking", "gradient")
        ),
        key=lambda pair: pair[1],
    )
    third = -(-total // 3)
    pruned = {}
    for label, count in ((f"within 0.5 BLEU ({best_order})", within), ("one third", third)):
        if count == 0:
            continue
        removed = H.chosen_removal(report, heads, best_order, count)
        directory = args.work / f"pruned_{count}"
        shutil.rmtree(directory, ignore_errors=True)
        H.prune(translator, args.model_dir, removed, directory)
        pruned[label] = {"removed": count, "dir": directory, "heads": [h.name for h in removed]}
    rows, results = [], {"base_bleu": base, "total_heads": total, "order": best_order, "pruned": {}}
    src_len = statistics.mean(len(s.ids) for s in translator.encode(sources))
    tgt_len = statistics.mean(
        len(ids) + 1 for ids in translator.tokenizer.encode_target(references)
    )
    vocab = translator.tokenizer.tgt_vocab_size
    before = {
        beam: decoding_flops(args.model_dir, src_len, tgt_len, beam, vocab) for beam in (1, 5)
    }
    for label, info in pruned.items():
        score = test_bleu(info["dir"], sources, references)
        timing = speed({"original": args.model_dir, "pruned": info["dir"]}, sources, args.repeats)
        after = {
            beam: decoding_flops(info["dir"], src_len, tgt_len, beam, vocab) for beam in (1, 5)
        }
        figures = {
            "removed": info["removed"],
            "heads": info["heads"],
            "bleu": score,
            "bleu_change": round(score - base, 2),
            "speed": timing,
            "speedup": {k: round(v["pruned"] / v["original"], 3) for k, v in timing.items()},
            "flops_share_removed": {
                f"beam {b}": round(1 - after[b]["total"] / before[b]["total"], 4) for b in (1, 5)
            },
        }
        results["pruned"][label] = figures
        rows.append(
            f"| {label}: {info['removed']} of {total} | {score:.2f} ({score - base:+.2f}) "
            f"| {figures['speedup']['beam 1']:.3f}x | {figures['speedup']['beam 5']:.3f}x "
            f"| {100 * figures['flops_share_removed']['beam 1']:.1f}% "
            f"| {100 * figures['flops_share_removed']['beam 5']:.1f}% |"
        )
    third_dir = pruned.get("one third", {}).get("dir")
    if third_dir and args.finetune_steps:
        overrides = [
            f"init={third_dir}", f"train.max_steps={args.finetune_steps}", "train.max_time=null",
            f"experiment_dir={args.work / 'finetune'}", "train.valid_every=100",
            "train.threads=2", f"data.root={args.data}",
        ]  # fmt: skip
        shutil.rmtree(args.work / "finetune", ignore_errors=True)
        config = resolve_init(load_config("configs/multi30k_en_de_finetune.yaml", overrides))
        from rosetta.data.prepare import prepare

        prepare(config)
        tuned = train(config)
        score = test_bleu(tuned, sources, references)
        results["finetuned_one_third"] = {"steps": args.finetune_steps, "bleu": score}
        rows.append(
            f"| one third, then {args.finetune_steps} updates of fine-tuning | {score:.2f} "
            f"({score - base:+.2f}) | | | | |"
        )
    results["report"] = {k: report[k] for k in ("base", "agreement", "curve")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}_report.json").write_text(json.dumps(report, indent=1))
    plot_head_grid(report, RESULTS / f"{args.name}.png")
    plot_pruning_curve(report, RESULTS / f"{args.name}_pruning.png")
    roles: dict[str, int] = {}
    for head in report["heads"]:
        roles[f"{head['kind']} {head['role']}"] = roles.get(f"{head['kind']} {head['role']}", 0) + 1
    head_rows = [
        f"| {h['kind']} | {h['layer']} | {h['head']} | {h['role']} {h['detail']} "
        f"| {h['confidence']:.2f} | {h['figures']['entropy_share']:.2f} | {h['distance']:.1f} "
        f"| {h['importance']['masking_bleu']:+.2f} | {h['importance']['masking_nll']:+.4f} "
        f"| {h['importance']['gradient']:.2f} |"
        for h in report["heads"]
    ]
    areas = curve["area_vs_random"]
    table = "\n".join([
        f"`python benchmarks/heads.py {args.model_dir} --steps {args.steps} "
        f"--repeats {args.repeats} --finetune-steps {args.finetune_steps}`",
        "",
        f"test2016 beam 5, batch 32: {base:.2f} BLEU with all {total} heads; importance on val "
        f"({report['base']['importance_set']['sentences']} sentences); areas above the random "
        f"order: masking {areas['masking']:+.1f}, gradient {areas['gradient']:+.1f} BLEU x heads; "
        f"Spearman {json.dumps(report['agreement'])}",
        "",
        "| pruned | test2016 BLEU | speed greedy b32 | speed beam 5 b32 | decoding FLOPs removed "
        "(greedy) | (beam 5) |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Roles: " + ", ".join(f"{k} {v}" for k, v in sorted(roles.items())),
        "",
        "| kind | layer | head | role | confidence | entropy / uniform | distance "
        "| BLEU lost without it (val) | NLL gained (val) | gradient |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        *head_rows,
        "",
        "Curve (heads removed: BLEU): "
        + "; ".join(
            f"{name}: " + ", ".join(f"{p['removed']}: {p['bleu']:.2f}" for p in points)
            for name, points in curve["points"].items()
        ),
    ])  # fmt: skip
    for info in results["pruned"].values():
        info.pop("dir", None)
    write_results(args.name, results, table + "\n")


if __name__ == "__main__":
    main()
