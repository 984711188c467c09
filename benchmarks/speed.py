"""Speed of rosetta against HuggingFace MarianMT and CTranslate2, in one run.

    python benchmarks/speed.py --preset small [--threads 2] [--repeats 3]

All systems get random weights of the same shape (nothing is downloaded): a
rosetta Transformer of the preset, a ``MarianMTModel`` built from a
``MarianConfig`` of the same shape, the HF model converted to CTranslate2 with
CTranslate2's own Marian loader, and rosetta's own CTranslate2 export. Systems
alternate inside every repeat, after a warm-up, and medians are reported.

* training: target tokens/s (real and padded) with Adam steps on real Multi30k
  batches, each system with its own batching under the same token budget
  (rosetta: length-bucketed; HF: random order, as its default sampler);
* decoding: greedy and beam 5 at batch 32 and batch 1, with the output length
  forced equal for everyone (<eos> suppressed, exactly --new-tokens tokens);
* the machine's fp32 GEMM rate, measured in the same run, and each figure's
  fraction of the ideal rate given the FLOPs per token.

Peers are benchmark-only dependencies: pip install transformers ctranslate2.
"""

from __future__ import annotations

import argparse
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
from rosetta.config import MODEL_PRESETS, ModelConfig, load_config
from rosetta.data.batching import collate, make_batches
from rosetta.data.prepare import load_split, prepare
from rosetta.data.tokenizer import PAD_ID, Tokenizer
from rosetta.decode import beam_search, greedy_search
from rosetta.decode.translator import pad_batch
from rosetta.export.ctranslate2 import export_ctranslate2
from rosetta.model import build_model
from rosetta.modeldir import save_model_dir
from rosetta.train.loss import label_smoothed_nll

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


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
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


def train_flops_per_target_token(cfg: ModelConfig, src_per_tgt: float) -> float:
    p = parameter_counts(cfg)
    per_source = p["encoder"] + p["cross_kv"]
    return 6 * (p["decoder"] + p["output"] + per_source * src_per_tgt)


def decode_flops_per_token(cfg: ModelConfig) -> float:
    p = parameter_counts(cfg)
    return 2 * (p["decoder"] + p["output"])


# ---- the systems ---------------------------------------------------------------------
def marian(cfg: ModelConfig):
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
    def step(batch) -> None:
        real = batch.tgt_out.ne(PAD_ID)
        loss, _ = label_smoothed_nll(
            model(batch.src, batch.tgt_in, label_mask=real), batch.tgt_out[real], 0.1
        )
        (loss / int(real.sum())).backward()
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


# ---- decoding ------------------------------------------------------------------------
def decode_runners(rosetta_model, hf_model, ct2_hf, ct2_rosetta, tokenizer, new_tokens):
    """Callables decoding a list of id sequences with exactly ``new_tokens`` outputs."""

    def rosetta_run(seqs, beam):
        src = pad_batch(seqs)
        common = dict(max_len_a=0.0, max_len_b=new_tokens + 1, min_len=new_tokens)
        if beam == 1:
            return greedy_search(rosetta_model, src, **common)
        return beam_search(rosetta_model, src, beam=beam, **common)

    @torch.inference_mode()
    def hf_run(seqs, beam):
        src = pad_batch(seqs, value=VOCAB - 1)
        return hf_model.generate(
            input_ids=src,
            attention_mask=src.ne(VOCAB - 1),
            num_beams=beam,
            do_sample=False,
            min_new_tokens=new_tokens,
            max_new_tokens=new_tokens,
            early_stopping=False,
        )

    def ct2_runner(engine, pieces_of):
        def run(seqs, beam):
            return engine.translate_batch(
                [pieces_of(s) for s in seqs],
                beam_size=beam,
                min_decoding_length=new_tokens,
                max_decoding_length=new_tokens,
                max_batch_size=len(seqs),
            )

        return run

    names = _Vocabulary().get_vocab()
    hf_pieces = {i: name for name, i in names.items()}
    return {
        "rosetta": rosetta_run,
        "hf": hf_run,
        "ct2_from_hf": ct2_runner(ct2_hf, lambda s: [hf_pieces[i] for i in s]),
        "rosetta_ct2": ct2_runner(ct2_rosetta, tokenizer.source_pieces),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["toy", "small", "base"], default="small")
    parser.add_argument("--config", default="configs/multi30k_en_de.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    import ctranslate2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = load_config(args.config, ["experiment_dir=experiments/speed_data"])
    prepare(config, log=lambda _: None)
    split = load_split(config, "train")
    tokenizer = Tokenizer.load(config.experiment_dir / "tokenizer")
    cfg = ModelConfig(**MODEL_PRESETS[args.preset], max_positions=512)
    work = Path(tempfile.mkdtemp(prefix="rosetta-speed-"))

    rosetta_model = build_model(cfg, VOCAB, VOCAB)
    hf_model = marian(cfg)
    ct2_options = dict(device="cpu", inter_threads=1, intra_threads=args.threads)
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
    rosetta_model.eval()
    hf_model.eval()
    model_dir = save_model_dir(
        work / "rosetta",
        config.model_copy(update={"model": cfg}),
        config.experiment_dir / "tokenizer",
        rosetta_model,
        {},
    )
    ct2_rosetta = ctranslate2.Translator(
        str(export_ctranslate2(model_dir, work / "rosetta_ct2")), **ct2_options
    )
    ct2_hf = ctranslate2.Translator(
        str(marian_to_ctranslate2(hf_model, work / "hf_ct2")), **ct2_options
    )
    runners = decode_runners(
        rosetta_model, hf_model, ct2_hf, ct2_rosetta, tokenizer, args.new_tokens
    )
    test = load_split(config, "test")
    sources = [test.source(i).tolist() for i in range(64)]
    settings = {"greedy_b32": (1, 32), "greedy_b1": (1, 1), "beam5_b32": (5, 32)}
    decoding: dict[str, dict[str, list[float]]] = {s: {n: [] for n in runners} for s in settings}
    for _ in range(args.repeats + 1):  # the first round is the warm-up
        for setting, (beam, batch) in settings.items():
            for name, run in runners.items():
                chunk = sources[:batch] if batch > 1 else sources[:8]
                start = time.perf_counter()
                if batch == 1:
                    for seq in chunk:
                        run([seq], beam)
                else:
                    run(chunk, beam)
                seconds = time.perf_counter() - start
                decoding[setting][name].append(len(chunk) * args.new_tokens / seconds)
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
