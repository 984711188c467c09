"""Speed of rosetta against HuggingFace MarianMT and CTranslate2, in one run.

    python benchmarks/speed.py --preset small [--threads 2] [--repeats 3]

All systems get random weights of the same shape (nothing is downloaded): a
rosetta Transformer of the preset, a ``MarianMTModel`` built from a
``MarianConfig`` of the same shape, the HF model converted to CTranslate2 with
CTranslate2's own Marian loader, and rosetta's own CTranslate2 export. Systems
alternate inside every repeat, after a warm-up, and medians are reported.
CTranslate2 runs in a process of its own (``CTranslate2Process`` says why).

* training: target tokens/s (real and padded) with Adam steps on real Multi30k
  batches, each system with its own batching under the same token budget
  (rosetta: length-bucketed; HF: random order, as its default sampler);
* decoding: greedy and beam 5 at batch 32 and batch 1, with the output length
  forced equal for everyone (<eos> suppressed, exactly --new-tokens tokens);
* the machine's fp32 GEMM rate, measured in the same run, and each figure's
  fraction of the ideal rate given the FLOPs per token.

Peers are benchmark-only dependencies: pip install transformers ctranslate2.

    python benchmarks/speed.py --batching MODEL_DIR [--repeats 3] [--threads 2]

compares instead, on a trained model, offline continuous batching (the
``Engine`` fed from a length-sorted queue: a finished sentence's place is taken
at the next step) with static batches (length-sorted, each decoded until its
last sentence ends; finished sentences leave it), at the same budget
(``decode.batch_size`` sentences, ``decode.max_tokens`` padded source tokens),
greedy and beam 5, alternating inside every repeat: on test2016 (outputs of
mixed lengths, where continuous batching can help) and on the same sources with
every output forced to ``--new-tokens`` tokens (equal lengths: it cannot help,
and should cost nothing). Writes benchmarks/results/speed_batching.{json,md}.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from results_io import write_results
from rosetta.config import MODEL_PRESETS, ExperimentConfig, TransformerConfig, load_config
from rosetta.data.batching import collate, make_batches
from rosetta.data.prepare import load_split, prepare
from rosetta.data.tokenizer import PAD_ID, Tokenizer
from rosetta.decode import beam_search, greedy_search
from rosetta.decode.common import Lengths
from rosetta.decode.translator import pad_batch
from rosetta.export.ctranslate2 import export_ctranslate2
from rosetta.model import build_model
from rosetta.modeldir import save_model_dir
from rosetta.train.objectives import TeacherForcing

VOCAB = 8000
MAX_TOKENS = 4096


# ---- the machine ---------------------------------------------------------------------
def gemm_gflops(size: int = 2048, repeats: int = 7) -> float:
    """Median fp32 matrix-multiply rate with the current torch threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def parameter_counts(cfg: TransformerConfig) -> dict[str, int]:
    """Weights touched per token: encoder layer, decoder layer (self + cross Q/O + FFN),
    cross-attention K/V (per source token), output projection."""
    d, ff = cfg.d_model, cfg.d_ff
    attention, ffn = 4 * d * d, 2 * d * ff
    return {
        "encoder": cfg.encoder_layers * (attention + ffn),
        "decoder": cfg.decoder_layers * (attention + 2 * d * d + ffn),
        "cross_kv": cfg.decoder_layers * 2 * d * d,
        "output": d * VOCAB,
    }


def train_flops_per_target_token(cfg: TransformerConfig, src_per_tgt: float) -> float:
    p = parameter_counts(cfg)
    per_source = p["encoder"] + p["cross_kv"]
    return 6 * (p["decoder"] + p["output"] + per_source * src_per_tgt)


def decode_flops_per_token(cfg: TransformerConfig) -> float:
    p = parameter_counts(cfg)
    return 2 * (p["decoder"] + p["output"])


# ---- the systems ---------------------------------------------------------------------
def marian(cfg: TransformerConfig):
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(
        vocab_size=VOCAB,
        d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.heads,
        decoder_attention_heads=cfg.heads,
        encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff,
        max_position_embeddings=512,
        activation_function="relu",
        dropout=0.1,
        attention_dropout=0.0,
        activation_dropout=0.0,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        # Marian's conventions: </s> = 0, <unk> = 1, <pad> = the last id
        eos_token_id=0,
        decoder_start_token_id=VOCAB - 1,
        pad_token_id=VOCAB - 1,
        forced_eos_token_id=None,
    )
    return MarianMTModel(config)


