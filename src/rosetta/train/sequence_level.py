"""Sequence-level training: minimum risk and REINFORCE against sentence BLEU or chrF.

Token-level cross-entropy trains each position given the gold prefix; the model
is then used on its own prefixes and judged on whole sentences. The objectives
here train on what the model itself writes (SPEC §3, "exposure bias remedies";
``train.sequence_level``, ``rosetta.config.SequenceLevelConfig``), as a
fine-tuning phase from a trained model (``rosetta train CONFIG --init MODEL``):

1. **Candidates**, without gradients, in eval mode, with the one search code:
   ``candidates`` samples per source (``SamplingSearch``, seeded by the run's
   seed and the update, so a resumed run draws what the uninterrupted one drew)
   or beam search's n-best.
2. **Costs**: 1 - sentence score / 100 of each candidate's detokenised text
   against the reference's, by sacreBLEU: BLEU with its default ``exp``
   smoothing and effective order (a short sentence has no zero 4-gram
   precision), or chrF (character 6-grams, beta 2).
3. **One teacher-forced pass** over every candidate of the batch (sources
   repeated, candidates padded to the longest), giving each candidate's
   log-probability log p(c) = sum over its tokens and <eos>, with gradients.
4. **The loss**, per source:

   - ``mrt`` (Shen et al. 2016): over the source's distinct candidates (and the
     reference with ``include_reference``), p~(c) = softmax_c(alpha log p(c))
     with alpha the ``sharpness``, and the risk sum_c p~(c) cost(c);
   - ``reinforce`` (Williams 1992; Ranzato et al. 2016): over the n draws,
     -(1/n) sum_c (r(c) - b(c)) log p(c) with the reward r = 1 - cost and the
     baseline b(c) the mean reward of the source's other draws (leave-one-out:
     it does not depend on c's own draw, so the gradient stays unbiased);

   plus, with ``token_weight`` lambda > 0, the token-level loss (Edunov et al.
   2018): lambda times the batch's label-smoothed loss per target token, counted
   once per sentence, and 1 - lambda times the above.

The objective's ``unit`` is the sentence: the trainer divides the summed terms
by the update's sentence pairs, and the log shows per sentence ``risk`` (the
expected cost under p~, MRT), ``reward`` (the candidates' mean reward),
``candidate_length`` (their mean length in subwords) and ``candidates`` (how
many, distinct ones for MRT). Validation stays teacher forced (``valid_nll``),
with the validation BLEU choosing the best checkpoint as in any run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from sacrebleu.metrics import BLEU, CHRF

from rosetta.config import ExperimentConfig, SequenceLevelConfig
from rosetta.data.batching import Batch
from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from rosetta.decode.beam import BeamOptions, BeamSearch
from rosetta.decode.common import Lengths, Search
from rosetta.decode.sampling import SamplingOptions, SamplingSearch
from rosetta.model.interface import Seq2Seq


class SentenceMetric:
    """Sentence BLEU or chrF of detokenised text by sacreBLEU, as a cost in [0, 1]."""

    def __init__(self, name: str) -> None:
        self.metric = BLEU(effective_order=True) if name == "bleu" else CHRF()

    def cost(self, hypothesis: str, reference: str) -> float:
        """1 - score / 100."""
        return 1.0 - self.metric.sentence_score(hypothesis, [reference]).score / 100.0


def reference_ids(batch: Batch) -> list[list[int]]:
    """Each pair's target ids, without <eos> and padding."""
    return [[t for t in row.tolist() if t not in (PAD_ID, EOS_ID)] for row in batch.tgt_out.cpu()]


