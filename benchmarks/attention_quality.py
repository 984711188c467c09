"""What the efficient attention variants cost in translation quality.

Two measurements, each variant trained for the same number of updates as full
attention with everything else equal (a budget in updates, not minutes, so
the comparison does not depend on how busy the machine is):

* ``multi30k``: the Multi30k En->De recipe (configs/multi30k_en_de.yaml)
  for --steps updates, with the encoder and decoder self-attention swapped;
  test2016 BLEU, beam 5, the recipe's length penalty, sacreBLEU signature.
* ``long``: the long-input toy task (documents of consecutive toy sentences,
  ``data.toy.sentences``); trained on documents of --train-sentences, then
  greedy BLEU on held-out documents in buckets of source length up to 2,000
  subwords, beyond the lengths seen in training, so that translating at length is measured.
* ``range``: the referent toy task (``data.toy.referent``: a document opens with
  its topic, and each later "someone" is translated from that topic alone);
  trained on documents of --train-sentences, then greedy decoding of held-out
  documents by how many sentences follow the topic, scored by
  ``referent_agreement`` (the share of "someone" rendered with the topic's stem)
  and BLEU. A window of radius r in L layers reaches r·L positions; global
  positions reach the topic from anywhere. Every system keeps full
  cross-attention, through which a decoder could also find the topic: the task
  shows whether the models learn to. With --style the referent's ending (-ulo
  or -eto) is drawn per document and shown only in the target's opening, which
  cross-attention cannot see: the teacher-forced referent accuracy then measures
  what the decoder's self-attention carries from its own first sentence.

    python benchmarks/attention_quality.py multi30k --steps 700
    python benchmarks/attention_quality.py long --steps 800 --per-bucket 8
    python benchmarks/attention_quality.py range --steps 800 --train-sentences 2 24
    python benchmarks/attention_quality.py range --style --steps 800 --train-sentences 2 24

Results: benchmarks/results/attention_quality_{multi30k,long,range}.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from results_io import write_results
from rosetta.config import ExperimentConfig, load_config, packaged_config
from rosetta.data.prepare import corpus_root, prepare
from rosetta.data.tokenizer import BOS_ID, Tokenizer
from rosetta.data.toy import generate_document, is_referent, referent_agreement
from rosetta.decode.translator import Translator
from rosetta.evaluate import evaluate_files
from rosetta.evaluate.metrics import bleu
from rosetta.modeldir import read_metadata
from rosetta.train.trainer import train

# (encoder self-attention, decoder self-attention) for each system compared
MULTI30K_SYSTEMS = {
    "full": ({}, {}),
    "local r=8": ({"variant": "local", "radius": 8}, {"variant": "local", "radius": 8}),
    "linear (elu+1)": ({"variant": "linear"}, {"variant": "linear"}),
    "lowrank k=32 (encoder)": ({"variant": "lowrank", "rank": 32}, {}),
    "sparse r=8, g=2": (
        {"variant": "sparse", "radius": 8, "global_tokens": 2},
        {"variant": "sparse", "radius": 8, "global_tokens": 2},
    ),
    # chunks of 8: Multi30k's ~20 subwords still hash into buckets (with chunks of
    # 32 every sentence would be one bucket: full attention with shared QK)
    "lsh c=8 (encoder)": ({"variant": "lsh", "bucket_size": 8, "hashes": 2}, {}),
}
LONG_SYSTEMS = {
    "full": ({}, {}),
    "local r=32": ({"variant": "local", "radius": 32}, {"variant": "local", "radius": 32}),
    "linear (elu+1)": ({"variant": "linear"}, {"variant": "linear"}),
    "lowrank k=64 (encoder)": ({"variant": "lowrank", "rank": 64}, {}),
    "sparse r=32, g=16": (
        {"variant": "sparse", "radius": 32, "global_tokens": 16},
        {"variant": "sparse", "radius": 32, "global_tokens": 16},
    ),
    "lsh c=64 (encoder), local r=32 (decoder)": (
        {"variant": "lsh", "bucket_size": 64, "hashes": 2},
        {"variant": "local", "radius": 32},
    ),
}
RANGE_SYSTEMS = {
    "full": ({}, {}),
    "local r=16": ({"variant": "local", "radius": 16}, {"variant": "local", "radius": 16}),
    "sparse r=16, g=16": (
        {"variant": "sparse", "radius": 16, "global_tokens": 16},
        {"variant": "sparse", "radius": 16, "global_tokens": 16},
    ),
    "lsh c=32 (encoder), local r=16 (decoder)": (
        {"variant": "lsh", "bucket_size": 32, "hashes": 2},
        {"variant": "local", "radius": 16},
    ),
}
# referent test documents: sentences after the topic, per bucket
RANGE_BUCKETS = [(1, 2), (3, 6), (7, 12), (13, 24)]
FAR_FIRST = 5  # ... and documents whose first "someone" is at least this many sentences on
# test documents: sentences per document for each bucket's pool, and the buckets
# of source length (subwords) they are sorted into
LONG_POOLS = [(2, 20), (20, 60), (60, 130), (100, 200)]
LONG_BUCKETS = [(0, 200), (200, 500), (500, 1000), (1000, 2000)]


def chosen(systems: dict, names: list[str] | None) -> dict:
    """The ``systems`` named (all without names); an unknown name is an error."""
    if not names:
        return systems
    unknown = [name for name in names if name not in systems]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {list(systems)}")
    return {name: systems[name] for name in names}


def overrides(encoder: dict, decoder: dict) -> list[str]:
    sets = [f"model.encoder_attention.{k}={v}" for k, v in encoder.items()]
    return sets + [f"model.decoder_attention.{k}={v}" for k, v in decoder.items()]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def train_system(config_path: Path, sets: list[str]) -> tuple[ExperimentConfig, dict]:
    config = load_config(config_path, sets)
    if (config.experiment_dir / "model").exists():
        print(f"{config.experiment_dir}/model exists: evaluating it")
    else:
        prepare(config)
        train(config)
    return config, read_metadata(config.experiment_dir / "model")


def run_multi30k(args) -> None:
    results: dict = {"steps": args.steps, "systems": {}}
    rows = []
    for name, (encoder, decoder) in chosen(MULTI30K_SYSTEMS, args.systems).items():
        sets = [
            f"experiment_dir={args.root}/multi30k/{slug(name)}",
            f"train.max_steps={args.steps}",
            "train.max_time=null",
            f"train.valid_every={max(1, args.steps // 4)}",
            *overrides(encoder, decoder),
        ]
        start = time.monotonic()
        config, metadata = train_system(Path(args.config), sets)
        minutes = (time.monotonic() - start) / 60
        root = corpus_root(config)
        split = config.data.test
        translator = Translator.load(config.experiment_dir / "model", beam=5)
        scores = evaluate_files(
            translator,
            root / f"{split}.{config.data.src_lang}",
            root / f"{split}.{config.data.tgt_lang}",
        )
        scores.pop("hypotheses")
        results["systems"][name] = dict(
            overrides=sets, metadata=metadata, scores=scores, wall_minutes=minutes
        )
        rows.append(
            f"| {name} | {scores['bleu']:.1f} | {scores['chrf']:.1f} | "
            f"{metadata.get('training_minutes')} | {metadata.get('weights')} |"
        )
        print(f"{name}: {scores['bleu_text']}", flush=True)
    signature = scores["bleu_signature"]
    table = (
        f"`{args.command}`\n\nMulti30k En->De, configs/multi30k_en_de.yaml, {args.steps} updates "
        f"for every system (the recipe unchanged otherwise), {args.machine}. test2016, beam 5, "
        f"length penalty from the config.\n\n"
        "| self-attention | test2016 BLEU | chrF | training minutes | weights |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + f"\n\nBLEU signature: `{signature}`\n"
    )
    write_results("attention_quality_multi30k", results, table)


def long_test_set(
    tokenizer: Tokenizer, seed: int, per_bucket: int
) -> dict[tuple[int, int], list[tuple[str, str]]]:
    """Held-out documents (a seed the training corpus never used), bucketed by
    source length in subwords."""
    rng = random.Random(seed)
    buckets: dict[tuple[int, int], list[tuple[str, str]]] = {b: [] for b in LONG_BUCKETS}
    for pool in LONG_POOLS:
        for _ in range(4 * per_bucket):
            source, target = generate_document(rng, pool)
            length = len(tokenizer.encode_source([source])[0])
            for low, high in LONG_BUCKETS:
                if low <= length < high and len(buckets[low, high]) < per_bucket:
                    buckets[low, high].append((source, target))
    return buckets


def run_long(args) -> None:
    fewest, most = args.train_sentences
    results: dict = {"steps": args.steps, "train_sentences": [fewest, most], "systems": {}}
    header = " | ".join(f"{low}-{high}" for low, high in LONG_BUCKETS)
    rows = []
    buckets = None
    for name, (encoder, decoder) in chosen(LONG_SYSTEMS, args.systems).items():
        sets = [*toy_sets(name, "long", args, (fewest, most)), *overrides(encoder, decoder)]
        config, metadata = train_system(packaged_config("toy.yaml"), sets)
        model_dir = config.experiment_dir / "model"
        translator = Translator.load(model_dir, beam=1, max_tokens=16000, batch_size=8)
        if buckets is None:  # one test set for all: the tokenizers are trained alike
            buckets = long_test_set(Tokenizer.load(model_dir), args.seed, args.per_bucket)
            results["bucket_sizes"] = {f"{lo}-{hi}": len(b) for (lo, hi), b in buckets.items()}
        scores = {}
        for (low, high), pairs in buckets.items():
            if not pairs:
                continue
            start = time.monotonic()
            outputs = [t.text for t in translator.translate([s for s, _ in pairs])]
            score = bleu(outputs, [t for _, t in pairs])
            scores[f"{low}-{high}"] = dict(
                bleu=score.score, text=score.text, seconds=time.monotonic() - start
            )
            print(f"{name} {low}-{high}: {score.text}", flush=True)
        results["systems"][name] = dict(overrides=sets, metadata=metadata, scores=scores)
        results["signature"] = score.signature
        cells = [
            f"{scores[k]['bleu']:.1f}" if k in scores else "–"
            for k in (f"{lo}-{hi}" for lo, hi in LONG_BUCKETS)
        ]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {metadata.get('training_minutes')} |")
    sizes = ", ".join(f"{k}: {v}" for k, v in results["bucket_sizes"].items())
    table = (
        f"`{args.command}`\n\nThe long-input toy task: the toy config (d_model 128, 2+2 layers), "
        f"trained {args.steps} updates on documents of {fewest}-{most} consecutive sentences, "
        f"{args.machine}; greedy BLEU on held-out documents by source length in subwords "
        f"(documents per bucket: {sizes}).\n\n"
        f"| self-attention | {header} | training minutes |\n"
        f"|---|{'---|' * len(LONG_BUCKETS)}---|\n"
        + "\n".join(rows)
        + f"\n\nBLEU signature: `{results['signature']}`\n"
    )
    write_results("attention_quality_long", results, table)


def toy_sets(name: str, part: str, args, sentences: tuple[int, int], *extra: str) -> list[str]:
    """The overrides of a toy-config system trained ``args.steps`` updates on
    documents of ``sentences``."""
    fewest, most = sentences
    return [
        f"experiment_dir={args.root}/{part}/{slug(name)}",
        f"data.toy.sentences=[{fewest},{most}]",
        *extra,
        "data.toy.train_size=6000",
        "data.toy.valid_size=100",
        "data.toy.test_size=100",
        "data.max_len=1000",
        "model.max_positions=4096",
        "train.max_tokens=6000",
        f"train.max_steps={args.steps}",
        "train.max_time=null",
        "train.warmup=100",  # toy.yaml's 300 is for its 400-step run of short sentences
        f"train.valid_every={max(1, args.steps // 3)}",
        "train.valid_bleu_size=20",
    ]


@torch.inference_mode()
def referent_forced(
    translator: Translator, pairs: list[tuple[str, str]], first_only: bool = False
) -> dict[str, float]:
    """Teacher-forced on each reference: of the referent words after the opening
    (``first_only``: the first of them), the share whose every piece is the model's
    most probable next piece. With the style task the ending comes only from the
    target's own opening (module doc), or from a referent word before it."""
    model, tokenizer = translator.model, translator.tokenizer
    right = total = 0
    for source, target in pairs:
        seen = 0
        ids = tokenizer.encode_target([target])[0]
        src = torch.tensor([tokenizer.encode_source([source])[0]])
        guess = model(src, torch.tensor([[BOS_ID, *ids]]))[0].argmax(-1).tolist()
        pieces = tokenizer.target_pieces(ids)
        starts = [i for i, piece in enumerate(pieces) if piece.startswith("▁")] + [len(ids)]
        opened = False  # past the opening sentence
        for start, end in itertools.pairwise(starts):
            word = "".join(pieces[start:end]).lstrip("▁")
            if opened and is_referent(word.rstrip(".")) and not (first_only and seen):
                total, seen = total + 1, seen + 1
                right += guess[start:end] == ids[start:end]
            opened = opened or word.endswith(".")
    return {"forced_accuracy": right / total if total else float("nan"), "forced": total}


