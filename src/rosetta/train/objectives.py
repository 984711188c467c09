"""Training objectives: what a training step minimises and what validation reports.

The training loop (``rosetta.train.trainer``) knows one key of one method: it
minimises ``loss``. Everything else an objective computes, logs or reports goes
through these four methods, so a new way of training (sequence-level risk,
REINFORCE, ...) is a new class here and one line in ``objective_for``, never a
key in the loop:

- ``loss(model, batch, step)``: the terms of a training batch, each a 0-dim
  tensor *summed* over the batch: ``loss``, what training minimises, and any
  other term the objective wants logged (``nll``, ``length_loss``; detached
  where they are not part of ``loss``). The trainer divides by the update's
  target tokens, so accumulation and several processes give the gradient of one
  large batch; the training log shows each term per target token. ``step`` is
  the number of updates made before this one (for schedules);
- ``validation(model, batch)``: the terms of a validation batch; the trainer
  calls it in eval mode without gradients and sums the terms over the split;
- ``report(sums, tokens)``: the validation record from those sums and the
  split's target tokens: ``valid_nll`` (which selects the best checkpoint when
  BLEU is off) and ``valid_ppl``, and whatever the objective adds;
- ``logged(step)``: numbers logged beside the training terms of the update made
  at ``step`` (scheduled sampling's rate).

``unit`` says what the trainer divides by: ``"token"`` (the update's target
tokens) or ``"sentence"`` (its sentence pairs, for ``SequenceLevel``, whose
loss is one number per sentence: ``rosetta.train.sequence_level``); the
training log shows each term per that unit.

Where an objective needs a family's insides (the RNN's per-step scheduled
sampling, NAT's glancing pass), it calls a method of the model; the model holds
no loss of its own.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F

from rosetta.config import ConfigError, ExperimentConfig, ScheduledSamplingConfig
from rosetta.data.batching import Batch
from rosetta.data.tokenizer import EOS_ID, MASK_ID, PAD_ID, Tokenizer
from rosetta.model.ctc import BLANK_ID, best_alignment, collapse
from rosetta.model.interface import IncrementalDecoder, Seq2Seq
from rosetta.model.loss import label_smoothed_nll
from rosetta.model.nat import NATransformer
from rosetta.train.sequence_level import SentenceLevelLoss


class Objective(ABC):
    """The interface the trainer calls (see the module docstring). ``loss`` and
    ``validation`` are each objective's own; ``report`` and ``logged`` have the
    defaults of an objective whose only validation term that matters is ``nll``."""

    unit: ClassVar[str] = "token"  # what the summed terms are divided by: token | sentence

    @abstractmethod
    def loss(self, model: Seq2Seq, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """The summed terms of a training batch; ``loss`` is minimised."""

    @abstractmethod
    def validation(self, model: Seq2Seq, batch: Batch) -> dict[str, torch.Tensor]:
        """The summed terms of a validation batch (eval mode, no gradients)."""

    def report(self, sums: dict[str, float], tokens: int) -> dict[str, float]:
        """``valid_nll``: the summed ``nll`` per target token; ``valid_ppl``: exp of it."""
        nll = sums["nll"] / max(tokens, 1)
        return {"valid_nll": nll, "valid_ppl": math.exp(min(nll, 50))}

    def logged(self, step: int) -> dict[str, float]:
        """Nothing beside the training terms."""
        return {}


def token_terms(
    model: Seq2Seq, states: torch.Tensor, tgt_out: torch.Tensor, smoothing: float
) -> dict[str, torch.Tensor]:
    """``loss`` (label-smoothed) and ``nll`` summed over the real target tokens, from
    decoder states (batch, tgt_len, d_model); only the real positions are projected
    to the vocabulary."""
    real = tgt_out.ne(PAD_ID)  # (batch, tgt_len)
    loss, nll = label_smoothed_nll(model.output(states[real]), tgt_out[real], smoothing)
    return {"loss": loss, "nll": nll}


class TeacherForcing(Objective):
    """Label-smoothed cross-entropy of each target token given the gold tokens
    before it (SPEC §1 step 9)."""

    def __init__(self, label_smoothing: float) -> None:
        self.label_smoothing = label_smoothing

    def loss(self, model: Seq2Seq, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        states = model.hidden_states(batch.src, batch.tgt_in)
        return token_terms(model, states, batch.tgt_out, self.label_smoothing)

    def validation(self, model: Seq2Seq, batch: Batch) -> dict[str, torch.Tensor]:
        """``nll``: the label-free negative log-likelihood of the target tokens."""
        states = model.hidden_states(batch.src, batch.tgt_in)
        return {"nll": token_terms(model, states, batch.tgt_out, 0.0)["nll"]}


class ScheduledSampling(TeacherForcing):
    """Teacher forcing where each decoder input after <bos> is, with probability
    ``schedule.rate(step)``, the model's own prediction (``Seq2Seq.scheduled_states``:
    the parallel two-pass form, the RNN's per-step form). Validation stays teacher
    forced; the rate is logged as ``own_rate``."""

    def __init__(self, label_smoothing: float, schedule: ScheduledSamplingConfig) -> None:
        super().__init__(label_smoothing)
        self.schedule = schedule

    def loss(self, model: Seq2Seq, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        rate = self.schedule.rate(step)
        if rate <= 0:  # no draws at all: the random streams stay as teacher forcing's
            return super().loss(model, batch, step)
        states = model.scheduled_states(batch.src, batch.tgt_in, rate, self.schedule.sample)
        return token_terms(model, states, batch.tgt_out, self.label_smoothing)

    def logged(self, step: int) -> dict[str, float]:
        return {"own_rate": self.schedule.rate(step)}


class MaskedLM(Objective):
    """The non-autoregressive Transformer's objective (``rosetta.model.nat``): the
    label-smoothed loss of the target tokens a pass predicts, which CMLM masks at
    random and glancing (GLAT, ``glancing > 0``) chooses from a first pass's
    errors, plus ``length_loss_weight`` times the length classifier's
    cross-entropy. The target has no <eos>: the length is predicted, not ended.

    Validation predicts every token from all masks at the gold length (the single
    pass, deterministic) and counts the sentences whose length the classifier
    gets right; ``report`` adds ``valid_length_accuracy``."""

    def __init__(self, label_smoothing: float, length_loss_weight: float, glancing: float) -> None:
        self.label_smoothing = label_smoothing
        self.length_loss_weight = length_loss_weight
        self.glancing = glancing

    def loss(self, model: NATransformer, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """``loss``, ``nll`` (of the tokens predicted) and ``length_loss``."""
        terms, _ = self._terms(model, batch, self.label_smoothing, training=True)
        return terms

    def validation(self, model: NATransformer, batch: Batch) -> dict[str, torch.Tensor]:
        """The terms of ``loss`` from all masks, ``length_correct`` and ``sentences``."""
        terms, length_correct = self._terms(model, batch, 0.0, training=False)
        sentences = torch.tensor(batch.src.size(0), device=batch.src.device)
        return {**terms, "length_correct": length_correct, "sentences": sentences}

    def report(self, sums: dict[str, float], tokens: int) -> dict[str, float]:
        record = super().report(sums, tokens)
        if sums.get("sentences"):
            record["valid_length_accuracy"] = sums["length_correct"] / sums["sentences"]
        return record

    def _terms(
        self, model: NATransformer, batch: Batch, smoothing: float, training: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The loss terms, and how many sentences' length class the classifier gets."""
        target = batch.tgt_out.masked_fill(batch.tgt_out.eq(EOS_ID), PAD_ID)  # (batch, tgt_len)
        real = target.ne(PAD_ID)
        encoded = model.encode(batch.src)
        memories = model.memories(encoded)
        length_logits = model.length_logits(encoded)  # (batch, classes)
        classes = model.length_classes(real.sum(1), batch.src_lengths)
        length_loss = F.cross_entropy(length_logits.float(), classes, reduction="sum")
        if not training:
            decoder_in, predicted = target.masked_fill(real, MASK_ID), real
        elif self.glancing > 0:
            decoder_in, predicted = model.glance(memories, target, real, self.glancing)
        else:
            decoder_in, predicted = model.mask_uniformly(target, real)
        states = model.decoder_states(memories, decoder_in)  # (batch, tgt_len, d_model)
        loss, nll = label_smoothed_nll(
            model.output(states[predicted]), target[predicted], smoothing
        )
        terms = {
            "loss": loss + self.length_loss_weight * length_loss,
            "nll": nll,
            "length_loss": length_loss.detach(),
        }
        return terms, length_logits.argmax(-1).eq(classes).sum()


