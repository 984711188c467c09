"""The ``rosetta`` command line: one verb per stage of the data flow.

    rosetta prepare CONFIG            corpus -> SentencePiece -> cached id arrays
    rosetta train CONFIG [--resume]   train; writes EXP/model
    rosetta translate MODEL_DIR       file or stdin -> translations
    rosetta evaluate MODEL_DIR --src F --ref F     sacreBLEU BLEU and chrF
    rosetta average CONFIG --last N   average checkpoints into EXP/model
    rosetta attention MODEL_DIR --src TEXT -o out.png   attention heat map (or --format json)
    rosetta export MODEL_DIR OUT --format ctranslate2   for `translate --engine ctranslate2`
    rosetta data multi30k DEST        download (or --from DIR) Multi30k En-De
    rosetta data toy DEST             write the built-in toy corpus
    rosetta demo                      toy task end to end: train, translate, BLEU

Every verb that reads a configuration accepts ``--set key=value`` overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rosetta.config import ConfigError, ExperimentConfig, load_config


def _config(args: argparse.Namespace) -> ExperimentConfig:
    overrides = list(args.set or [])
    if getattr(args, "max_time", None):
        overrides.append(f"train.max_time={args.max_time}")
    return load_config(args.config, overrides)


def cmd_prepare(args: argparse.Namespace) -> None:
    from rosetta.data.batching import BatchIterator
    from rosetta.data.prepare import load_split, prepare

    config = _config(args)
    prepare(config, force=args.force)
    train = load_split(config, "train")
    batches = BatchIterator(train, config.train.max_tokens, seed=config.train.seed)
    print(
        f"{len(batches.epoch_batches(0)):,} batches of <= {config.train.max_tokens:,} tokens "
        f"per epoch; padding {batches.padding_fraction(0):.1%}"
    )


def cmd_train(args: argparse.Namespace) -> None:
    from rosetta.data.prepare import prepare
    from rosetta.train.trainer import train

    config = _config(args)
    prepare(config)
    train(config, resume=args.resume or False)


def _search_overrides(args: argparse.Namespace) -> dict:
    return dict(
        beam=args.beam,
        nbest=args.nbest,
        length_penalty=args.length_penalty,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        sampling=args.sample or None,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )


def make_translator(args: argparse.Namespace):
    """rosetta's own search, or CTranslate2 on an exported model (``--engine``)."""
    from rosetta.decode.translator import SearchOptions, Translator

    if getattr(args, "engine", "torch") == "ctranslate2":
        from rosetta.config import load_config
        from rosetta.export.ctranslate2 import CTranslate2Translator

        config = load_config(Path(args.model_dir) / "config.yaml")
        options = SearchOptions.from_config(config.decode, **_search_overrides(args))
        return CTranslate2Translator(args.model_dir, options)
    return Translator.from_model_dir(
        args.model_dir, args.device, getattr(args, "quantize", None), **_search_overrides(args)
    )


def cmd_translate(args: argparse.Namespace) -> None:
    import contextlib

    translator = make_translator(args)
    with contextlib.ExitStack() as files:
        out = files.enter_context(open(args.output, "w", encoding="utf-8")) if args.output else None
        if args.interactive:
            print("Type a sentence and press Enter (Ctrl-D to quit).", file=sys.stderr)
            for line in sys.stdin:
                print(translator.translate([line])[0].text, file=out or sys.stdout, flush=True)
            return
        source = files.enter_context(open(args.input, encoding="utf-8")) if args.input else None
        for result in translator.translate_stream(source or sys.stdin):
            if translator.options.nbest > 1:
                for text, hyp in result.hypotheses:
                    print(f"{hyp.score:.4f}\t{text}", file=out or sys.stdout)
            else:
                print(result.text, file=out or sys.stdout)