def first_referent(target: str) -> int:
    """The index of the first sentence after the opening that has a referent word
    (1 = the sentence right after it; 0 = none)."""
    for index, sentence in enumerate(target.split(". ")[1:], start=1):
        if any(is_referent(word.rstrip(".")) for word in sentence.split()):
            return index
    return 0


def run_range(args) -> None:
    rng = random.Random(args.seed)
    tests = {
        bucket: [
            generate_document(rng, bucket, referent=True, style=args.style)
            for _ in range(args.per_bucket)
        ]
        for bucket in RANGE_BUCKETS
    }
    # documents whose first referent comes FAR_FIRST or more sentences after the topic:
    # with the style task, nothing near it shows the ending (no referent word before it)
    far: list[tuple[str, str]] = []
    while len(far) < args.per_bucket:
        pair = generate_document(rng, (FAR_FIRST, 24), referent=True, style=args.style)
        if first_referent(pair[1]) >= FAR_FIRST:
            far.append(pair)
    results: dict = {"steps": args.steps, "train_sentences": list(args.train_sentences)}
    results |= {"style": args.style, "systems": {}}
    part = "range_style" if args.style else "range"
    task = ["data.toy.referent=true"] + (["data.toy.referent_style=true"] if args.style else [])
    rows = []
    for name, (encoder, decoder) in chosen(RANGE_SYSTEMS, args.systems).items():
        sets = toy_sets(name, part, args, args.train_sentences, *task)
        config, metadata = train_system(
            packaged_config("toy.yaml"), sets + overrides(encoder, decoder)
        )
        translator = Translator.load(
            config.experiment_dir / "model", beam=1, max_tokens=16000, batch_size=8
        )
        scores = {}
        for (low, high), pairs in tests.items():
            outputs = [t.text for t in translator.translate([s for s, _ in pairs])]
            references = [t for _, t in pairs]
            agreement = referent_agreement(outputs, references)
            forced = referent_forced(translator, pairs)
            score = bleu(outputs, references)
            scores[f"{low}-{high}"] = dict(agreement, **forced, bleu=score.score)
            results["signature"] = score.signature
            print(
                f"{name}, {low}-{high} sentences after the topic: agreement "
                f"{agreement['accuracy']:.3f} ({agreement['right']}/{agreement['expected']}, "
                f"{agreement['wrong']} wrong), teacher-forced {forced['forced_accuracy']:.3f} "
                f"of {forced['forced']}, BLEU {score.score:.1f}",
                flush=True,
            )
        first = referent_forced(translator, far, first_only=True)
        scores["first far"] = first
        print(
            f"{name}, the first referent {FAR_FIRST}+ sentences after the topic: teacher-forced "
            f"{first['forced_accuracy']:.3f} of {first['forced']}",
            flush=True,
        )
        results["systems"][name] = dict(overrides=sets, metadata=metadata, scores=scores)
        cells = [
            "{accuracy:.2f} / {forced_accuracy:.2f} / {bleu:.1f}".format(**scores[f"{lo}-{hi}"])
            for lo, hi in RANGE_BUCKETS
        ] + [f"{first['forced_accuracy']:.2f} ({first['forced']})"]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {metadata.get('training_minutes')} |")
    header = " | ".join(f"{lo}-{hi} sentences after" for lo, hi in RANGE_BUCKETS)
    header += f" | first referent {FAR_FIRST}+ sentences after (teacher-forced)"
    fewest, most = args.train_sentences
    table = (
        f"`{args.command}`\n\nThe referent toy task{' (style)' if args.style else ''}: "
        "the toy config (d_model 128, 2+2 layers), "
        f"trained {args.steps} updates on documents of a topic and {fewest}-{most} sentences, "
        f"{args.machine}; greedy decoding of {args.per_bucket} held-out documents per bucket. "
        "Each cell: referent agreement (greedy: the share of the reference's someone "
        "rendered with the topic's stem) / teacher-forced referent accuracy (of the referent "
        "words after the opening, the share whose every piece is the model's most probable "
        "next one, on the reference) / BLEU; and the teacher-forced accuracy on the first "
        f"referent of {args.per_bucket} documents where it comes {FAR_FIRST} or more sentences "
        "after the topic (how many scored).\n\n"
        f"| self-attention | {header} | training minutes |\n"
        f"|---|{'---|' * (len(RANGE_BUCKETS) + 1)}---|\n"
        + "\n".join(rows)
        + f"\n\nBLEU signature: `{results['signature']}`\n"
    )
    write_results(f"attention_quality_{part}", results, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["multi30k", "long", "range"])
    parser.add_argument("--steps", type=int, default=700, help="updates for every system")
    parser.add_argument("--config", default="configs/multi30k_en_de.yaml")
    parser.add_argument("--root", default="experiments/attention_quality")
    parser.add_argument(
        "--train-sentences", type=int, nargs=2, default=(4, 40), metavar=("FEWEST", "MOST")
    )
    parser.add_argument("--seed", type=int, default=1001, help="seed of the long test documents")
    parser.add_argument("--per-bucket", type=int, default=24, help="test documents per length")
    parser.add_argument(
        "--systems", nargs="+", help="train and score only these systems (names as in the table)"
    )
    parser.add_argument(
        "--style",
        action="store_true",
        help="range: the referent's ending drawn per document, shown only in the target's opening",
    )
    args = parser.parse_args()
    args.command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )
    {"multi30k": run_multi30k, "long": run_long, "range": run_range}[args.part](args)


if __name__ == "__main__":
    main()
