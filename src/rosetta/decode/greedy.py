"""Greedy search: the arg-max token at every step, batched, with the KV cache.

Finished sentences are dropped from the batch (``DecoderState.select``), so
the work per step shrinks as sentences end.
"""

from __future__ import annotations

import torch

from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from rosetta.decode.common import (
    DEFAULTS,
    MAX_LEN,
    Hypothesis,
    forbid_tokens,
    force_eos,
    max_lengths,
    source_lengths,
)
from rosetta.model.interface import Seq2Seq


@torch.inference_mode()
def greedy_search(
    model: Seq2Seq,
    src: torch.Tensor,
    max_len_a: float = DEFAULTS.max_len_a,
    max_len_b: int = DEFAULTS.max_len_b,
    max_len: int = MAX_LEN,
    min_len: int = 0,
    with_scores: bool = True,
) -> list[Hypothesis]:
    """Decodes a padded source batch (batch, src_len); returns one hypothesis per row.

    A hypothesis's score is its log-probability, which takes a vocabulary-wide
    log-sum-exp per step (~3% of a step of ``small`` at batch 32). Callers that
    only want the tokens pass ``with_scores=False`` (``Translator`` does; HF's
    ``generate`` and CTranslate2 skip scores by default too); ``score`` and
    ``log_prob`` are NaN then.
    """
    batch = src.size(0)
    budget = max_lengths(source_lengths(src), max_len_a, max_len_b, max_len, min_len)
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
        # the arg-max of the logits is the arg-max of the log-probabilities; only
        # the chosen token's log-probability is needed: logit - logsumexp
        normalizer = logits.logsumexp(dim=-1) if with_scores else None
        logits = forbid_tokens(logits, step, min_len)
        if step + 1 >= first_budget:  # some sentence may have reached its length budget
            logits = force_eos(logits, budget[alive] <= step + 1)
        best, tokens = logits.max(dim=-1)
        live_outputs[:, step] = tokens
        if with_scores:
            live_scores += best.sub_(normalizer)
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
