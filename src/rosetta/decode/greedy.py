"""Greedy search: the arg-max token at every step, batched, with the KV cache.

``decode_rows`` is the loop it shares with sampling (``rosetta.decode.sampling``):
one hypothesis per source row, finished sentences dropped from the batch
(``DecoderState.select_sources``), so the work per step shrinks as they end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from rosetta.decode.common import (
    DEFAULT_LENGTHS,
    Found,
    Hypothesis,
    Lengths,
    Search,
    SearchOptions,
    Trace,
    forbid_tokens,
    force_eos,
)
from rosetta.model.interface import IncrementalDecoder, Seq2Seq


def decode_rows(
    model: Seq2Seq,
    src: torch.Tensor,
    choose: Callable[[torch.Tensor], torch.Tensor],
    lengths: Lengths,
    with_scores: bool,
) -> list[Hypothesis]:
    """The loop of every one-hypothesis-per-row search: at each step ``choose`` picks a
    token per live row from its logits (batch, vocab), where forbidden tokens are -inf
    and a row at its length budget may only end; finished rows leave the batch.

    A hypothesis's score is its log-probability under the model, which takes a
    vocabulary-wide log-sum-exp per step; with ``with_scores=False`` it is skipped
    and ``score`` and ``log_prob`` are NaN.
    """
    batch = src.size(0)
    budget = lengths.per_source(src)
    state = model.init_state(model.encode(src))
    device = src.device
    steps, first_budget = int(budget.max()), int(budget.min())
    alive = torch.arange(batch, device=device)  # original row of each live sentence
    tokens = torch.full((batch,), BOS_ID, dtype=torch.long, device=device)
    # live sentences' outputs and scores, in the order of `alive`; a sentence's are
    # moved to `outputs` and `scores` (by original row) when it leaves the batch
    live_outputs = torch.full((batch, steps), PAD_ID, dtype=torch.long, device=device)
    live_scores = torch.zeros(batch, device=device)
    outputs, scores = live_outputs.clone(), live_scores.clone()
    for step in range(steps):
        logits = model.decode_step(tokens, state).float()
        # only the chosen token's log-probability is needed: logit - logsumexp
        normalizer = logits.logsumexp(dim=-1) if with_scores else None
        logits = forbid_tokens(logits, step, lengths.min_len)
        if step + 1 >= first_budget:  # some sentence may have reached its length budget
            logits = force_eos(logits, budget[alive] <= step + 1)
        tokens = choose(logits)
        live_outputs[:, step] = tokens
        if with_scores:  # a chosen token is never a forbidden one: its raw logit
            live_scores += logits.gather(1, tokens[:, None]).squeeze(1).sub_(normalizer)
        running = tokens.ne(EOS_ID)
        still_running = int(running.sum())  # the one host sync of the step
        if still_running < len(alive):
            done = (~running).nonzero().squeeze(1)
            outputs[alive[done]], scores[alive[done]] = live_outputs[done], live_scores[done]
            if still_running == 0:
                break
            keep = running.nonzero().squeeze(1)
            state.select_sources(keep)
            alive, tokens = alive[keep], tokens[keep]
            live_outputs, live_scores = live_outputs[keep], live_scores[keep]
    else:  # the length budget ends the search for every sentence still running
        outputs[alive], scores[alive] = live_outputs, live_scores
    if not with_scores:
        scores.fill_(float("nan"))
    results = []
    for row, score in zip(outputs.tolist(), scores.tolist()):
        sequence = row[: row.index(EOS_ID)] if EOS_ID in row else row
        results.append(Hypothesis([t for t in sequence if t != PAD_ID], score, score))
    return results


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
    return decode_rows(model, src, lambda logits: logits.argmax(dim=-1), lengths, with_scores)


class GreedyOptions(SearchOptions):
    """``kind: greedy``: the most probable token at every step (one hypothesis)."""

    kind: Literal["greedy"] = "greedy"


class GreedySearch(Search):
    in_ctranslate2 = True
    Options = GreedyOptions
    needs = IncrementalDecoder

    def run(
        self,
        model: Any,
        src: torch.Tensor,
        lengths: Lengths,
        *,
        scores: bool = True,
        trace: bool = False,
        generator: torch.Generator | None = None,
    ) -> list[Found]:
        found = greedy_search(model, src, lengths, with_scores=scores)
        return [Found([h], Trace.left_to_right(h.tokens) if trace else None) for h in found]

    def for_hypotheses(self, count: int) -> dict[str, Any]:
        # several hypotheses: the beam search just wide enough for them
        return {"search": "beam", "beam": count, "nbest": count} if count > 1 else {}

    def ctranslate2(self, vocab_size: int) -> dict[str, Any]:
        return {"beam_size": 1, "num_hypotheses": 1, "length_penalty": 0.0}