def candidate_batch(
    src: torch.Tensor, candidates: Sequence[Sequence[Sequence[int]]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher-forced batch of every candidate: the sources repeated once per
    candidate (candidates, src_len), the decoder input <bos> + candidate and the
    labels candidate + <eos> (candidates, longest + 1), padded."""
    counts = torch.tensor([len(group) for group in candidates], device=src.device)
    flat = [list(c) for group in candidates for c in group]
    width = max(len(c) for c in flat) + 1
    tgt_in = torch.full((len(flat), width), PAD_ID, dtype=torch.long)
    tgt_out = torch.full((len(flat), width), PAD_ID, dtype=torch.long)
    for row, tokens in enumerate(flat):
        tgt_in[row, : len(tokens) + 1] = torch.tensor([BOS_ID, *tokens], dtype=torch.long)
        tgt_out[row, : len(tokens) + 1] = torch.tensor([*tokens, EOS_ID], dtype=torch.long)
    return src.repeat_interleave(counts, dim=0), tgt_in.to(src.device), tgt_out.to(src.device)


def sequence_log_probs(model: Seq2Seq, src: torch.Tensor, tgt_in: torch.Tensor,
                       tgt_out: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """log p(candidate | source), (candidates,): summed over each row's real labels
    (its tokens and <eos>), with gradients; only real positions are projected."""
    states = model.hidden_states(src, tgt_in)  # (candidates, len, d_model)
    real = tgt_out.ne(PAD_ID)
    logits = model.output(states[real])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16: in fp32
    token_lp = -F.cross_entropy(logits, tgt_out[real], reduction="none")
    rows = torch.arange(tgt_out.size(0), device=src.device)[:, None].expand_as(tgt_out)[real]
    summed = torch.zeros(tgt_out.size(0), dtype=token_lp.dtype, device=src.device)
    return summed.index_add(0, rows, token_lp)


def grid(values: torch.Tensor, counts: list[int], fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-candidate ``values`` as (sources, most candidates) with ``fill`` where
    a source has fewer, and the mask of real cells."""
    width = max(counts)
    mask = torch.arange(width)[None, :] < torch.tensor(counts)[:, None]
    mask = mask.to(values.device)
    out = torch.full(mask.shape, fill, dtype=values.dtype, device=values.device)
    return out.masked_scatter(mask, values), mask


def risk(log_probs: torch.Tensor, costs: torch.Tensor, mask: torch.Tensor,
         sharpness: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """MRT's risk per source (sources,) and the renormalised candidate distribution
    p~ (sources, candidates): softmax of ``sharpness`` * log p over each source's
    real candidates (``mask``), zero elsewhere."""
    scores = (sharpness * log_probs).masked_fill(~mask, float("-inf"))
    dist = scores.softmax(dim=1)
    return (dist * costs.masked_fill(~mask, 0.0)).sum(1), dist


def reinforce_loss(log_probs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE with the leave-one-out baseline, per source (sources,): log_probs
    and rewards (sources, n) of n >= 2 draws each."""
    n = rewards.size(1)
    baseline = (rewards.sum(1, keepdim=True) - rewards) / (n - 1)
    return -((rewards - baseline).detach() * log_probs).sum(1) / n


class SentenceLevelLoss:
    """``train.sequence_level``'s loss of a batch (the module docstring):
    candidates, costs, one teacher-forced pass, the risk or REINFORCE loss per
    sentence. ``rosetta.train.objectives.SequenceLevel`` is the objective that
    mixes it with the token-level loss and validates as teacher forcing does."""

    def __init__(
        self, cfg: SequenceLevelConfig, tokenizer: Tokenizer, lengths: Lengths, seed: int
    ) -> None:
        self.cfg, self.tokenizer, self.lengths, self.seed = cfg, tokenizer, lengths, seed
        self.metric = SentenceMetric(cfg.metric)

    @classmethod
    def of(cls, config: ExperimentConfig, tokenizer: Tokenizer) -> SentenceLevelLoss:
        """The loss ``config.train.sequence_level`` asks for; candidates obey the
        ``decode`` section's output budget for the model's positions."""
        tc = config.train
        if tc.sequence_level is None:
            raise ValueError("the configuration has no train.sequence_level section")
        limit = getattr(config.model, "max_positions", 1024) - 1
        return cls(tc.sequence_level, tokenizer, Lengths.of(config.decode, limit), tc.seed)

    def search(self, step: int) -> Search:
        """The candidates' search for update ``step``: samples from a seed of the run's
        seed and the step (what a resumed run draws is what the first one drew)."""
        n = self.cfg.candidates
        if self.cfg.generate == "beam":
            return BeamSearch(BeamOptions(beam=n, nbest=n))
        seed = (self.seed * 1_000_003 + step) % (2**32)
        return SamplingSearch(SamplingOptions(nbest=n, temperature=self.cfg.temperature, seed=seed))

    def candidates(
        self, model: Seq2Seq, batch: Batch, step: int, references: list[list[int]]
    ) -> list[list[list[int]]]:
        """Each source's candidates (token lists): drawn or searched in eval mode
        without gradients; for MRT distinct, with its ``references`` entry on request."""
        training = model.training
        model.eval()
        try:
            found = self.search(step).run(model, batch.src, self.lengths, scores=False)
        finally:
            model.train(training)
        groups = [[h.tokens for h in result.hypotheses] for result in found]
        if self.cfg.method == "reinforce":
            return groups
        distinct = []
        for group, reference in zip(groups, references):
            extra = [reference] if self.cfg.include_reference else []
            distinct.append([list(c) for c in dict.fromkeys(map(tuple, group + extra))])
        return distinct

    def costs(self, candidates: list[list[list[int]]], references: list[list[int]]) -> list[float]:
        """Each candidate's cost against its source's reference (ids), flat."""
        decode = self.tokenizer.decode_target
        return [
            self.metric.cost(decode(c), reference)
            for group, reference in zip(candidates, map(decode, references))
            for c in group
        ]

    def __call__(self, model: Seq2Seq, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Summed over the batch's sentences: ``loss`` (the risk, or REINFORCE's
        surrogate); detached ``risk`` (MRT), ``reward``, ``candidate_length`` and
        ``candidates``."""
        references = reference_ids(batch)
        candidates = self.candidates(model, batch, step, references)
        counts = [len(group) for group in candidates]
        device = batch.src.device
        costs = torch.tensor(self.costs(candidates, references), device=device)
        src, tgt_in, tgt_out = candidate_batch(batch.src, candidates)
        log_probs, mask = grid(sequence_log_probs(model, src, tgt_in, tgt_out), counts, 0.0)
        cost_grid, _ = grid(costs, counts, 0.0)
        count = torch.tensor(counts, dtype=torch.float, device=device)
        reward = ((1.0 - cost_grid) * mask).sum(1) / count
        lengths, _ = grid(tgt_out.ne(PAD_ID).sum(1).float() - 1.0, counts, 0.0)
        terms = {
            "reward": reward.sum().detach(),
            "candidate_length": (lengths.sum(1) / count).sum(),
            "candidates": count.sum(),
        }
        if self.cfg.method == "mrt":
            per_source, _ = risk(log_probs, cost_grid, mask, self.cfg.sharpness)
            terms["risk"] = per_source.sum().detach()
        else:
            per_source = reinforce_loss(log_probs, 1.0 - cost_grid)
        return {"loss": per_source.sum(), **terms}
