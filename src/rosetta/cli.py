"""The ``rosetta`` command line: one verb per stage of the data flow.

    rosetta prepare CONFIG            corpus -> SentencePiece -> cached id arrays
    rosetta train CONFIG [--resume]   train; writes EXP/model
    rosetta translate MODEL_DIR       file or stdin -> translations
    rosetta evaluate MODEL_DIR --src F --ref F     sacreBLEU BLEU and chrF
    rosetta average CONFIG --last N   average checkpoints into EXP/model
    rosetta attention MODEL_DIR --src TEXT -o out.png   attention heat map (or --format json)
    rosetta export MODEL_DIR OUT --format ctranslate2   for `translate --engine ctranslate2`
    rosetta import marian SOURCE -o MODEL_DIR   an OPUS-MT (Marian) model as a model directory
    rosetta serve MODEL_DIR [--port 8000]   HTTP API, LibreTranslate API and the web page
    rosetta plot EXP [-o curves.png]  training curves from EXP/metrics.jsonl
    rosetta data multi30k DEST        download (or --from DIR) Multi30k En-De
    rosetta data toy DEST             write the built-in toy corpus
    rosetta demo                      toy task end to end: train, translate, BLEU

Every verb that reads a configuration accepts ``--set key=value`` overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

from rosetta.config import ConfigError, ExperimentConfig, ServeConfig, load_config, packaged_config
from rosetta.version import version


def _config(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment named on the command line (``demo`` without ``--config``: the
    toy task's, shipped in the package), with ``--set``, ``--max-time`` and (for
    ``train``) ``--device`` applied."""
    overrides = list(args.set or [])
    if getattr(args, "max_time", None):
        overrides.append(f"train.max_time={args.max_time}")
    if args.verb == "train" and args.device:
        overrides.append(f"train.device={args.device}")
    if getattr(args, "init", None):
        overrides.append(f"init={args.init}")
    config = load_config(args.config or packaged_config("toy.yaml"), overrides)
    if config.init is None:
        return config
    from rosetta.modeldir import resolve_init  # torch: only when a model is read

    return resolve_init(config)


def cmd_prepare(args: argparse.Namespace) -> None:
    from rosetta.data.batching import BatchIterator
    from rosetta.data.prepare import corpus_mixture, load_split, prepare

    config = _config(args)
    prepare(config, force=args.force)
    train = load_split(config, "train")
    batches = BatchIterator(
        train, config.train.max_tokens, config.train.seed, corpus_mixture(config)
    )
    print(
        f"{len(batches.epoch_batches(0)):,} batches of <= {config.train.max_tokens:,} tokens "
        f"per epoch; padding {batches.padding_fraction(0):.1%}"
    )