class _Vocabulary:
    """The little of a tokenizer that CTranslate2's Marian loader reads."""

    eos_token, unk_token, bos_token = "</s>", "<unk>", "<s>"

    def get_vocab(self) -> dict[str, int]:
        names = ["</s>", "<unk>"] + [f"t{i}" for i in range(2, VOCAB - 1)] + ["<pad>"]
        return {name: i for i, name in enumerate(names)}


def marian_to_ctranslate2(model, directory: Path) -> Path:
    from ctranslate2.converters.transformers import MarianMTLoader

    spec = MarianMTLoader()(model, _Vocabulary())
    spec.validate()
    spec.optimize(quantization=None)
    directory.mkdir(parents=True, exist_ok=True)
    spec.save(str(directory))
    return directory


# ---- training ------------------------------------------------------------------------
def rosetta_train_step(model, optimizer) -> Callable:
    objective = TeacherForcing(0.1)

    def step(batch) -> None:
        loss = objective.loss(model, batch, 0)["loss"]
        (loss / batch.num_tgt_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def hf_train_step(model, optimizer) -> Callable:
    def step(batch) -> None:
        # HF conventions: labels -100 on padding, decoder input starts with the start id
        labels = batch.tgt_out.masked_fill(batch.tgt_out.eq(PAD_ID), -100)
        decoder_input = batch.tgt_in.masked_fill(batch.tgt_in.eq(PAD_ID), VOCAB - 1)
        decoder_input[:, 0] = VOCAB - 1
        logits = model(
            input_ids=batch.src.masked_fill(batch.src.eq(PAD_ID), VOCAB - 1),
            attention_mask=batch.src.ne(PAD_ID),
            decoder_input_ids=decoder_input,
            decoder_attention_mask=batch.tgt_in.ne(PAD_ID),
        ).logits
        loss = F.cross_entropy(
            logits.view(-1, VOCAB), labels.view(-1), ignore_index=-100, label_smoothing=0.1
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_training(step, split, batches, warmup: int, steps: int) -> dict[str, float]:
    for indices in batches[:warmup]:
        step(collate(split, indices))
    real = padded = 0
    elapsed = 0.0
    for indices in batches[warmup : warmup + steps]:
        batch = collate(split, indices)
        start = time.perf_counter()
        step(batch)
        elapsed += time.perf_counter() - start
        real += batch.num_tgt_tokens
        padded += batch.tgt_out.numel()
    return {"real": real / elapsed, "padded": padded / elapsed}


# ---- decoding ----------------------------------------------------------------------
# A timer decodes a list of calls (each a list of id sequences) with exactly
# ``new_tokens`` outputs per sentence and returns the seconds it took.
Timer = Callable[[list[list[list[int]]], int], float]


def in_process(run: Callable) -> Timer:
    def timed(calls, beam) -> float:
        start = time.perf_counter()
        for seqs in calls:
            run(seqs, beam)
        return time.perf_counter() - start

    return timed


def rosetta_runner(model, new_tokens: int) -> Callable:
    def run(seqs, beam):
        src = pad_batch(seqs)
        lengths = Lengths(a=0.0, b=new_tokens + 1, min_len=new_tokens)
        if beam == 1:  # tokens only, like HF's generate and CTranslate2 by default
            return greedy_search(model, src, lengths, with_scores=False)
        return beam_search(model, src, beam=beam, lengths=lengths)

    return run


def hf_runner(model, new_tokens: int) -> Callable:
    @torch.inference_mode()
    def run(seqs, beam):
        src = pad_batch(seqs, value=VOCAB - 1)
        return model.generate(
            input_ids=src,
            attention_mask=src.ne(VOCAB - 1),
            num_beams=beam,
            do_sample=False,
            min_new_tokens=new_tokens,
            max_new_tokens=new_tokens,
            early_stopping=False,
        )

    return run


def hf_pieces() -> list[str]:
    """Id -> piece for CTranslate2 converted from HF."""
    names = _Vocabulary().get_vocab()
    return sorted(names, key=names.get)


def _serve_ctranslate2(connection, engines: dict, threads: int, new_tokens: int) -> None:
    """The CTranslate2 process: loads the engines, then times each request."""
    import ctranslate2

    loaded = {
        name: (
            ctranslate2.Translator(path, device="cpu", inter_threads=1, intra_threads=threads),
            pieces,
        )
        for name, (path, pieces) in engines.items()
    }
    while (request := connection.recv()) is not None:
        name, calls, beam = request
        engine, pieces = loaded[name]
        start = time.perf_counter()
        for seqs in calls:
            engine.translate_batch(
                [[pieces[i] for i in seq] for seq in seqs],
                beam_size=beam,
                min_decoding_length=new_tokens,
                max_decoding_length=new_tokens,
                max_batch_size=len(seqs),
            )
        connection.send(time.perf_counter() - start)


class CTranslate2Process:
    """CTranslate2 engines in a process of their own, each request timed there.

    CTranslate2 ships its own OpenMP runtime (a second libgomp). Once it has run
    in a process, PyTorch's parallel regions in that process run slower: on the
    2-core machine a pair of half-width GEMVs in one ``bmm`` took 220 instead of
    149 us, and rosetta's batch-1 greedy search 3.62 instead of 3.29 ms per token
    (HF's 7.92 instead of 7.76). In one process, the peer would slow the others.
    """

    def __init__(self, engines: dict[str, tuple[Path, list[str]]], threads: int, new_tokens: int):
        """engines: name -> (model directory, id -> source piece)."""
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        engines = {name: (str(path), pieces) for name, (path, pieces) in engines.items()}
        self._process = context.Process(
            target=_serve_ctranslate2, args=(child, engines, threads, new_tokens), daemon=True
        )
        self._process.start()

    def timer(self, name: str) -> Timer:
        def timed(calls, beam) -> float:
            self._connection.send((name, calls, beam))
            return self._connection.recv()

        return timed

    def close(self) -> None:
        self._connection.send(None)
        self._process.join()


# ---- shared by the speed scripts -----------------------------------------------------
def arguments(description: str, repeats: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=["toy", "small", "base"], default="small")
    parser.add_argument("--config", default="configs/multi30k_en_de.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--new-tokens", type=int, default=32)
    return parser


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def prepared(args: argparse.Namespace) -> tuple[ExperimentConfig, TransformerConfig]:
    """Sets threads and seed, prepares the Multi30k data (tokenizer and splits, once)
    and returns its configuration and the preset's model configuration."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = load_config(args.config, ["experiment_dir=experiments/speed_data"])
    prepare(config, log=lambda _: None)
    return config, TransformerConfig(**MODEL_PRESETS[args.preset], max_positions=512)


# ---- continuous against static batching ----------------------------------------------
TEST_SOURCES = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k" / "test2016.en"


def batching(args: argparse.Namespace) -> None:
    """Offline continuous batching against static batches on a trained model."""
    from rosetta.decode.engine import queue_all
    from rosetta.decode.translator import TorchTranslator

    torch.set_num_threads(args.threads)
    translator = TorchTranslator.from_model_dir(args.batching)
    model, opts = translator.model, translator.options
    sentences = TEST_SOURCES.read_text(encoding="utf-8").splitlines()
    sources = [source.ids for source in translator.encode(sentences)]
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    queue = [sources[i] for i in order]
    sizes = torch.tensor([len(ids) for ids in sources]).numpy()
    n = args.new_tokens
    sets = {
        "test2016": Lengths.of(opts, translator.max_source_len),
        f"equal ({n} tokens)": Lengths(0.0, n + 1, translator.max_source_len, min_len=n),
    }
    searches = {
        "greedy": translator.with_options(search="greedy").search,
        "beam 5": translator.with_options(search="beam", beam=5).search,
    }

    def continuous(search, lengths) -> int:
        engine = search.engine(model, lengths, scores=False, max_sentences=opts.batch_size,
                               max_tokens=opts.max_tokens)  # fmt: skip
        found = queue_all(engine, queue)
        return sum(len(f.hypotheses[0].tokens) + 1 for f in found)

    def static(search, lengths) -> int:
        tokens = 0
        for rows in make_batches(sizes, sizes, opts.max_tokens, max_sentences=opts.batch_size):
            src = pad_batch([sources[i] for i in rows])
            found = search.run(model, src, lengths, scores=False)
            tokens += sum(len(f.hypotheses[0].tokens) + 1 for f in found)
        return tokens

    runs: dict[tuple[str, str, str], list[float]] = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for set_name, lengths in sets.items():
                for search_name, search in searches.items():
                    for way, run in (("continuous", continuous), ("static", static)):
                        start = time.perf_counter()
                        run(search, lengths)
                        seconds = time.perf_counter() - start
                        runs.setdefault((set_name, search_name, way), []).append(
                            len(sources) / seconds
                        )
                        print(f"{set_name}, {search_name}, {way}: "
                              f"{len(sources) / seconds:.1f} sentences/s", flush=True)  # fmt: skip
    rows = []
    for set_name in sets:
        for search_name in searches:
            cont = statistics.median(runs[(set_name, search_name, "continuous")])
            stat = statistics.median(runs[(set_name, search_name, "static")])
            rows.append({"set": set_name, "search": search_name, "continuous": cont,
                         "static": stat, "ratio": cont / stat})  # fmt: skip
    bars = {}
    for row in rows:
        floor = 1.15 if row["set"] == "test2016" else 0.97
        bars[f"{row['set']}, {row['search']}: continuous >= {floor}x static "
             f"({row['ratio']:.2f}x)"] = row["ratio"] >= floor  # fmt: skip
    results = {
        "command": command_line(),
        "model": str(args.batching),
        "threads": args.threads,
        "repeats": args.repeats,
        "gemm_gflops": gemm_gflops(),
        "batch_size": opts.batch_size,
        "max_tokens": opts.max_tokens,
        "rows": rows,
        "bars": bars,
    }
    lines = [
        f"`{results['command']}`",
        "",
        f"{len(sources)} test2016 sources, {args.threads} threads, at most {opts.batch_size} "
        f"sentences and {opts.max_tokens} padded source tokens at once, medians of "
        f"{args.repeats} alternating repeats; fp32 GEMM {results['gemm_gflops']:.0f} GFLOP/s",
        "",
        "| outputs | search | continuous sentences/s | static sentences/s | continuous / static |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['set']} | {row['search']} | {row['continuous']:.1f} | {row['static']:.1f} "
            f"| {row['ratio']:.2f} |"
        )
    lines.append("")
    lines += [f"- {'PASS' if ok else 'FAIL'} {name}" for name, ok in bars.items()]
    write_results("speed_batching", results, "\n".join(lines) + "\n")


def main() -> None:
    parser = arguments(__doc__.split("\n")[0], repeats=3)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--batching", type=Path, help="a trained model directory: see above")
    args = parser.parse_args()
    if args.batching:
        return batching(args)
    command = command_line()
    config, cfg = prepared(args)
    split = load_split(config, "train")
    tokenizer = Tokenizer.load(config.experiment_dir / "tokenizer")
    work = Path(tempfile.mkdtemp(prefix="rosetta-speed-"))

    rosetta_model = build_model(cfg, VOCAB, VOCAB)
    hf_model = marian(cfg)
    results: dict = {"command": command, "preset": args.preset, "threads": args.threads}

    # training
    runs: dict[str, list[dict]] = {"rosetta": [], "hf": []}
    for repeat in range(args.repeats):
        rosetta_model.train()
        hf_model.train()
        for name, model, batches, make_step in (
            (
                "rosetta",
                rosetta_model,
                make_batches(split.src_lengths, split.tgt_lengths, MAX_TOKENS, seed=repeat),
                rosetta_train_step,
            ),
            (
                "hf",
                hf_model,
                make_batches(
                    split.src_lengths, split.tgt_lengths, MAX_TOKENS, seed=repeat, bucket=False
                ),
                hf_train_step,
            ),
        ):
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), fused=True)
            runs[name].append(
                time_training(make_step(model, optimizer), split, batches, 2, args.train_steps)
            )
    gemm = gemm_gflops()
    src_per_tgt = float(split.src_lengths.sum() / split.tgt_lengths.sum())
    flops = train_flops_per_target_token(cfg, src_per_tgt)
    results["gemm_gflops"] = gemm
    results["training"] = {
        name: {
            "real_tokens_per_s": statistics.median(r["real"] for r in rs),
            "padded_tokens_per_s": statistics.median(r["padded"] for r in rs),
            "fraction_of_gemm_peak": statistics.median(r["real"] for r in rs)
            * flops
            / (gemm * 1e9),
        }
        for name, rs in runs.items()
    }

    # decoding
    rosetta_model.prepare_for_inference()
    hf_model.eval()
    model_dir = save_model_dir(
        work / "rosetta",
        config.model_copy(update={"model": cfg}),
        config.experiment_dir / "tokenizer",
        rosetta_model,
        {},
    )
    ct2 = CTranslate2Process(
        {
            "ct2_from_hf": (marian_to_ctranslate2(hf_model, work / "hf_ct2"), hf_pieces()),
            "rosetta_ct2": (
                export_ctranslate2(model_dir, work / "rosetta_ct2"),
                tokenizer.source_pieces(range(tokenizer.src_vocab_size)),
            ),
        },
        args.threads,
        args.new_tokens,
    )
    timers = {
        "rosetta": in_process(rosetta_runner(rosetta_model, args.new_tokens)),
        "hf": in_process(hf_runner(hf_model, args.new_tokens)),
        "ct2_from_hf": ct2.timer("ct2_from_hf"),
        "rosetta_ct2": ct2.timer("rosetta_ct2"),
    }
    test = load_split(config, "test")
    sources = [test.source(i).tolist() for i in range(64)]
    settings = {"greedy_b32": (1, 32), "greedy_b1": (1, 1), "beam5_b32": (5, 32)}
    decoding: dict[str, dict[str, list[float]]] = {s: {n: [] for n in timers} for s in settings}
    for _ in range(args.repeats + 1):  # the first round is the warm-up
        for setting, (beam, batch) in settings.items():
            # batch 1: the first 8 sentences one at a time
            calls = [sources[:batch]] if batch > 1 else [[seq] for seq in sources[:8]]
            tokens = sum(len(seqs) for seqs in calls) * args.new_tokens
            for name, timed in timers.items():
                decoding[setting][name].append(tokens / timed(calls, beam))
    ct2.close()
    decode_flops = decode_flops_per_token(cfg)
    results["decoding"] = {
        setting: {
            name: {
                "tokens_per_s": statistics.median(rates[1:]),
                "fraction_of_gemm_peak": statistics.median(rates[1:]) * decode_flops / (gemm * 1e9),
            }
            for name, rates in by_system.items()
        }
        for setting, by_system in decoding.items()
    }
    report(results)


def report(results: dict) -> None:
    training, decoding = results["training"], results["decoding"]
    lines = [
        f"`{results['command']}`",
        "",
        f"{results['preset']} preset, {results['threads']} threads, fp32 GEMM "
        f"{results['gemm_gflops']:.0f} GFLOP/s in this run",
        "",
        "| measure | rosetta | HF Marian | CTranslate2 (from HF) | rosetta via CTranslate2 "
        "| rosetta / HF | rosetta / CT2 | rosetta-CT2 / CT2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    r, h = training["rosetta"], training["hf"]
    lines.append(
        f"| training, real target tokens/s | {r['real_tokens_per_s']:,.0f} "
        f"({r['fraction_of_gemm_peak']:.2f} of peak) | {h['real_tokens_per_s']:,.0f} "
        f"({h['fraction_of_gemm_peak']:.2f}) | — | — | "
        f"{r['real_tokens_per_s'] / h['real_tokens_per_s']:.2f}x | — | — |"
    )
    for setting, systems in decoding.items():
        ro, hf = systems["rosetta"]["tokens_per_s"], systems["hf"]["tokens_per_s"]
        ct, rc = systems["ct2_from_hf"]["tokens_per_s"], systems["rosetta_ct2"]["tokens_per_s"]
        lines.append(
            f"| {setting.replace('_', ', ')} tokens/s | {ro:,.0f} | {hf:,.0f} | {ct:,.0f} | "
            f"{rc:,.0f} | {ro / hf:.2f}x | {ro / ct:.2f}x | {rc / ct:.2f}x |"
        )
    write_results(f"speed_{results['preset']}", results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
