"""Batched beam search with GNMT length penalty and n-best lists.

All bookkeeping is on tensors of shape (sentences, beam, ...): there is no
Python loop over hypotheses, and a sentence whose search is over leaves the
batch, so the model only runs on sentences still searching. Each step takes
the top ``2 * beam`` continuations of every sentence; those ending in <eos>
compete for the ``beam`` finished slots (scored with the length penalty), the
best ``beam`` others stay alive.

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
    DEFAULT_LENGTHS,
    DEFAULTS,
    Hypothesis,
    Lengths,
    forbid_tokens,
    force_eos,
    length_penalty,
)
from rosetta.model.interface import Seq2Seq

NEG_INF = float("-inf")


@torch.inference_mode()
def beam_search(
    model: Seq2Seq,
    src: torch.Tensor,
    beam: int = DEFAULTS.beam,
    alpha: float = DEFAULTS.length_penalty,
    nbest: int = DEFAULTS.nbest,
    lengths: Lengths = DEFAULT_LENGTHS,
) -> list[list[Hypothesis]]:
    """Decodes a padded source batch (batch, src_len) into ``nbest`` hypotheses per row,
    best first."""
    if not 1 <= nbest <= beam:
        raise ValueError(f"nbest must be between 1 and the beam size ({beam}), got {nbest}")
    device = src.device
    batch = src.size(0)
    budget = lengths.per_source(src)  # (batch,)
    steps, first_budget = int(budget.max()), int(budget.min())
    state = model.init_state(model.encode(src))
    # The first step reads only <bos>, the same for a sentence's whole beam: it runs
    # once per sentence, and the sentence gets its beam hypotheses (sharing its
    # encoder side) afterwards.
    bos = torch.full((batch,), BOS_ID, dtype=torch.long, device=device)
    first_logits = model.decode_step(bos, state)
    state.expand(beam)
    tokens = bos.repeat_interleave(beam)  # (batch * beam,): what each hypothesis read last

    # Results of finished sentences, by original row.
    out_scores = torch.full((batch, beam), NEG_INF, device=device)
    out_log_probs = torch.full((batch, beam), NEG_INF, device=device)
    out_tokens = torch.full((batch, beam, steps), PAD_ID, dtype=torch.long, device=device)

    # Working set: the sentences still searching (`active` holds their original rows).
    active = torch.arange(batch, device=device)
    # Live hypotheses; only beam 0 starts alive so the first step has no duplicates.
    scores = torch.full((batch, beam), NEG_INF, device=device)
    scores[:, 0] = 0.0
    alive = torch.empty((batch, beam, 0), dtype=torch.long, device=device)
    # Finished hypotheses of the active sentences (tokens without <eos>), best first.
    fin_scores = torch.full((batch, beam), NEG_INF, device=device)
    fin_log_probs = torch.full((batch, beam), NEG_INF, device=device)
    fin_tokens = torch.full((batch, beam, steps), PAD_ID, dtype=torch.long, device=device)

    for step in range(steps):
        n = len(active)
        if step == 0:  # rows of beam 0, the only one alive, are what count
            logits = first_logits.float().repeat_interleave(beam, dim=0)
        else:
            logits = model.decode_step(tokens, state).float()  # (n * beam, vocab)
        normalizer = logits.logsumexp(dim=-1, keepdim=True)
        logits = forbid_tokens(logits, step, lengths.min_len)
        if step + 1 >= first_budget:  # some sentence may have reached its length budget
            row_budget = budget[active].repeat_interleave(beam)  # (n * beam,)
            logits = force_eos(logits, row_budget <= step + 1)
        # Every hypothesis's best 2 * beam continuations hold the sentence's best
        # 2 * beam: a continuation outranked within its own row is outranked overall.
        vocab = logits.size(-1)
        width = min(2 * beam, vocab)
        row_logits, row_tokens = logits.topk(width, dim=-1)  # (n * beam, width)
        candidates = (scores.view(-1, 1) + (row_logits - normalizer)).view(n, beam * width)
        top_scores, top_index = candidates.topk(min(2 * beam, beam * width), dim=1)
        origin = top_index // width  # (n, 2 * beam): the hypothesis each one extends
        token = row_tokens.view(n, beam * width).gather(1, top_index)
        ends = token.eq(EOS_ID)

        # Finished: merge this step's <eos> candidates into the n-best so far.
        penalty = length_penalty(torch.tensor(step + 1, device=device), alpha)
        new_fin = torch.where(ends, top_scores / penalty, NEG_INF)
        prefix = alive.gather(1, origin[..., None].expand(-1, -1, step))  # (n, 2b, step)
        prefix = torch.nn.functional.pad(prefix, (0, steps - step), value=PAD_ID)
        fin_scores, pick = torch.cat([fin_scores, new_fin], dim=1).topk(beam, dim=1)
        fin_log_probs = torch.cat([fin_log_probs, top_scores], 1).gather(1, pick)
        pool_tokens = torch.cat([fin_tokens, prefix], dim=1)
        fin_tokens = pool_tokens.gather(1, pick[..., None].expand(-1, -1, steps))

        # Alive: the best `beam` continuations that did not end.
        scores, keep = torch.where(ends, NEG_INF, top_scores).topk(beam, dim=1)
        origin, token = origin.gather(1, keep), token.gather(1, keep)  # (n, beam)
        alive = torch.cat(
            [alive.gather(1, origin[..., None].expand(-1, -1, step)), token[..., None]], dim=2
        )
        offsets = (torch.arange(n, device=device) * beam)[:, None]  # (n, 1)
        state.select((origin + offsets).view(-1))
        tokens = token.view(-1)

        best_reachable = scores.max(dim=1).values / length_penalty(budget[active], alpha)
        done = fin_scores[:, -1] >= best_reachable
        if step == steps - 1:
            done[:] = True
        if bool(done.any()):
            # store the finished sentences' n-best and drop them from the working set
            rows = active[done]
            out_scores[rows], out_log_probs[rows] = fin_scores[done], fin_log_probs[done]
            out_tokens[rows] = fin_tokens[done]
            if bool(done.all()):
                break
            keep = (~done).nonzero().squeeze(1)
            active = active[keep]
            scores, alive, tokens = scores[keep], alive[keep], tokens.view(n, beam)[keep].view(-1)
            fin_scores, fin_log_probs = fin_scores[keep], fin_log_probs[keep]
            fin_tokens = fin_tokens[keep]
            state.select_sources(keep)

    results = []
    for row in range(batch):
        hyps = []
        for rank in range(nbest):
            seq = out_tokens[row, rank]
            hyps.append(
                Hypothesis(
                    seq[seq.ne(PAD_ID)].tolist(),
                    float(out_scores[row, rank]),
                    float(out_log_probs[row, rank]),
                )
            )
        results.append(hyps)
    return results