def cmd_train(args: argparse.Namespace) -> None:
    """Trains in this process, or as one process of a ``torchrun`` job (rank 0
    prepares the data while the others wait). The launching process returns only
    once every process of the job has ended, with 128 + the signal when one
    stopped it (``rosetta.train.distributed.launch``)."""
    import signal
    from contextlib import ExitStack

    from rosetta.data.prepare import prepare
    from rosetta.safeio import one_writer
    from rosetta.train.distributed import Context, DistributedError, launch
    from rosetta.train.trainer import train

    if args.nproc_per_node:
        status = launch(_train_arguments(args), args.nproc_per_node, args.nnodes,
                        args.node_rank, args.master_addr, args.master_port)  # fmt: skip
        if status - 128 in signal.valid_signals():  # rank 0 has said where it saved
            print(f"rosetta train: every training process has ended "
                  f"({signal.Signals(status - 128).name}); continue with --resume",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(status)
        if status:
            raise DistributedError(
                f"the {args.nproc_per_node} training processes stopped (torchrun's exit "
                f"status {status}); the first one to fail is named above"
            )
        return
    config = _config(args)
    with Context.from_environment(config.train.device) as context, ExitStack() as held:
        if context.is_main:  # one writer from the data to the model directory
            held.enter_context(one_writer(config.experiment_dir, "rosetta train"))
            prepare(config)
        context.barrier()
        train(config, resume=args.resume or False, context=context)


def _train_arguments(args: argparse.Namespace) -> list[str]:
    """The ``rosetta train`` arguments each launched process gets (all but the launch's)."""
    arguments = [args.config]
    for override in args.set or []:
        arguments += ["--set", override]
    if args.resume:
        arguments += ["--resume"] + ([] if args.resume is True else [str(args.resume)])
    if args.max_time:
        arguments += ["--max-time", args.max_time]
    if args.device:
        arguments += ["--device", args.device]
    if args.init:
        arguments += ["--init", args.init]
    return arguments


def _search_overrides(args: argparse.Namespace) -> dict:
    """The search settings given on the command line (the flags ``_add_search_options``
    made); None keeps the model's."""
    from rosetta.decode.search import option_fields

    names = [*option_fields(), "search", "batch_size", "max_tokens"]
    overrides = {name: getattr(args, name, None) for name in names}
    overrides["sampling"] = getattr(args, "sample", False) or None
    # n-best lines print each hypothesis's log-probability, which greedy search and
    # CTranslate2 compute only when asked
    overrides["scores"] = overrides.get("nbest") is not None or None
    return overrides


def _translator(args: argparse.Namespace):
    """The engine and search the command line asks for (``Translator.load``)."""
    from rosetta.decode.translator import Translator

    return Translator.load(
        args.model_dir,
        engine=getattr(args, "engine", "torch"),
        device=args.device,
        quantize=getattr(args, "quantize", None),
        **_search_overrides(args),
    )


def cmd_translate(args: argparse.Namespace) -> None:
    """One output line per input line (with ``--nbest``: ``id ||| text ||| log_prob``
    lines, ids from 0). ``-i`` is read through once before the model loads, so a
    missing, unreadable or non-UTF-8 input fails before anything is written; ``-o``
    is written to a temporary file renamed over it at the end."""
    import contextlib

    from rosetta.data.text import (
        STDIN,
        check_lines,
        check_output,
        iter_lines,
        open_input,
        write_lines_atomic,
    )

    if args.interactive and args.output:
        raise ValueError("--interactive prints to the terminal; it cannot be combined with -o")
    if args.input:
        check_lines(args.input)
    if args.output:
        check_output(args.output, [args.input] if args.input else [])
    from rosetta.decode.constraints import read_constraint_lines
    from rosetta.decode.glossary import Glossary

    glossary = Glossary.load(args.glossary) if args.glossary else None
    constraints = read_constraint_lines(args.constraints) if args.constraints else None
    if constraints is not None:
        check_lines(args.constraints)
    translator = _translator(args)

    def output_lines(results) -> Iterator[str]:
        for index, result in enumerate(results):
            yield from result.nbest_lines(index) if args.nbest is not None else [result.text]

    if args.interactive:
        print("Type a sentence and press Enter (Ctrl-D to quit).", file=sys.stderr)
        if constraints is not None:
            raise ValueError("--constraints go with -i or stdin, not --interactive")
        lines = iter_lines(sys.stdin.buffer)
        typed = (translator.translate([line], glossary=glossary)[0] for line in lines)
        for line in output_lines(typed):
            print(line, flush=True)
        return
    with contextlib.ExitStack() as files:
        stream = files.enter_context(open_input(args.input)) if args.input else sys.stdin.buffer
        results = translator.translate_stream(
            iter_lines(stream, args.input or STDIN), constraints=constraints, glossary=glossary
        )
        if args.output:
            count = write_lines_atomic(args.output, output_lines(results))
            print(f"wrote {count:,} lines to {args.output}", file=sys.stderr)
        else:
            for line in output_lines(results):
                print(line)


def cmd_distill(args: argparse.Namespace) -> None:
    from rosetta.data.prepare import prepare
    from rosetta.decode.distill import distill
    from rosetta.decode.translator import Translator

    config = _config(args)
    if config.data.toy is not None:
        prepare(config)  # writes the generated toy corpus
    teacher = Translator.load(args.teacher, device=args.device, **_search_overrides(args))
    distill(teacher, Path(args.teacher), config, args.output or config.experiment_dir / "distilled")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from rosetta.data.text import check_output
    from rosetta.evaluate import evaluate_files
    from rosetta.safeio import atomic_write_text

    for output in (args.output, args.json):
        if output:
            check_output(output, [args.src, args.ref])
    translator = _translator(args)
    result = evaluate_files(translator, Path(args.src), Path(args.ref), args.output)
    print(f"{result['bleu_text']}\n  signature: {result['bleu_signature']}")
    print(f"chrF2 = {result['chrf']:.2f}\n  signature: {result['chrf_signature']}")
    print(f"{result['sentences_per_s']:.1f} sentences/s")
    if args.output:
        print(f"wrote the translations to {args.output}")
    if args.json:
        result.pop("hypotheses")
        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")
        print(f"wrote the scores to {args.json}")


def cmd_average(args: argparse.Namespace) -> None:
    from rosetta.train.average import average_into_model_dir

    output = average_into_model_dir(_config(args), args.last, args.output)
    print(f"wrote {output}")


def cmd_attention(args: argparse.Namespace) -> None:
    """Writes the heat map (``-o name`` without a suffix becomes ``name.png``; the
    path written is printed) or the matrices as JSON, atomically either way."""
    from rosetta.data.text import check_output
    from rosetta.decode.translator import TorchTranslator
    from rosetta.plotting import compute_attention, plot_attention, png_path
    from rosetta.safeio import atomic_write_text

    output = args.output
    if args.format == "png":
        if not output:
            raise ValueError("--format png needs -o FILE.png")
        output = png_path(output)
    if output:
        check_output(output)
    translator = TorchTranslator.from_model_dir(
        args.model_dir, args.device, **_search_overrides(args)
    )
    attention = compute_attention(translator, args.src, args.kind)
    head = -1 if args.all_heads else args.head
    if args.format == "json":
        text = json.dumps(
            attention.to_json(args.layer, None if head == -1 else head), ensure_ascii=False
        )
        if output:
            atomic_write_text(Path(output), text + "\n")
            print(f"wrote {output}", file=sys.stderr)
        else:
            print(text)
        return
    path = plot_attention(attention, output, args.layer, head)
    print(f"{attention.translation}\nwrote {path}")


def cmd_heads(args: argparse.Namespace) -> None:
    """Analyses every attention head (``rosetta.evaluate.heads``): writes heads.json,
    heads.png (the grid) and heads_pruning.png (the curve) to -o (default: the model
    directory, where the service finds heads.json); with --prune or --keep-bleu-drop,
    also a pruned model directory, and with --finetune-steps its fine-tuned version."""
    from rosetta.data.text import read_lines
    from rosetta.decode.translator import TorchTranslator
    from rosetta.evaluate import heads
    from rosetta.plotting import plot_head_grid, plot_pruning_curve
    from rosetta.safeio import atomic_write_text

    pruning = args.prune is not None or args.keep_bleu_drop is not None
    if pruning and not args.pruned_model:
        raise ValueError("--prune and --keep-bleu-drop write a model: name it with --pruned-model")
    if args.finetune_steps and not (pruning and args.finetune_config):
        raise ValueError("--finetune-steps fine-tunes the pruned model: give --prune or "
                         "--keep-bleu-drop, --pruned-model and --finetune-config")  # fmt: skip
    if bool(args.valid_src) != bool(args.valid_ref):
        raise ValueError("give --valid-src and --valid-ref together")
    if pruning:
        heads.check_pruned_output(args.pruned_model, args.model_dir)
    out = Path(args.output or args.model_dir)
    translator = TorchTranslator.from_model_dir(
        args.model_dir, args.device, **_search_overrides(args)
    )
    valid = (read_lines(args.valid_src), read_lines(args.valid_ref)) if args.valid_src else None
    report = heads.analyse(
        translator, args.model_dir, read_lines(args.src), read_lines(args.ref), valid,
        steps=args.steps, seed=args.order_seed, masking_bleu=not args.no_masking_bleu,
        progress=lambda text: print(text, file=sys.stderr),
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "heads.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    written = [out / "heads.json", plot_head_grid(report, out / "heads.png")]
    if "curve" in report:
        written.append(plot_pruning_curve(report, out / "heads_pruning.png"))
        for name, area in report["curve"]["area_vs_random"].items():
            print(f"{name} order: area above the random order {area:+.1f} BLEU x heads")
    print("wrote " + ", ".join(str(path) for path in written))
    if not pruning:
        return
    model_heads = heads.heads_of(translator.model, heads.kept_heads(args.model_dir))
    removed = heads.chosen_removal(report, model_heads, args.order, args.prune, args.keep_bleu_drop)
    pruned = heads.prune(translator, args.model_dir, removed, args.pruned_model)
    atomic_write_text(
        pruned / "heads.json",
        json.dumps(heads.after_pruning(report, removed), indent=1, ensure_ascii=False) + "\n",
    )
    print(f"wrote {pruned}: {len(removed)} of {len(model_heads)} heads removed "
          f"({', '.join(h.name for h in removed)})")  # fmt: skip
    if args.finetune_steps:
        from rosetta.data.prepare import prepare
        from rosetta.modeldir import resolve_init
        from rosetta.train.trainer import train

        overrides = [f"init={pruned}", f"train.max_steps={args.finetune_steps}",
                     f"experiment_dir={pruned}_finetune", *(args.set or [])]  # fmt: skip
        config = resolve_init(load_config(args.finetune_config, overrides))
        prepare(config)
        train(config)
        print(f"fine-tuned {args.finetune_steps} updates: {config.experiment_dir}/model")


def cmd_export(args: argparse.Namespace) -> None:
    from rosetta.export.ctranslate2 import export_ctranslate2

    quantization = None if args.quantization == "none" else args.quantization
    path = export_ctranslate2(args.model_dir, args.output, quantization)
    print(f"exported {args.model_dir} to {path} (CTranslate2, {args.quantization})")


def cmd_import(args: argparse.Namespace) -> None:
    from rosetta.importers.marian import import_marian

    import_marian(args.source, args.output, args.src_lang, args.tgt_lang)


def cmd_serve(args: argparse.Namespace) -> None:
    """Serves a model until SIGTERM or Ctrl-C (``rosetta.serve.server.run_server``);
    a bad limit flag is a one-line error naming it."""
    from pydantic import ValidationError

    from rosetta.serve.server import run_server

    limits = {name: getattr(args, name) for name in ServeConfig.model_fields}
    try:
        config = ServeConfig(**{k: v for k, v in limits.items() if v is not None})
    except ValidationError as error:
        problems = [f"--{e['loc'][0].replace('_', '-')}: {e['msg']}" for e in error.errors()]
        raise ConfigError("; ".join(problems)) from None
    run_server(
        args.model_dir, config, args.host, args.port, args.engine, args.device, args.threads,
        args.log_level,
    )  # fmt: skip


def cmd_plot(args: argparse.Namespace) -> None:
    """Draws the training curves of an experiment (the path written is printed)."""
    from rosetta.curves import metrics_file, plot_curves
    from rosetta.data.text import check_output
    from rosetta.plotting import png_path

    metrics = metrics_file(args.exp)
    output = png_path(args.output or metrics.parent / "curves.png")
    check_output(output, [metrics])
    print(f"wrote {plot_curves(metrics, output, args.x)}")


def cmd_data(args: argparse.Namespace) -> None:
    if args.corpus == "multi30k":
        from rosetta.data.download import download_multi30k

        paths = download_multi30k(args.dest, from_dir=args.from_dir, target=args.target)
    else:
        from rosetta.data.toy import write_corpus

        fewest, most = args.sentences
        if not 1 <= fewest <= most:
            raise ValueError(f"--sentences {fewest} {most}: expected 1 <= FEWEST <= MOST")
        paths = write_corpus(args.dest, seed=args.seed, sentences=(fewest, most))
    for split, files in paths.items():
        print(f"{split}: {', '.join(str(f) for f in files)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from rosetta.demo import run_demo

    run_demo(_config(args))


def _number(kind: type, minimum: float, inclusive: bool = True, maximum: float | None = None):
    """An argparse ``type`` that parses ``kind`` and rejects values out of range,
    so a bad option value is a usage error before anything runs."""
    low = f">= {minimum}" if inclusive else f"> {minimum}"
    opening = "[" if inclusive else "("  # the maximum is always allowed
    wanted = f"a number {low}" if maximum is None else f"a number in {opening}{minimum}, {maximum}]"
    if kind is int:
        wanted = wanted.replace("a number", "an integer")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        too_low = value < minimum if inclusive else value <= minimum
        if too_low or (maximum is not None and value > maximum) or value != value:  # NaN
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {wanted}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def BOOLEAN(text: str) -> bool:
    """An argparse ``type`` for a yes/no option: true/false, yes/no, on/off, 1/0."""
    value = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}.get(text.lower())  # fmt: skip
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value


BOOLEAN.__name__ = "bool"
POSITIVE_INT = _number(int, 1)
NON_NEGATIVE_INT = _number(int, 0)
NON_NEGATIVE_FLOAT = _number(float, 0.0)
POSITIVE_FLOAT = _number(float, 0.0, inclusive=False)
PROBABILITY = _number(float, 0.0, inclusive=False, maximum=1.0)
PORT = _number(int, 0, maximum=65535)
MASTER_PORT = _number(int, 0, inclusive=False, maximum=65535)  # 0 (any port) cannot rendezvous


def _device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine's CUDA
    devices before anything loads (``rosetta.device.resolve_device``)."""
    from rosetta.device import resolve_device

    try:
        resolve_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _add_device_option(group, key: str = "the model's decode.device, cpu unless set") -> None:
    group.add_argument(
        "--device",
        type=_device,
        help=f"auto (CUDA when there is one), cpu, cuda or cuda:N (default: {key})",
    )


def _option_type(name: str, info: Any):
    """An argparse ``type`` for search option ``name``: its pydantic type and bounds
    (``info``), so a bad value is a usage error naming them before anything runs."""
    from pydantic import TypeAdapter, ValidationError

    adapter = TypeAdapter(Annotated[info.annotation, info])

    def parse(text: str):
        try:
            return adapter.validate_python(text)
        except ValidationError as error:
            reason = error.errors()[0]["msg"].replace("Input should be", "expected")
            raise argparse.ArgumentTypeError(f"{text!r}: {reason}") from None

    parse.__name__ = info.annotation.__name__  # argparse names the type in its messages
    return parse


def _add_search_options(
    parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (), engines: bool = True
) -> None:
    """The search flags, one per option of rosetta's searches (``--beam``,
    ``--temperature``, ...: ``rosetta.decode.search.option_fields``, less
    ``exclude``), ``--search`` and ``--sample``, and the batching options; with
    ``engines``, the engine options too."""
    from rosetta.decode.search import KINDS, SEARCHES

    group = parser.add_argument_group("search (defaults: the model's decode.search section)")
    group.add_argument(
        "--search",
        choices=list(KINDS),
        help="the search (default: the model's, or the one the options given need)",
    )
    group.add_argument(
        "--sample", action="store_true", help="draw from the model instead of searching"
    )
    seen = set(exclude)
    for search in SEARCHES:
        for name, info in search.Options.model_fields.items():
            if name == "kind" or name in seen:
                continue
            seen.add(name)
            said = {
                reader.kind(): reader.Options.model_fields[name].description
                for reader in SEARCHES
                if name in reader.reads()
            }
            if len(set(said.values())) == 1:
                text = f"{info.description} ({', '.join(said)})"
            else:
                text = "; ".join(f"{kind}: {text}" for kind, text in said.items())
            group.add_argument(
                "--" + name.replace("_", "-"),
                type=_option_type(name, info),
                help=f"{text} (default: the model's)",
            )
    group.add_argument("--batch-size", type=POSITIVE_INT, help="max sentences per batch")
    group.add_argument("--max-tokens", type=POSITIVE_INT, help="max padded source tokens per batch")
    if not engines:
        return
    group = parser.add_argument_group("engine")
    _add_device_option(group)
    group.add_argument(
        "--engine",
        choices=["torch", "ctranslate2"],
        default="torch",
        help="torch: rosetta's own search (default); ctranslate2: MODEL_DIR is a "
        "`rosetta export` folder",
    )
    group.add_argument(
        "--quantize",
        choices=["none", "int8"],
        help="PyTorch dynamic int8 for the linear layers (torch engine, CPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rosetta", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help_text: str, description: str):
        return verbs.add_parser(name, help=help_text, description=description)

    def with_config(
        name: str, help_text: str, config_required: bool = True, description: str | None = None
    ):
        sub = verb(name, help_text, description or help_text)
        if config_required:
            sub.add_argument("config", help="experiment YAML file")
        else:
            sub.add_argument(
                "--config", help="experiment YAML (default: the toy task's, shipped with rosetta)"
            )
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
    sub.add_argument(
        "--init",
        metavar="MODEL_DIR",
        help="start from a model directory (fine-tuning): its tokenizer, architecture "
        "and weights; the same as the config's init key",
    )
    _add_device_option(sub, "the config's train.device, auto unless set")
    group = sub.add_argument_group(
        "several processes (PyTorch DDP through torchrun; README: Training on several processes)"
    )
    group.add_argument(
        "--nproc-per-node",
        type=POSITIVE_INT,
        metavar="N",
        help="train as N processes on this machine (one per GPU, or CPU processes)",
    )
    group.add_argument(
        "--nnodes", type=POSITIVE_INT, default=1, metavar="M", help="machines (default 1)"
    )
    group.add_argument(
        "--node-rank",
        type=NON_NEGATIVE_INT,
        default=0,
        metavar="R",
        help="this machine's index, 0 to M-1 (default 0)",
    )
    group.add_argument(
        "--master-addr",
        default="127.0.0.1",
        metavar="HOST",
        help="address of the machine with node rank 0 (default 127.0.0.1)",
    )
    group.add_argument(
        "--master-port",
        type=MASTER_PORT,
        default=29500,
        metavar="PORT",
        help="its rendezvous port (default 29500)",
    )
    sub.set_defaults(func=cmd_train)

    model_dir_help = "a model directory (EXP/model), or a `rosetta export` folder"
    sub = verb(
        "translate",
        "translate text with a model directory",
        "Translate UTF-8 text, one sentence per line: N lines in, N lines out (a blank "
        "line gives a blank line). A line longer than the model's positions is split "
        "into sentences (and over-long sentences at word boundaries), translated and "
        "joined back. With -o, the output appears only once all of it is written.",
    )
    sub.add_argument("model_dir", help=model_dir_help)
    source = sub.add_mutually_exclusive_group()
    source.add_argument("-i", "--input", help="input file (default: stdin)")
    source.add_argument(
        "--interactive", action="store_true", help="translate each line as it is typed"
    )
    sub.add_argument("-o", "--output", help="output file (default: stdout); not the input")
    sub.add_argument(
        "--constraints",
        help="lexical constraints: one JSON list of target phrases per input line, e.g. "
        '["Hund", ["Katze", "Kater"]] (a list: one of them); beam search only',
    )
    sub.add_argument(
        "--glossary",
        help="a TSV of 'source term<TAB>target term[<TAB>another]': a term found in a "
        "line (whole words, case-folded, leftmost-longest) makes its target a constraint",
    )
    _add_search_options(sub)
    sub.set_defaults(func=cmd_translate)

    sub = verb(
        "evaluate",
        "translate a test set and score it with sacreBLEU",
        "Translate --src and score it against --ref with sacreBLEU BLEU and chrF "
        "(cased, detokenised, 13a); both files must have the same number of lines.",
    )
    sub.add_argument("model_dir", help=model_dir_help)
    sub.add_argument("--src", required=True, help="source file, one sentence per line")
    sub.add_argument("--ref", required=True, help="reference file, one sentence per line")
    sub.add_argument("-o", "--output", type=Path, help="also write the translations here")
    sub.add_argument("--json", help="also write the scores and signatures to this JSON file")
    _add_search_options(sub, exclude=("nbest",))
    sub.set_defaults(func=cmd_evaluate)

    sub = with_config("average", "average the last N checkpoints into the model directory")
    sub.add_argument("--last", type=POSITIVE_INT, default=5, help="how many (default 5)")
    sub.add_argument("-o", "--output", help="model directory to write (default EXP/model)")
    sub.set_defaults(func=cmd_average)

    sub = verb(
        "distill",
        "translate a corpus' training sources with a teacher (sequence-level distillation)",
        "Translate the training sources of CONFIG's corpus with the teacher "
        "model's search into a corpus folder (train/valid/test; valid and test keep their "
        "real references) that a student configuration names as data.root: the standard "
        "training set of a non-autoregressive model. Progress is kept: a stopped run "
        "resumes after its last complete line.",
    )
    sub.add_argument("teacher", help="the teacher's model directory (EXP/model)")
    sub.add_argument("config", help="the experiment YAML whose training set to distill")
    sub.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a key, e.g. data.root=..."
    )
    sub.add_argument("-o", "--output", type=Path, help="corpus folder (default EXP/distilled)")
    _add_search_options(sub, exclude=("nbest",), engines=False)  # the teacher's search
    _add_device_option(sub)
    sub.set_defaults(func=cmd_distill)

    sub = verb(
        "heads",
        "what each attention head does, how much it matters, and pruning",
        "Over a test set: each head's figures and role, its importance (BLEU and NLL "
        "without it; the gradient proxy of Michel et al.), and BLEU as heads are removed "
        "least important first (masking, gradient and a random order). Writes heads.json, "
        "heads.png and heads_pruning.png; with --prune N or --keep-bleu-drop X, also a "
        "model directory with those heads cut out of the weights.",
    )
    sub.add_argument("model_dir", help="a model directory (EXP/model)")
    sub.add_argument("--src", required=True, help="test sources, one sentence per line")
    sub.add_argument("--ref", required=True, help="their references")
    sub.add_argument("--valid-src", help="sources importance is measured on (default --src)")
    sub.add_argument("--valid-ref", help="their references")
    sub.add_argument("-o", "--output", help="folder for the report (default: the model directory)")
    sub.add_argument(
        "--steps", type=POSITIVE_INT, default=8, help="points of the curve (default 8)"
    )
    sub.add_argument(
        "--order-seed", type=int, default=1, help="seed of the random order (default 1)"
    )
    sub.add_argument(
        "--no-masking-bleu",
        action="store_true",
        help="skip BLEU without each head (one translation of the set per head)",
    )
    prune = sub.add_mutually_exclusive_group()
    prune.add_argument("--prune", type=POSITIVE_INT, metavar="N", help="remove N heads")
    prune.add_argument(
        "--keep-bleu-drop",
        type=_number(float, 0.0),
        metavar="X",
        help="remove the most heads the curve shows cost at most X BLEU",
    )
    sub.add_argument(
        "--order",
        choices=["masking", "gradient"],
        default="masking",
        help="which importance chooses the heads to remove (default masking)",
    )
    sub.add_argument("--pruned-model", type=Path, help="the pruned model directory to write")
    sub.add_argument(
        "--finetune-steps",
        type=POSITIVE_INT,
        metavar="N",
        help="then fine-tune the pruned model N updates (into PRUNED_finetune)",
    )
    sub.add_argument("--finetune-config", help="the experiment YAML whose data fine-tunes it")
    sub.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a key of --finetune-config"
    )
    _add_search_options(sub, exclude=("nbest",), engines=False)
    _add_device_option(sub)
    sub.set_defaults(func=cmd_heads)

    sub = verb(
        "attention",
        "heat map of what the model attended to",
        "Translate one sentence and draw its attention: source subwords across, "
        "generated subwords down (PNG), or write the matrices as JSON.",
    )
    sub.add_argument("model_dir", help="a model directory (EXP/model)")
    sub.add_argument("--src", required=True, help="the source sentence")
    sub.add_argument(
        "--kind",
        choices=["cross", "encoder_self", "decoder_self"],
        default="cross",
        help="which attention (default cross: generated words over source words)",
    )
    sub.add_argument("--layer", type=int, default=-1, help="layer index (default: the last)")
    heads = sub.add_mutually_exclusive_group()
    heads.add_argument("--head", type=int, help="one head (default: the mean over heads)")
    heads.add_argument("--all-heads", action="store_true", help="one panel per head")
    sub.add_argument(
        "-o",
        "--output",
        help="file to write: a PNG (a name without a suffix gets .png) or, with "
        "--format json, JSON (default for JSON: stdout)",
    )
    sub.add_argument(
        "--format", choices=["png", "json"], default="png", help="png (default) or json"
    )
    _add_search_options(sub, exclude=("nbest",), engines=False)
    _add_device_option(sub)
    sub.set_defaults(func=cmd_attention)

    sub = verb(
        "export",
        "convert a model directory for an inference engine",
        "Convert a Transformer model directory to CTranslate2 (with the SentencePiece "
        "model and configuration), for `rosetta translate OUT --engine ctranslate2`.",
    )
    sub.add_argument("model_dir", help="a model directory (EXP/model)")
    sub.add_argument("output", help="folder to write")
    sub.add_argument(
        "--format", choices=["ctranslate2"], default="ctranslate2", help="target engine"
    )
    sub.add_argument(
        "--quantization",
        choices=["none", "int8", "int8_float32", "int16"],
        default="none",
        help="weight type of the exported model (default none: float32)",
    )
    sub.set_defaults(func=cmd_export)

    sub = verb(
        "import",
        "convert a model made elsewhere into a model directory",
        "Convert an OPUS-MT (Marian) model in HuggingFace's layout (config.json, "
        "model.safetensors or pytorch_model.bin, source.spm, target.spm, vocab.json) into "
        "a rosetta model directory that computes the same: translate, evaluate, serve, "
        "export and fine-tune it (train --init) like any other.",
    )
    sub.add_argument("format", choices=["marian"], help="what SOURCE is")
    sub.add_argument(
        "source", help="a local folder, or a hub name (e.g. Helsinki-NLP/opus-mt-en-de)"
    )
    sub.add_argument("-o", "--output", required=True, help="the model directory to write")
    sub.add_argument("--src-lang", default="src", help="the source language code (data.src_lang)")
    sub.add_argument("--tgt-lang", default="tgt", help="the target language code (data.tgt_lang)")
    sub.set_defaults(func=cmd_import)

    sub = verb(
        "serve",
        "serve a model over HTTP, with a web page",
        "Serve MODEL_DIR: a JSON API (/v1/translate, /v1/model), LibreTranslate's API "
        "(/translate, /languages), /health and /ready, the OpenAPI docs (/docs) and a "
        "page (/) that shows the translation's attention and search. Concurrent requests "
        "are batched together; SIGTERM finishes the queued requests, then exits.",
    )
    sub.add_argument("model_dir", help="a model directory, or a `rosetta export` folder")
    sub.add_argument(
        "--engine",
        choices=["torch", "ctranslate2"],
        default="torch",
        help="torch: rosetta's own search, with attention and search views (default); "
        "ctranslate2: MODEL_DIR is a `rosetta export` folder",
    )
    _add_device_option(sub)
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    sub.add_argument("--port", type=PORT, default=8000, help="port (8000; 0: any free port)")
    sub.add_argument("--threads", type=POSITIVE_INT, help="CPU threads of the model")
    sub.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="info",
        help="uvicorn's log level (info: one line per request)",
    )
    group = sub.add_argument_group("batching and limits")
    for name, field in ServeConfig.model_fields.items():
        kind = {float: float, bool: BOOLEAN, str: str}.get(field.annotation, int)
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            help=f"{field.description} (default {field.default})",
        )
    sub.set_defaults(func=cmd_serve)

    sub = verb(
        "plot",
        "training curves from an experiment's metrics.jsonl",
        "Draw training loss and NLL with validation NLL, validation BLEU, the learning "
        "rate and target tokens/s from EXP/metrics.jsonl as a PNG.",
    )
    sub.add_argument("exp", help="an experiment directory or a metrics.jsonl file")
    sub.add_argument(
        "-o",
        "--output",
        help="PNG to write (default EXP/curves.png; a name without a suffix gets .png)",
    )
    sub.add_argument(
        "--x",
        choices=["step", "time"],
        default="step",
        help="x axis: step (default) or time (minutes of training)",
    )
    sub.set_defaults(func=cmd_plot)

    sub = verb(
        "data",
        "get a corpus",
        "Download Multi30k English with German, French or Czech (or copy it from a local "
        "folder with --from), or "
        "write the built-in toy corpus.",
    )
    sub.add_argument("corpus", choices=["multi30k", "toy"], help="which corpus")
    sub.add_argument("dest", help="folder to write the corpus to")
    sub.add_argument("--from", dest="from_dir", help="copy Multi30k from a local folder")
    sub.add_argument(
        "--target",
        choices=["de", "fr", "cs"],
        default="de",
        help="Multi30k: the language beside English (default de)",
    )
    sub.add_argument("--seed", type=int, default=1, help="toy corpus seed")
    sub.add_argument(
        "--sentences",
        nargs=2,
        type=POSITIVE_INT,
        default=(1, 1),
        metavar=("FEWEST", "MOST"),
        help="toy: consecutive sentences per line, e.g. 25 250 for the long-input task "
        "(default 1 1)",
    )
    sub.set_defaults(func=cmd_data)

    sub = with_config(
        "demo",
        "train on the toy task, report BLEU, translate",
        False,
        "Generate the toy corpus, train a small Transformer on it, translate the test "
        "split with beam search and report BLEU; works from any directory.",
    )
    sub.add_argument("--max-time", help="wall-clock training budget, e.g. 3m")
    sub.set_defaults(func=cmd_demo)
    return parser


def _describe(error: OSError) -> str:
    """One line for an operating-system error: the path, then the reason."""
    reason = error.strerror or str(error)
    return f"{error.filename}: {reason}" if error.filename else reason


def main(argv: Sequence[str] | None = None) -> int:
    from rosetta.data.download import DownloadError
    from rosetta.safeio import DirectoryBusy
    from rosetta.train.checkpoint import CheckpointError
    from rosetta.train.distributed import DistributedError
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
        DistributedError,
        DirectoryBusy,
    ) as error:
        print(f"rosetta {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine said no: a read-only place, a full disk, ...
        print(f"rosetta {args.verb}: error: {_describe(error)}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process stopped alike
            print(f"rosetta {args.verb}: {stop}; continue with --resume", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