class SequenceLevel(TeacherForcing):
    """``train.sequence_level``: minimum risk or REINFORCE on the model's own
    candidates (``rosetta.train.sequence_level.SentenceLevelLoss``), per sentence,
    with ``token_weight`` lambda of the label-smoothed loss per target token mixed
    in (Edunov et al. 2018): lambda * token-level + (1 - lambda) * sequence-level,
    each counted once per sentence. Validation is teacher forcing's; the training
    log adds ``token_loss`` when it is mixed in."""

    unit: ClassVar[str] = "sentence"

    def __init__(self, whole: SentenceLevelLoss, label_smoothing: float) -> None:
        super().__init__(label_smoothing)
        self.whole = whole

    def loss(self, model: Seq2Seq, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        terms = self.whole(model, batch, step)
        weight = self.whole.cfg.token_weight
        if weight > 0:
            token_loss = super().loss(model, batch, step)["loss"]
            token_loss = token_loss * len(batch) / batch.num_tgt_tokens  # per token, per sentence
            terms["loss"] = weight * token_loss + (1.0 - weight) * terms["loss"]
            terms["token_loss"] = token_loss.detach()
        return terms


CRF_TOKEN_WEIGHT = 0.5  # the per-position loss's weight beside a CRF's (PositionsNAT)


class PositionsNAT(Objective):
    """The non-autoregressive Transformer's objective without a length classifier
    (``model.length``: ``eos``, ``ctc`` or ``crf``; ``rosetta.model.nat``). The
    decoder has ceil(upsample x source length) positions and one pass fills them all:

    - ``eos``: the label-smoothed loss of the target, then <eos>, then <pad> at the
      remaining positions (a target with no room for its <eos> is cut);
    - ``ctc``: PyTorch's ``ctc_loss`` over the up-sampled positions (summed over
      every alignment of the target; the blank is <mask>; no label smoothing);
    - ``crf``: the CRF's negative log-likelihood of ``eos``'s labels over all the
      positions plus ``CRF_TOKEN_WEIGHT`` x ``eos``'s per-position loss (Sun et al.
      2019 train the two together; fairseq's NAT-CRF weighs the second 0.5).

    Glancing (``glancing > 0``) reveals a share of a first pass's errors as gold
    tokens (``eos``, ``crf``: the target's own positions, the ``crf`` pass Viterbi-
    decoded; ``ctc``: where the best CTC alignment puts them,
    ``rosetta.model.ctc.best_alignment``), at random positions, and the
    per-position loss is on the rest (``ctc``, ``crf``'s sequence loss: over all,
    as Gu & Kong 2021).

    Validation is the single pass from all positions; ``report`` adds the ratio of
    output to reference length and the share of sentences of exactly the
    reference's length."""

    def __init__(self, label_smoothing: float, glancing: float, mode: str) -> None:
        self.label_smoothing = label_smoothing
        self.glancing = glancing
        self.mode = mode

    def loss(self, model: NATransformer, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        return self._terms(model, batch, self.label_smoothing, training=True)[0]

    def validation(self, model: NATransformer, batch: Batch) -> dict[str, torch.Tensor]:
        terms, output_lengths, target_lengths = self._terms(model, batch, 0.0, training=False)
        return {
            **terms,
            "output_tokens": output_lengths.sum(),
            "reference_tokens": target_lengths.sum(),
            "length_correct": output_lengths.eq(target_lengths).sum(),
            "sentences": torch.tensor(batch.src.size(0), device=batch.src.device),
        }

    def report(self, sums: dict[str, float], tokens: int) -> dict[str, float]:
        record = super().report(sums, tokens)
        if sums.get("sentences"):
            record["valid_length_accuracy"] = sums["length_correct"] / sums["sentences"]
            record["valid_length_ratio"] = sums["output_tokens"] / max(sums["reference_tokens"], 1)
        return record

    def _terms(
        self, model: NATransformer, batch: Batch, smoothing: float, training: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The loss terms, and each sentence's output and reference lengths (of the
        pass without glancing: validation's)."""
        target = batch.tgt_out.masked_fill(batch.tgt_out.eq(EOS_ID), PAD_ID)
        target_lengths = target.ne(PAD_ID).sum(1)
        encoded = model.encode(batch.src)
        memories = model.memories(encoded)
        lengths = model.positions(batch.src_lengths)
        width = int(lengths.max())
        real = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
        if self.mode == "ctc":
            gold = None
        else:  # the target, <eos>, then <pad> at every other real position
            gold = F.pad(target, (0, max(width - target.size(1), 0)), value=PAD_ID)[:, :width]
            room = (target_lengths < lengths).nonzero(as_tuple=True)[0]
            gold[room, target_lengths[room]] = EOS_ID
            gold = gold.masked_fill(~real, PAD_ID)
        shown, learned = None, real
        if training and self.glancing > 0:
            with torch.no_grad():
                first = model.emit(encoded, memories, lengths).float()
                guess = self._guess(model, first, real)
            shown, learned = self._glance(
                first.log_softmax(-1), guess, target, target_lengths, gold, lengths, real
            )
        logits = model.emit(encoded, memories, lengths, shown)
        if self.mode == "ctc":
            log_probs = logits.float().log_softmax(-1)
            loss = F.ctc_loss(
                log_probs.transpose(0, 1), target, lengths, target_lengths, blank=BLANK_ID,
                reduction="sum", zero_infinity=True,
            )  # fmt: skip
            nll = loss.detach()
        else:
            loss, nll = label_smoothed_nll(logits[learned], gold[learned], smoothing)
        terms = {"loss": loss, "nll": nll}
        if self.mode == "crf":
            sequence = -model.crf.log_likelihood(logits, gold, real, model.crf_beam).sum()
            terms |= {"loss": sequence + CRF_TOKEN_WEIGHT * loss, "crf_nll": sequence.detach()}
        if training:
            return terms, target_lengths, target_lengths
        guess = self._guess(model, logits.float(), real).masked_fill(~real, PAD_ID)
        if self.mode == "ctc":
            out = [len(collapse(row[: int(n)])) for row, n in zip(guess.tolist(), lengths.tolist())]
        else:
            ended = guess.eq(EOS_ID) | guess.eq(PAD_ID)
            out = torch.where(ended.any(1), ended.float().argmax(1), lengths).tolist()
        return terms, torch.tensor(out, device=lengths.device), target_lengths

    def _guess(
        self, model: NATransformer, logits: torch.Tensor, real: torch.Tensor
    ) -> torch.Tensor:
        """What a single pass with these ``logits`` outputs at each position: the most
        probable token (``crf``: the Viterbi path's)."""
        if self.mode == "crf":
            return model.crf.viterbi(logits, real, model.crf_beam)[0]
        return logits.argmax(-1)

    def _glance(
        self,
        log_probs: torch.Tensor,
        guess: torch.Tensor,
        target: torch.Tensor,
        target_lengths: torch.Tensor,
        gold: torch.Tensor | None,
        lengths: torch.Tensor,
        real: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Glancing's gold tokens to show (PAD elsewhere) and the positions learned,
        from a first pass's ``log_probs`` and the output ``guess`` it gives."""
        if gold is None:  # ctc: the tokens of the best alignment, where it exists
            repeats = (target[:, 1:].eq(target[:, :-1]) & target[:, 1:].ne(PAD_ID)).sum(1)
            feasible = lengths >= target_lengths + repeats
            aligned = best_alignment(log_probs, target, lengths, target_lengths)
            candidates = real & feasible[:, None]
        else:  # eos: the target's own positions and its <eos>
            aligned = gold
            candidates = real & (
                torch.arange(real.size(1), device=real.device)[None, :] <= target_lengths[:, None]
            )
        wrong = (guess.ne(aligned) & candidates).sum(1)
        reveal = (wrong.float() * self.glancing).long()
        noise = torch.rand(real.shape, device=real.device).masked_fill(~candidates, 2.0)
        shown_at = noise.argsort(1).argsort(1) < reveal[:, None]
        shown = torch.where(shown_at, aligned, torch.full_like(aligned, PAD_ID))
        return shown, real & ~shown_at


def objective_for(
    config: ExperimentConfig, model: Seq2Seq, tokenizer: Tokenizer | None = None
) -> Objective:
    """The objective a run trains ``model`` with: the NAT's masked-LM objective for
    a ``NATransformer``, a sequence-level one when ``train.sequence_level`` is set
    (it scores text: it needs the ``tokenizer``), scheduled sampling when
    ``train.scheduled_sampling`` is, else teacher forcing. A setting the model
    cannot train with is a ``ConfigError`` that names both."""
    tc = config.train
    if tc.sequence_level is not None:
        if not isinstance(model, IncrementalDecoder):
            raise ConfigError(
                "train.sequence_level scores whole sentences a left-to-right decoder writes; "
                f"model.arch {config.model.arch} ({type(model).__name__}) does not write left "
                "to right"
            )
        if tokenizer is None:
            raise ValueError("a sequence-level objective needs the tokenizer (it scores text)")
        return SequenceLevel(SentenceLevelLoss.of(config, tokenizer), tc.label_smoothing)
    if tc.scheduled_sampling is not None and not isinstance(model, IncrementalDecoder):
        counterpart = " (glancing is its counterpart)" if isinstance(model, NATransformer) else ""
        raise ConfigError(
            "train.scheduled_sampling feeds a left-to-right decoder its own previous tokens; "
            f"model.arch {config.model.arch} ({type(model).__name__}) does not decode left "
            f"to right{counterpart}"
        )
    if isinstance(model, NATransformer):
        cfg = model.cfg
        if cfg.length != "classifier":
            return PositionsNAT(tc.label_smoothing, cfg.glancing, cfg.length)
        return MaskedLM(tc.label_smoothing, cfg.length_loss_weight, cfg.glancing)
    if tc.scheduled_sampling is not None:
        return ScheduledSampling(tc.label_smoothing, tc.scheduled_sampling)
    return TeacherForcing(tc.label_smoothing)