def evaluate_files(translator, src: Path, ref: Path, output: Path | None = None) -> dict:
    """Translates ``src`` and scores it against ``ref``; returns BLEU and chrF."""
    import time

    from rosetta.evaluate.metrics import bleu, chrf

    sources = src.read_text(encoding="utf-8").splitlines()
    references = ref.read_text(encoding="utf-8").splitlines()
    if len(sources) != len(references):
        raise ValueError(f"{src} has {len(sources)} lines but {ref} has {len(references)}")
    start = time.perf_counter()
    hypotheses = [t.text for t in translator.translate(sources)]
    seconds = time.perf_counter() - start
    if output:
        output.write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
    b, c = bleu(hypotheses, references), chrf(hypotheses, references)
    return {
        "bleu": b.score,
        "bleu_text": b.text,
        "bleu_signature": b.signature,
        "chrf": c.score,
        "chrf_signature": c.signature,
        "sentences_per_s": len(sources) / seconds,
        "hypotheses": hypotheses,
    }


def cmd_evaluate(args: argparse.Namespace) -> None:
    translator = make_translator(args)
    result = evaluate_files(translator, Path(args.src), Path(args.ref), args.output)
    print(f"{result['bleu_text']}\n  signature: {result['bleu_signature']}")
    print(f"chrF2 = {result['chrf']:.2f}\n  signature: {result['chrf_signature']}")
    print(f"{result['sentences_per_s']:.1f} sentences/s")
    if args.json:
        result.pop("hypotheses")
        Path(args.json).write_text(json.dumps(result, indent=2))


def cmd_average(args: argparse.Namespace) -> None:
    from rosetta.train.average import average_into_model_dir

    output = average_into_model_dir(_config(args), args.last, args.output)
    print(f"wrote {output}")


def cmd_attention(args: argparse.Namespace) -> None:
    from rosetta.decode.translator import Translator
    from rosetta.plotting import compute_attention, plot_attention

    if args.engine != "torch":
        raise ValueError("attention needs rosetta's own engine (--engine torch)")
    translator = Translator.from_model_dir(args.model_dir, args.device, **_search_overrides(args))
    attention = compute_attention(translator, args.src, args.kind)
    head = -1 if args.all_heads else args.head
    if args.format == "json":
        text = json.dumps(
            attention.to_json(args.layer, None if head == -1 else head), ensure_ascii=False
        )
        if args.output:
            Path(args.output).write_text(text + "\n", encoding="utf-8")
        else:
            print(text)
        return
    if not args.output:
        raise ValueError("--format png needs -o FILE.png")
    path = plot_attention(attention, args.output, args.layer, head)
    print(f"{attention.translation}\nwrote {path}")


def cmd_export(args: argparse.Namespace) -> None:
    from rosetta.export.ctranslate2 import export_ctranslate2

    quantization = None if args.quantization == "none" else args.quantization
    path = export_ctranslate2(args.model_dir, args.output, quantization)
    print(f"exported {args.model_dir} to {path} (CTranslate2, {args.quantization})")


