"""The training loop (SPEC §1 steps 9–11), flat and top to bottom.

One call, ``train(config)``, runs: build the model → Adam with warm-up →
epochs of token-budget batches (with gradient accumulation) → periodic
validation (loss and greedy BLEU) → checkpoints → early stopping or budget →
the model directory.

Exact resume: ``last.pt`` stores the model, optimizer, scaler, step, the data
position (epoch and batch index: the batch order is a pure function of the
seed and epoch) and every RNG state, so an interrupted run resumed with
``--resume`` ends with the same weights as an uninterrupted one.

What protects a run: checkpoints are bound to the fingerprints of the data and
tokenizer they were trained on (a resume on other data is refused); SIGINT and
SIGTERM save ``last.pt`` at the end of the current step before exiting; a
batch whose loss (or, with clipping, gradient norm) is NaN or infinite is
skipped and counted, and ``train.max_nonfinite`` of them in a row stop the run;
no checkpoint or model directory is ever written from non-finite weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rosetta.config import ExperimentConfig, model_config, parse_duration
from rosetta.data.batching import BatchIterator, collate, make_batches
from rosetta.data.prepare import TokenizedSplit, binding, load_split
from rosetta.data.tokenizer import Tokenizer
from rosetta.decode.translator import TorchTranslator
from rosetta.model import model_for
from rosetta.modeldir import check_finite
from rosetta.safeio import check_writable, one_writer, remove_stale_temporaries
from rosetta.train import checkpoint
from rosetta.train.distributed import Context
from rosetta.train.schedule import learning_rate
from rosetta.train.selection import export_model_dir, validation_bleu, validation_score


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
    nonfinite_skipped: int = 0  # batches skipped for a NaN/inf loss or gradient, in all
    nonfinite_in_row: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class TrainingError(RuntimeError):
    """Training that cannot go on; the message says why."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; ``last.pt`` holds the state at the end of ``step``."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; saved {path}")
        self.signum, self.step, self.path = signum, step, path


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Turns SIGINT and SIGTERM into a request the loop honours after the current step.

    Yields the list the signals are appended to. A second Ctrl-C interrupts at
    once (the last checkpoint stays valid: writes are atomic). Outside the main
    thread, where Python cannot install handlers, signals keep their behaviour.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def request(signum: int, _frame) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _silent(*_args: Any, **_kwargs: Any) -> None:
    """The log of processes other than rank 0."""


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision on a GPU (bf16 where supported, else fp16); fp32 on a CPU."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "fp16" or (setting == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (for plots); with no
    path (a process other than rank 0) it writes nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _eta(seconds: float) -> str:
    return f"{seconds / 3600:.1f}h" if seconds >= 5940 else f"{seconds / 60:.1f}m"


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, split: TokenizedSplit, max_tokens: int, device: torch.device
) -> tuple[float, float, float | None]:
    """Mean label-free NLL per target token and its perplexity; and, for a family
    whose eval-mode loss counts ``length_correct`` of ``sentences`` (a
    non-autoregressive model's length classifier), that accuracy."""
    model.eval()
    nll_sum, tokens = 0.0, 0
    counts: dict[str, float] = {"length_correct": 0.0, "sentences": 0.0}
    for indices in make_batches(split.src_lengths, split.tgt_lengths, max_tokens):
        batch = collate(split, indices).to(device)
        terms = model.training_loss(batch, 0.0)
        nll_sum += float(terms["nll"])
        tokens += batch.num_tgt_tokens
        for name in counts:
            counts[name] += float(terms.get(name, 0.0))
    nll = nll_sum / max(tokens, 1)
    accuracy = counts["length_correct"] / counts["sentences"] if counts["sentences"] else None
    return nll, math.exp(min(nll, 50)), accuracy


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

    translator = TorchTranslator(
        model, tokenizer, config.decode.with_overrides(beam=1, nbest=1, sampling=False)
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


def _model_differences(trained: dict[str, Any], stated: dict[str, Any]) -> list[str]:
    return [
        f"model.{key} was {trained.get(key)!r}, the configuration says {stated.get(key)!r}"
        for key in sorted(trained.keys() | stated.keys())
        if trained.get(key) != stated.get(key)
    ]


def load_training_state(path: Path, config: ExperimentConfig, bound_to: dict[str, str]) -> dict:
    """Reads a ``last.pt``-style state for ``--resume`` and checks it belongs to this run."""
    try:
        state = checkpoint.load(path, bound_to)
    except checkpoint.CheckpointError as error:
        raise checkpoint.CheckpointError(f"{error}; {checkpoint.describe_fallback(path)}") from None
    if "optimizer" not in state or "progress" not in state:
        raise checkpoint.CheckpointError(
            f"{path} holds weights only, not a training state to resume (use last.pt)"
        )
    trained = model_config(state["config"]["model"]).model_dump(mode="json")
    differences = _model_differences(trained, config.model.model_dump(mode="json"))
    if differences:
        raise checkpoint.CheckpointError(
            f"cannot resume {path} with a changed model: {'; '.join(differences)}"
        )
    return state


def train(
    config: ExperimentConfig,
    resume: bool | str | Path = False,
    log=print,
    context: Context | None = None,
) -> Path:
    """Trains the configured model; returns the model directory.

    ``resume`` is False (a new run), True (continue from ``checkpoints/last.pt``)
    or the path of a training state to continue from (e.g. ``previous.pt``).
    Raises ``TrainingInterrupted`` after saving ``last.pt`` when SIGINT or
    SIGTERM arrives. ``context`` is this process's place in a torchrun job
    (``rosetta.train.distributed``); None joins the one the environment names,
    or trains alone. The process that writes (rank 0) holds the experiment's
    one-writer lock for the whole run: a second run on it is refused at once.
    """
    if context is None:
        with Context.from_environment(config.train.device) as context:
            return train(config, resume, log, context)
    if not context.is_main:
        return _train(config, resume, log, context)
    with one_writer(config.experiment_dir, "rosetta train"):  # rank 0 writes for the job
        for folder in (config.experiment_dir / "checkpoints", config.experiment_dir):
            check_writable(folder)  # a read-only place fails now, not at the first save
        return _train(config, resume, log, context)


def _train(config: ExperimentConfig, resume: bool | str | Path, log, context: Context) -> Path:
    """``train``'s body, in the process that holds the experiment (or a rank > 0)."""
    tc = config.train
    exp = config.experiment_dir
    ckpt_dir = exp / "checkpoints"
    main = context.is_main
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(ckpt_dir)
    else:
        log = _silent
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)  # the same initial weights in every process
    device = context.device

    bound_to = binding(config)
    tokenizer = Tokenizer.load(exp / "tokenizer")
    train_split, valid_split = load_split(config, "train"), load_split(config, "valid")
    model = model_for(config.model, tokenizer)
    model.to(device)
    context.seed_for_rank(tc.seed)
    optimizer = build_optimizer(model, config, device)
    amp_dtype = autocast_dtype(tc.amp, device)
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    progress = Progress()

    if resume:
        path = ckpt_dir / checkpoint.LAST if resume is True else Path(resume)
        state = load_training_state(path, config, bound_to)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        progress = Progress(**state["progress"])
        others = state.get("rank_rngs", [])  # ranks 1.. of the run that saved it
        if context.rank == 0:
            checkpoint.restore_rng_states(state["rng"])
        elif context.rank <= len(others):
            checkpoint.restore_rng_states(others[context.rank - 1])
        else:  # more processes than saved it: a fresh stream of its own
            context.seed_for_rank(tc.seed, progress.step)
        log(f"resumed from step {progress.step} (epoch {progress.epoch + 1}) of {path}")
    elif checkpoint.holds_training(ckpt_dir):
        raise FileExistsError(
            f"{ckpt_dir} holds checkpoints: pass --resume to continue them, or use a new "
            "experiment_dir (nothing is overwritten)"
        )

    metrics = MetricsLog(exp / "metrics.jsonl" if main else None)
    loss_module = context.wrap(model)  # DDP when several processes train
    batches = BatchIterator(train_split, tc.max_tokens, seed=tc.seed)
    max_time = parse_duration(tc.max_time) if tc.max_time else math.inf
    parameters = sum(p.numel() for p in model.parameters())
    log(
        f"model: {parameters:,} parameters, {config.model.d_model}d, "
        f"{config.model.encoder_layers}+{config.model.decoder_layers} layers; "
        f"{len(train_split):,} training pairs, "
        f"padding {batches.padding_fraction(0):.1%} of each batch on average; device {device}"
        + (f"; {context.world_size} processes" if context.distributed else "")
    )

    def weights_state() -> dict[str, Any]:
        state = model.state_dict()
        check_finite(state, f"a checkpoint at step {progress.step}")
        return {"model": state, "step": progress.step, "binding": bound_to}

    def save_last(rngs: list[dict[str, Any]]) -> Path:
        """Rank 0 writes ``last.pt`` with every process's random state ``rngs``."""
        return checkpoint.save_training_state(
            {
                **weights_state(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "progress": asdict(progress),
                "rng": rngs[0],
                "rank_rngs": rngs[1:],
                "config": config.model_dump(mode="json"),
            },
            ckpt_dir,
        )

    def save_everywhere() -> Path:
        """``last.pt``, written by rank 0 once every process has reached this point."""
        rngs = context.gather(checkpoint.rng_states())
        path = save_last(rngs) if main else ckpt_dir / checkpoint.LAST
        context.barrier()
        return path

    def validate() -> None:
        """On rank 0: scores the model, saves checkpoints and counts validations without
        progress; every process then takes rank 0's progress (the barrier)."""
        rngs = context.gather(checkpoint.rng_states())
        if main:
            validate_and_save(rngs)
        shared = context.broadcast(asdict(progress))
        for name, value in shared.items():
            setattr(progress, name, value)

    def validate_and_save(rngs: list[dict[str, Any]]) -> None:
        nll, ppl, length_accuracy = validation_loss(model, valid_split, tc.max_tokens, device)
        record: dict[str, Any] = {"step": progress.step, "valid_nll": nll, "valid_ppl": ppl}
        if length_accuracy is not None:
            record["valid_length_accuracy"] = length_accuracy
        if tc.valid_bleu:
            result, _ = validation_bleu(model, tokenizer, valid_split, config, tc.valid_bleu_size)
            record["valid_bleu"], record["valid_bleu_signature"] = result.score, result.signature
        record["elapsed"] = progress.elapsed
        score = validation_score(record)
        model.train()
        state = weights_state()
        improved = score > progress.best_score
        if improved:
            progress.best_score, progress.best_step = score, progress.step
            progress.bad_validations = 0
            checkpoint.save({**state, "score": score}, ckpt_dir / checkpoint.BEST)
        else:
            progress.bad_validations += 1
            if tc.schedule == "plateau" and progress.bad_validations % tc.plateau_patience == 0:
                progress.lr_scale *= tc.plateau_factor
                log(f"validation plateaued: learning rate scaled by {progress.lr_scale:g}")
        checkpoint.save(state, ckpt_dir / f"step_{progress.step}.pt")
        checkpoint.prune(ckpt_dir, tc.keep_last)
        if tc.attention_samples:
            save_attention_snapshots(
                model, tokenizer, valid_split, config, exp / "attention", progress.step
            )
        progress.history.append(record)
        metrics.write({"type": "valid", **record})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))
        log(f"step {progress.step}: {shown}{' (best)' if improved else ''}")
        save_last(rngs)

    def finished() -> str:
        """Why the run is over, or '' while it goes on (checked before every step)."""
        if tc.max_steps and progress.step >= tc.max_steps:
            return f"max_steps {tc.max_steps} reached"
        if progress.elapsed >= max_time:
            return f"time budget {tc.max_time} reached"
        if tc.max_epochs and progress.epoch >= tc.max_epochs:
            return f"max_epochs {tc.max_epochs} reached"
        if tc.patience and progress.bad_validations >= tc.patience:
            return f"no improvement in {tc.patience} validations"
        return ""

    stop_reason = finished()
    if stop_reason and resume:
        log(f"this run had already finished ({stop_reason}); nothing to train")
    model.train()
    start_time = time.monotonic() - progress.elapsed
    bar = tqdm(
        total=tc.max_steps or None,
        initial=progress.step,
        unit="step",
        dynamic_ncols=True,
        disable=None if main else True,
        bar_format="{n_fmt}/{total_fmt} steps [{elapsed}{postfix}]",  # ETA in the postfix
    )
    window_tokens, window_steps, window_start = 0, 0, time.monotonic()
    window_terms: dict[str, torch.Tensor] = {}
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    )

    with stop_requests() as signals:
        while not stop_reason:
            updates = batches.updates(
                progress.epoch,
                progress.batch_in_epoch,
                tc.accumulate,
                context.rank,
                context.world_size,
            )
            for update in updates:
                tokens = update.tokens  # of the whole update, on every process
                # DDP averages gradients over processes: scaled so, they are the
                # single-process gradient of the update's loss per target token
                step_terms: dict[str, torch.Tensor] = {}  # the model family's loss terms
                own = {}  # scheduled sampling: how often the decoder reads its own tokens
                if tc.scheduled_sampling is not None:
                    own["own_rate"] = tc.scheduled_sampling.rate(progress.step)
                    own["sample_own"] = tc.scheduled_sampling.sample
                for k, b in enumerate(update.batches):
                    with context.accumulating(loss_module, last=k == len(update.batches) - 1):
                        with autocast:
                            terms = loss_module(b.to(device), tc.label_smoothing, **own)
                        scaler.scale(terms["loss"] * context.world_size / tokens).backward()
                    for name, value in terms.items():
                        step_terms[name] = step_terms.get(name, 0.0) + value.detach()
                progress.batch_in_epoch = update.end
                finite, stop_requested, clock = context.agree(
                    step_terms["loss"], bool(signals), time.monotonic() - start_time
                )
                if finite and tc.clip_norm > 0:
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm)
                    # with fp16 the scaler itself skips steps whose gradients overflowed
                    # (the gradients are averaged: every process sees the same norm)
                    finite = scaler.is_enabled() or bool(torch.isfinite(norm))
                if not finite:
                    optimizer.zero_grad(set_to_none=True)
                    progress.nonfinite_skipped += 1
                    progress.nonfinite_in_row += 1
                    log(
                        f"skipped a batch with a non-finite loss or gradient after step "
                        f"{progress.step} ({progress.nonfinite_skipped} so far)"
                    )
                    if progress.nonfinite_in_row >= tc.max_nonfinite:
                        raise TrainingError(
                            f"{progress.nonfinite_in_row} batches in a row gave a NaN or "
                            f"infinite loss at step {progress.step}: training stopped (lower "
                            "train.lr, raise train.warmup or check the data); the last "
                            "checkpoint is untouched"
                        )
                    continue
                progress.nonfinite_in_row = 0
                progress.step += 1
                lr = progress.lr_scale * learning_rate(
                    progress.step, tc.schedule, config.model.d_model, tc.warmup, tc.lr
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                progress.elapsed = clock  # rank 0's: a time budget ends alike everywhere
                window_tokens += tokens
                window_steps += 1
                for name, value in step_terms.items():  # tensors: no host sync until logging
                    window_terms[name] = window_terms.get(name, 0.0) + value

                if progress.step % tc.log_every == 0:
                    now = time.monotonic()
                    seconds = max(now - window_start, 1e-9)
                    summed = context.sum(window_terms)  # over processes
                    per_token = {k: float(v) / max(window_tokens, 1) for k, v in summed.items()}
                    shown = {name: f"{value:.3f}" for name, value in per_token.items()}
                    shown.update(lr=f"{lr:.2e}", tok_s=f"{window_tokens / seconds:,.0f}")
                    left = [max_time - progress.elapsed]
                    if tc.max_steps:
                        left.append((tc.max_steps - progress.step) * seconds / window_steps)
                    if min(left) < math.inf:  # whichever limit ends the run first
                        shown["eta"] = _eta(max(min(left), 0.0))
                    bar.set_postfix(shown)
                    if bar.disable:  # no terminal (a log file): one plain line instead
                        log(
                            f"step {progress.step} "
                            + " ".join(f"{k} {v}" for k, v in shown.items())
                        )
                    metrics.write(
                        {
                            "type": "train",
                            "step": progress.step,
                            "epoch": progress.epoch + 1,
                            **per_token,  # "loss", "nll" and any term the model adds
                            "lr": lr,
                            **own,  # the scheduled-sampling rate, when on
                            "tgt_tokens_per_s": window_tokens / seconds,
                            "elapsed": progress.elapsed,
                        }
                    )
                    window_tokens, window_steps, window_start = 0, 0, now
                    window_terms = {}
                bar.update(1)

                stop_reason = finished()
                if stop_reason or progress.step % tc.valid_every == 0:
                    validate()  # even when a signal came: a resumed run must validate alike
                    stop_reason = finished()
                if stop_requested and not stop_reason:
                    bar.close()
                    signum = signals[0] if signals else signal.SIGTERM  # another process's
                    raise TrainingInterrupted(signum, progress.step, save_everywhere())
                if stop_reason:
                    break
            else:
                progress.epoch += 1
                progress.batch_in_epoch = 0
                if tc.max_epochs and progress.epoch >= tc.max_epochs:
                    validate()
                    stop_reason = finished()
    bar.close()
    log(
        f"stopped after {progress.step} steps ({progress.elapsed / 60:.1f} min): {stop_reason}; "
        f"best step {progress.best_step}"
    )
    if progress.nonfinite_skipped:
        log(f"{progress.nonfinite_skipped} batches were skipped for a non-finite loss or gradient")
    directory = export_model_dir(config, model, asdict(progress), log) if main else exp / "model"
    context.barrier()  # nobody reports success before the model directory is there
    return directory
