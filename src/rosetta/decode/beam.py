"""Batched beam search with GNMT length penalty and n-best lists.

All bookkeeping is on tensors of shape (batch, beam, ...): there is no Python
loop over hypotheses. Each step takes the top ``2 * beam`` continuations of
every sentence; those ending in <eos> compete for the ``beam`` finished slots
(scored with the length penalty), the best ``beam`` others stay alive.

A sentence stops when its worst finished hypothesis beats the best score any
live one could still reach: log-probabilities only fall as a hypothesis grows,
so a live score ``s`` can at best become ``s / lp(max_len)``. With this exact
stopping rule a beam wide enough to hold every prefix returns the same best
sequence as exhaustive search (see the tests).
"""

from __future__ import annotations

import torch

from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from rosetta.decode.common import (
    Hypothesis,
    forbid_eos,
    forbid_specials,
    force_eos,
    length_penalty,
    max_lengths,
    source_lengths,
)
from rosetta.model.interface import Seq2SeqModel

NEG_INF = float("-inf")


@torch.inference_mode()
def beam_search(
    model: Seq2SeqModel,
    src: torch.Tensor,
    beam: int = 5,
    alpha: float = 0.6,
    nbest: int = 1,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    max_len: int = 1024,
    min_len: int = 0,
) -> list[list[Hypothesis]]:
    """Decodes a padded source batch (batch, src_len) into ``nbest`` hypotheses per row,
    best first."""
    if not 1 <= nbest <= beam:
        raise ValueError(f"nbest must be between 1 and the beam size ({beam}), got {nbest}")
    device = src.device
    batch = src.size(0)
    budget = max_lengths(source_lengths(src), max_len_a, max_len_b, max_len, min_len)  # (batch,)
    steps = int(budget.max())
    state = model.init_state(model.encode(src))
    state.select(torch.arange(batch, device=device).repeat_interleave(beam))
    offsets = (torch.arange(batch, device=device) * beam)[:, None]  # (batch, 1)

    # Live hypotheses; only beam 0 starts alive so the first step has no duplicates.
    scores = torch.full((batch, beam), NEG_INF, device=device)
    scores[:, 0] = 0.0
    alive = torch.empty((batch, beam, 0), dtype=torch.long, device=device)
    tokens = torch.full((batch * beam,), BOS_ID, dtype=torch.long, device=device)
    # Finished hypotheses (tokens without <eos>), best first.
    fin_scores = torch.full((batch, beam), NEG_INF, device=device)
    fin_log_probs = torch.full((batch, beam), NEG_INF, device=device)
    fin_tokens = torch.full((batch, beam, steps), PAD_ID, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    row_budget = budget.repeat_interleave(beam)  # (batch * beam,)

    for step in range(steps):
        log_probs = model.decode_step(tokens, state).log_softmax(-1).float()
        log_probs = forbid_eos(forbid_specials(log_probs), step, min_len)
        log_probs = force_eos(log_probs, row_budget <= step + 1)
        vocab = log_probs.size(-1)
        # (batch, beam * vocab): score of every one-token continuation
        candidates = (scores.view(-1, 1) + log_probs).view(batch, beam * vocab)
        top_scores, top_index = candidates.topk(min(2 * beam, beam * vocab), dim=1)
        origin, token = top_index // vocab, top_index % vocab  # (batch, 2 * beam)
        ends = token.eq(EOS_ID)

        # Finished: merge this step's <eos> candidates into the n-best so far.
        penalty = length_penalty(torch.tensor(step + 1, device=device), alpha)
        new_fin = torch.where(ends & ~done[:, None], top_scores / penalty, NEG_INF)
        prefix = alive.gather(1, origin[..., None].expand(-1, -1, step))  # (batch, 2b, step)
        prefix = torch.nn.functional.pad(prefix, (0, steps - step), value=PAD_ID)
        pool_scores = torch.cat([fin_scores, new_fin], dim=1)  # (batch, 3 * beam)
        fin_scores, pick = pool_scores.topk(beam, dim=1)
        fin_log_probs = torch.cat([fin_log_probs, top_scores], 1).gather(1, pick)
        pool_tokens = torch.cat([fin_tokens, prefix], dim=1)
        fin_tokens = pool_tokens.gather(1, pick[..., None].expand(-1, -1, steps))

        # Alive: the best `beam` continuations that did not end.
        alive_scores, keep = torch.where(ends, NEG_INF, top_scores).topk(beam, dim=1)
        origin, token = origin.gather(1, keep), token.gather(1, keep)  # (batch, beam)
        alive = torch.cat(
            [alive.gather(1, origin[..., None].expand(-1, -1, step)), token[..., None]], dim=2
        )
        state.select((origin + offsets).view(-1))
        tokens, scores = token.view(-1), alive_scores

        best_reachable = scores.max(dim=1).values / length_penalty(budget, alpha)
        done |= fin_scores[:, -1] >= best_reachable
        if bool(done.all()):
            break

    results = []
    for row in range(batch):
        hyps = []
        for rank in range(nbest):
            seq = fin_tokens[row, rank]
            hyps.append(
                Hypothesis(
                    seq[seq.ne(PAD_ID)].tolist(),
                    float(fin_scores[row, rank]),
                    float(fin_log_probs[row, rank]),
                )
            )
        results.append(hyps)
    return results
