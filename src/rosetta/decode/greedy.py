"""Greedy search: the arg-max token at every step, with the KV cache, on the
decoding engine (``rosetta.decode.engine``).

``TokenRows`` is the bookkeeping it shares with sampling
(``rosetta.decode.sampling``): one hypothesis per sentence, which leaves the
engine when it ends, so the work per step follows the sentences still running.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from rosetta.decode.common import (
    DEFAULT_LENGTHS,
    Found,
    Hypothesis,
    Lengths,
    SearchOptions,
    Trace,
    forbid_tokens,
    force_eos,
)
from rosetta.decode.engine import LeftToRightSearch, Rows
from rosetta.model.interface import Seq2Seq


def forbid_early_eos(logits: torch.Tensor, ages: torch.Tensor, min_len: int) -> torch.Tensor:
    """``forbid_tokens`` for rows at positions ``ages`` (rows,): <pad> and <bos>
    never, <eos> not before ``min_len`` tokens."""
    logits = forbid_tokens(logits, min_len, min_len)  # <pad>, <bos>
    if min_len:
        logits[:, EOS_ID] = logits[:, EOS_ID].masked_fill(ages < min_len, float("-inf"))
    return logits


class TokenRows(Rows):
    """One hypothesis per sentence: at each step ``choose`` picks a token per row
    from its logits (rows, vocab), where forbidden tokens are -inf and a row at its
    length budget may only end.

    A hypothesis's score is its log-probability under the model, which takes a
    vocabulary-wide log-sum-exp per step; with ``scores=False`` it is skipped and
    ``score`` and ``log_prob`` are NaN.
    """

    def __init__(self, lengths: Lengths, scores: bool, trace: bool) -> None:
        super().__init__(lengths, scores, trace)
        self.ages = torch.zeros(0, dtype=torch.long)
        self.budget = torch.zeros(0, dtype=torch.long)
        self.last = torch.zeros(0, dtype=torch.long)  # the token each row read last
        self.outputs = torch.zeros(0, 0, dtype=torch.long)  # (sentences, longest budget)
        self.sums = torch.zeros(0)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The token of every row: the arg-max (sampling draws instead)."""
        return logits.argmax(dim=-1)

    def admit(self, budget: torch.Tensor, sources: Sequence[Sequence[int]], copies: list[int],
              serials: torch.Tensor) -> None:  # fmt: skip
        device, count = budget.device, budget.size(0)
        width = max(self.outputs.size(1), int(budget.max()))
        grow = (0, width - self.outputs.size(1))
        outputs = torch.nn.functional.pad(self.outputs.to(device), grow, value=PAD_ID)
        new = torch.full((count, width), PAD_ID, dtype=torch.long, device=device)
        self.outputs = torch.cat([outputs, new])
        self.ages = torch.cat([self.ages.to(device), torch.zeros_like(budget)])
        self.budget = torch.cat([self.budget.to(device), budget])
        bos = torch.full_like(budget, BOS_ID)
        self.last = torch.cat([self.last.to(device), bos])
        self.sums = torch.cat([self.sums.to(device), torch.zeros(count, device=device)])
        self.budgets_admitted(budget)

    def tokens(self) -> torch.Tensor:
        return self.last

    def advance(self, logits: torch.Tensor) -> tuple[None, torch.Tensor]:
        logits = logits.float()
        # only the chosen token's log-probability is needed: logit - logsumexp
        normalizer = logits.logsumexp(dim=-1) if self.scores else None
        logits = forbid_early_eos(logits, self.ages, self.lengths.min_len)
        if self.budget_may_end():
            logits = force_eos(logits, self.budget <= self.ages + 1)
        tokens = self.choose(logits)
        self.outputs.scatter_(1, self.ages[:, None], tokens[:, None])
        if self.scores:  # a chosen token is never a forbidden one: its raw logit
            self.sums += logits.gather(1, tokens[:, None]).squeeze(1).sub_(normalizer)
        self.ages += 1
        self.last = tokens
        return None, tokens.eq(EOS_ID)

    def results(self, index: torch.Tensor) -> list[Found]:
        scores = self.sums[index] if self.scores else torch.full((len(index),), float("nan"))
        found = []
        for row, score in zip(self.outputs[index].tolist(), scores.tolist()):
            sequence = row[: row.index(EOS_ID)] if EOS_ID in row else row
            tokens = [t for t in sequence if t != PAD_ID]
            trace = Trace.left_to_right(tokens) if self.trace else None
            found.append(Found([Hypothesis(tokens, score, score)], trace))
        return found

    def keep(self, index: torch.Tensor) -> None:
        if not len(index):
            self.emptied()
        self.ages, self.budget = self.ages[index], self.budget[index]
        self.last, self.sums, self.outputs = self.last[index], self.sums[index], self.outputs[index]


@torch.inference_mode()
def greedy_search(
    model: Seq2Seq,
    src: torch.Tensor,
    lengths: Lengths = DEFAULT_LENGTHS,
    with_scores: bool = True,
) -> list[Hypothesis]:
    """Decodes a padded source batch (batch, src_len) with the arg-max token at every
    step; returns one hypothesis per row. Callers that only want the tokens pass
    ``with_scores=False`` (as HF's ``generate`` and CTranslate2 do by default)."""
    search = GreedySearch(GreedySearch.Options())
    return [found.hypotheses[0] for found in search.run(model, src, lengths, scores=with_scores)]


class GreedyOptions(SearchOptions):
    """``kind: greedy``: the most probable token at every step (one hypothesis)."""

    kind: Literal["greedy"] = "greedy"


class GreedySearch(LeftToRightSearch):
    in_ctranslate2 = True
    Options = GreedyOptions

    def rows(self, lengths: Lengths, scores: bool, trace: bool, constrained: bool = False) -> Rows:
        return TokenRows(lengths, scores, trace)

    def for_hypotheses(self, count: int) -> dict[str, Any]:
        # several hypotheses: the beam search just wide enough for them
        return {"search": "beam", "beam": count, "nbest": count} if count > 1 else {}

    def ctranslate2(self, vocab_size: int) -> dict[str, Any]:
        return {"beam_size": 1, "num_hypotheses": 1, "length_penalty": 0.0}
