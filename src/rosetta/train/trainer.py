"""The training loop (SPEC §1 steps 9–11), flat and top to bottom.

One call, ``train(config)``, runs: build the model → Adam with warm-up →
epochs of token-budget batches (with gradient accumulation) → periodic
validation (loss and greedy BLEU) → checkpoints → early stopping or budget →
the model directory.

Exact resume: ``last.pt`` stores the model, optimizer, scaler, step, the data
position (epoch and batch index: the batch order is a pure function of the
seed and epoch) and every RNG state, so an interrupted run resumed with
``--resume`` ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rosetta.config import ExperimentConfig, parse_duration
from rosetta.data.batching import BatchIterator, collate, make_batches
from rosetta.data.prepare import TokenizedSplit, load_split
from rosetta.data.tokenizer import PAD_ID, Tokenizer
from rosetta.decode.translator import SearchOptions, Translator
from rosetta.evaluate.metrics import Score, bleu
from rosetta.model import build_model
from rosetta.modeldir import save_model_dir
from rosetta.train import checkpoint
from rosetta.train.average import average_checkpoints
from rosetta.train.loss import label_smoothed_nll
from rosetta.train.schedule import learning_rate


@dataclass
class Progress:
    """Where training stands; saved in ``last.pt``."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed: float = 0.0
    best_score: float = -math.inf
    best_step: int = 0
    bad_validations: int = 0
    lr_scale: float = 1.0  # the plateau schedule's accumulated decay
    history: list[dict[str, Any]] = field(default_factory=list)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision on a GPU (bf16 where supported, else fp16); fp32 on a CPU."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "fp16" or (setting == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (for plots)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, split: TokenizedSplit, max_tokens: int, device: torch.device
) -> tuple[float, float]:
    """Mean label-free NLL per target token and its perplexity."""
    model.eval()
    nll_sum, tokens = 0.0, 0
    for indices in make_batches(split.src_lengths, split.tgt_lengths, max_tokens):
        batch = collate(split, indices).to(device)
        _, nll = label_smoothed_nll(model(batch.src, batch.tgt_in), batch.tgt_out, 0.0)
        nll_sum += float(nll)
        tokens += batch.num_tgt_tokens
    nll = nll_sum / max(tokens, 1)
    return nll, math.exp(min(nll, 50))


def validation_bleu(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    split: TokenizedSplit,
    config: ExperimentConfig,
    limit: int = 0,
) -> tuple[Score, list[str]]:
    """Greedy BLEU on (the first ``limit`` pairs of) a split; returns score and outputs."""
    count = len(split) if limit <= 0 else min(limit, len(split))
    sources = [split.source(i).tolist() for i in range(count)]
    references = [tokenizer.decode_target(split.target(i).tolist()) for i in range(count)]
    options = SearchOptions.from_config(config.decode, beam=1, nbest=1)
    found = Translator(model, tokenizer, options).search_ids(sources)
    hypotheses = [tokenizer.decode_target(h[0].tokens) for h in found]
    return bleu(hypotheses, references), hypotheses


def save_attention_snapshots(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    split: TokenizedSplit,
    config: ExperimentConfig,
    directory: Path,
    step: int,
) -> None:
    """Heat maps of the first ``train.attention_samples`` validation sentences, so a
    user can watch alignment form: ``directory/step_<N>_<i>.png``."""
    from rosetta.plotting import compute_attention, plot_attention

    translator = Translator(
        model, tokenizer, SearchOptions.from_config(config.decode, beam=1, nbest=1)
    )
    for i in range(min(config.train.attention_samples, len(split))):
        sentence = tokenizer.source.decode(split.source(i).tolist())
        attention = compute_attention(translator, sentence)
        plot_attention(attention, directory / f"step_{step}_{i}.png")
    model.train()


def build_optimizer(
    model: torch.nn.Module, config: ExperimentConfig, device: torch.device
) -> torch.optim.Optimizer:
    """Adam with the paper's betas/eps; the fused kernel where this PyTorch has one
    for the device (CUDA, and CPU from PyTorch 2.4 on)."""
    tc = config.train
    options = dict(lr=0.0, betas=tc.betas, eps=tc.eps, weight_decay=tc.weight_decay)
    try:
        return torch.optim.Adam(model.parameters(), fused=True, **options)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), **options)