def cmd_data(args: argparse.Namespace) -> None:
    if args.corpus == "multi30k":
        from rosetta.data.download import download_multi30k

        paths = download_multi30k(args.dest, from_dir=args.from_dir)
    else:
        from rosetta.data.toy import write_corpus

        paths = write_corpus(args.dest, seed=args.seed)
    for split, files in paths.items():
        print(f"{split}: {', '.join(str(f) for f in files)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from rosetta.demo import run_demo

    run_demo(_config(args))


def _add_search_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("search (defaults: the model's decode section)")
    group.add_argument("--beam", type=int, help="beam size; 1 = greedy")
    group.add_argument("--nbest", type=int, help="hypotheses per input (<= beam)")
    group.add_argument("--length-penalty", type=float, help="GNMT alpha")
    group.add_argument("--batch-size", type=int, help="max sentences per batch")
    group.add_argument("--max-tokens", type=int, help="max padded source tokens per batch")
    group.add_argument("--sample", action="store_true", help="sample instead of searching")
    group.add_argument("--temperature", type=float)
    group.add_argument("--top-k", type=int)
    group.add_argument("--top-p", type=float)
    group.add_argument("--device", default="cpu", help="cpu or cuda")
    group.add_argument(
        "--engine",
        choices=["torch", "ctranslate2"],
        default="torch",
        help="ctranslate2: MODEL_DIR is a `rosetta export` folder",
    )
    group.add_argument(
        "--quantize", choices=["none", "int8"], help="dynamic int8 linear layers (torch, CPU)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rosetta", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def with_config(name: str, help_text: str, config_required: bool = True):
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        if config_required:
            sub.add_argument("config", help="experiment YAML file")
        else:
            sub.add_argument("--config", default="configs/toy.yaml", help="experiment YAML")
        sub.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a key, e.g. train.lr=1e-3"
        )
        return sub

    sub = with_config("prepare", "tokenise and cache a corpus")
    sub.add_argument("--force", action="store_true", help="redo even if inputs are unchanged")
    sub.set_defaults(func=cmd_prepare)

    sub = with_config("train", "train a model (prepares the data first if needed)")
    sub.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="CHECKPOINT",
        help="continue from checkpoints/last.pt, or from the training state given "
        "(e.g. checkpoints/previous.pt)",
    )
    sub.add_argument("--max-time", help="wall-clock budget, e.g. 60m")
    sub.set_defaults(func=cmd_train)

    sub = verbs.add_parser("translate", help="translate text with a model directory")
    sub.add_argument("model_dir")
    sub.add_argument("-i", "--input", help="input file (default: stdin)")
    sub.add_argument("-o", "--output", help="output file (default: stdout)")
    sub.add_argument("--interactive", action="store_true", help="translate line by line")
    _add_search_options(sub)
    sub.set_defaults(func=cmd_translate)

    sub = verbs.add_parser("evaluate", help="translate a test set and score it with sacreBLEU")
    sub.add_argument("model_dir")
    sub.add_argument("--src", required=True, help="source file")
    sub.add_argument("--ref", required=True, help="reference file")
    sub.add_argument("-o", "--output", type=Path, help="write the translations here")
    sub.add_argument("--json", help="write the scores to this JSON file")
    _add_search_options(sub)
    sub.set_defaults(func=cmd_evaluate)

    sub = with_config("average", "average the last N checkpoints into the model directory")
    sub.add_argument("--last", type=int, default=5, help="how many (default 5)")
    sub.add_argument("-o", "--output", help="model directory to write (default EXP/model)")
    sub.set_defaults(func=cmd_average)

    sub = verbs.add_parser("attention", help="heat map of what the model attended to")
    sub.add_argument("model_dir")
    sub.add_argument("--src", required=True, help="the source sentence")
    sub.add_argument("--kind", choices=["cross", "encoder_self", "decoder_self"], default="cross")
    sub.add_argument("--layer", type=int, default=-1, help="layer index (default: the last)")
    heads = sub.add_mutually_exclusive_group()
    heads.add_argument("--head", type=int, help="one head (default: the mean over heads)")
    heads.add_argument("--all-heads", action="store_true", help="one panel per head")
    sub.add_argument("-o", "--output", help="PNG (or JSON) file to write")
    sub.add_argument("--format", choices=["png", "json"], default="png")
    _add_search_options(sub)
    sub.set_defaults(func=cmd_attention)

    sub = verbs.add_parser("export", help="convert a model directory for an inference engine")
    sub.add_argument("model_dir")
    sub.add_argument("output", help="folder to write")
    sub.add_argument("--format", choices=["ctranslate2"], default="ctranslate2")
    sub.add_argument(
        "--quantization", choices=["none", "int8", "int8_float32", "int16"], default="none"
    )
    sub.set_defaults(func=cmd_export)

    sub = verbs.add_parser("data", help="get a corpus")
    sub.add_argument("corpus", choices=["multi30k", "toy"])
    sub.add_argument("dest", help="folder to write the corpus to")
    sub.add_argument("--from", dest="from_dir", help="copy Multi30k from a local folder")
    sub.add_argument("--seed", type=int, default=1, help="toy corpus seed")
    sub.set_defaults(func=cmd_data)

    sub = with_config("demo", "train on the toy task, report BLEU, translate", False)
    sub.add_argument("--max-time", help="wall-clock training budget, e.g. 3m")
    sub.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from rosetta.data.download import DownloadError
    from rosetta.train.checkpoint import CheckpointError
    from rosetta.train.trainer import TrainingError, TrainingInterrupted

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (
        ConfigError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        DownloadError,
        CheckpointError,
        TrainingError,
    ) as error:
        print(f"rosetta {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"rosetta {args.verb}: {stop}; continue with --resume", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