def train(config: ExperimentConfig, resume: bool = False, log=print) -> Path:
    """Trains the configured model; returns the model directory."""
    tc = config.train
    exp = config.experiment_dir
    ckpt_dir = exp / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    device = pick_device()

    tokenizer = Tokenizer.load(exp / "tokenizer")
    train_split, valid_split = load_split(config, "train"), load_split(config, "valid")
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    model.to(device)
    optimizer = build_optimizer(model, config, device)
    amp_dtype = autocast_dtype(tc.amp, device)
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    progress = Progress()

    if resume:
        state = checkpoint.load(ckpt_dir / "last.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        progress = Progress(**state["progress"])
        checkpoint.restore_rng_states(state["rng"])
        log(f"resumed from step {progress.step} (epoch {progress.epoch + 1})")
    elif (ckpt_dir / "last.pt").exists():
        raise FileExistsError(
            f"{ckpt_dir / 'last.pt'} exists: pass --resume to continue it, or use a new "
            "experiment_dir (nothing is overwritten)"
        )

    metrics = MetricsLog(exp / "metrics.jsonl")
    batches = BatchIterator(train_split, tc.max_tokens, seed=tc.seed)
    max_time = parse_duration(tc.max_time) if tc.max_time else math.inf
    parameters = sum(p.numel() for p in model.parameters())
    log(
        f"model: {parameters:,} parameters, {config.model.d_model}d, "
        f"{config.model.encoder_layers}+{config.model.decoder_layers} layers; "
        f"{len(train_split):,} training pairs, "
        f"padding {batches.padding_fraction(0):.1%} of each batch on average; device {device}"
    )

    def save_last() -> None:
        checkpoint.atomic_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "progress": asdict(progress),
                "rng": checkpoint.rng_states(),
                "config": config.model_dump(mode="json"),
            },
            ckpt_dir / "last.pt",
        )

    def validate() -> bool:
        """Scores the model, saves checkpoints; returns True when patience ran out."""
        nll, ppl = validation_loss(model, valid_split, tc.max_tokens, device)
        record: dict[str, Any] = {"step": progress.step, "valid_nll": nll, "valid_ppl": ppl}
        score = -nll
        if tc.valid_bleu:
            result, _ = validation_bleu(model, tokenizer, valid_split, config, tc.valid_bleu_size)
            score = record["valid_bleu"] = result.score
            record["valid_bleu_signature"] = result.signature
        model.train()
        improved = score > progress.best_score
        if improved:
            progress.best_score, progress.best_step = score, progress.step
            progress.bad_validations = 0
            checkpoint.atomic_save(
                {"model": model.state_dict(), "step": progress.step, "score": score},
                ckpt_dir / "best.pt",
            )
        else:
            progress.bad_validations += 1
            if tc.schedule == "plateau" and progress.bad_validations % tc.plateau_patience == 0:
                progress.lr_scale *= tc.plateau_factor
                log(f"validation plateaued: learning rate scaled by {progress.lr_scale:g}")
        checkpoint.atomic_save(
            {"model": model.state_dict(), "step": progress.step},
            ckpt_dir / f"step_{progress.step}.pt",
        )
        checkpoint.prune(ckpt_dir, tc.keep_last)
        if tc.attention_samples:
            save_attention_snapshots(
                model, tokenizer, valid_split, config, exp / "attention", progress.step
            )
        progress.history.append(record)
        metrics.write({"type": "valid", "elapsed": progress.elapsed, **record})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))
        log(f"step {progress.step}: {shown}{' (best)' if improved else ''}")
        save_last()
        return bool(tc.patience) and progress.bad_validations >= tc.patience

    model.train()
    start_time = time.monotonic() - progress.elapsed
    bar = tqdm(
        total=tc.max_steps or None,
        initial=progress.step,
        unit="step",
        dynamic_ncols=True,
        disable=None,
    )
    window_tokens, window_loss, window_start = 0, 0.0, time.monotonic()
    stop_reason = ""
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    )

    while not stop_reason:
        pending = []  # batches accumulated into the next optimizer step
        for index, batch in batches.iterate(progress.epoch, progress.batch_in_epoch):
            pending.append(batch)
            if len(pending) < tc.accumulate:
                continue
            tokens = sum(b.num_tgt_tokens for b in pending)
            loss_sum = 0.0
            for b in pending:
                b = b.to(device)
                real = b.tgt_out.ne(PAD_ID)
                with autocast:
                    logits = model(b.src, b.tgt_in, label_mask=real)
                loss, _ = label_smoothed_nll(logits, b.tgt_out[real], tc.label_smoothing)
                scaler.scale(loss / tokens).backward()
                loss_sum += loss.detach()
            pending = []
            progress.step += 1
            lr = progress.lr_scale * learning_rate(
                progress.step, tc.schedule, config.model.d_model, tc.warmup, tc.lr
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            if tc.clip_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            progress.batch_in_epoch = index + 1
            progress.elapsed = time.monotonic() - start_time
            window_tokens += tokens
            window_loss += loss_sum  # stays a tensor: no host sync until logging

            if progress.step % tc.log_every == 0:
                now = time.monotonic()
                rate = window_tokens / max(now - window_start, 1e-9)
                loss_value = float(window_loss) / max(window_tokens, 1)
                left = max_time - progress.elapsed
                shown = dict(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
                if left < math.inf:
                    shown["left"] = f"{left / 60:.1f}m"
                bar.set_postfix(shown)
                if bar.disable:  # no terminal (a log file): one plain line instead
                    log(f"step {progress.step} " + " ".join(f"{k} {v}" for k, v in shown.items()))
                metrics.write(
                    {
                        "type": "train",
                        "step": progress.step,
                        "epoch": progress.epoch + 1,
                        "loss": loss_value,
                        "lr": lr,
                        "tgt_tokens_per_s": rate,
                        "elapsed": progress.elapsed,
                    }
                )
                window_tokens, window_loss, window_start = 0, 0.0, now
            bar.update(1)

            out_of_budget = progress.elapsed >= max_time
            at_max_steps = bool(tc.max_steps) and progress.step >= tc.max_steps
            due = progress.step % tc.valid_every == 0 or out_of_budget or at_max_steps
            if due and validate():
                stop_reason = f"no improvement in {tc.patience} validations"
                break
            if out_of_budget:
                stop_reason = f"time budget {tc.max_time} reached"
            elif at_max_steps:
                stop_reason = f"max_steps {tc.max_steps} reached"
            if stop_reason:
                break
        else:
            progress.epoch += 1
            progress.batch_in_epoch = 0
            if tc.max_epochs and progress.epoch >= tc.max_epochs:
                validate()
                stop_reason = f"max_epochs {tc.max_epochs} reached"
    bar.close()
    log(
        f"stopped after {progress.step} steps ({progress.elapsed / 60:.1f} min): {stop_reason}; "
        f"best step {progress.best_step}"
    )
    return export_model_dir(config, model, progress, log)


def export_model_dir(
    config: ExperimentConfig, model: torch.nn.Module, progress: Progress, log=print
) -> Path:
    """Writes ``EXP/model`` from the best checkpoint, or from the average of the last
    ``train.average_last`` checkpoints when that scores better on validation BLEU."""
    exp = config.experiment_dir
    ckpt_dir = exp / "checkpoints"
    model.load_state_dict(checkpoint.load(ckpt_dir / "best.pt")["model"])
    chosen = f"best checkpoint (step {progress.best_step})"
    average_last = config.train.average_last
    if average_last > 1 and len(checkpoint.step_checkpoints(ckpt_dir)) > 1:
        tokenizer = Tokenizer.load(exp / "tokenizer")
        valid = load_split(config, "valid")
        limit = config.train.valid_bleu_size
        best_bleu = validation_bleu(model, tokenizer, valid, config, limit)[0].score
        best_weights = {k: v.clone() for k, v in model.state_dict().items()}
        paths = checkpoint.step_checkpoints(ckpt_dir)[-average_last:]
        model.load_state_dict(average_checkpoints(paths))
        avg_bleu = validation_bleu(model, tokenizer, valid, config, limit)[0].score
        log(f"valid BLEU: best checkpoint {best_bleu:.2f}, average of {len(paths)} {avg_bleu:.2f}")
        if avg_bleu >= best_bleu:
            chosen = f"average of the last {len(paths)} checkpoints"
        else:
            model.load_state_dict(best_weights)
    model.eval()
    metadata = {
        "arch": config.model.arch,
        "steps": progress.step,
        "training_minutes": round(progress.elapsed / 60, 2),
        "weights": chosen,
        "validation": progress.history[-1] if progress.history else {},
        "best_validation_score": progress.best_score,
    }
    directory = save_model_dir(exp / "model", config, exp / "tokenizer", model, metadata)
    log(f"model directory: {directory} ({chosen})")
    return directory
