"""Ancestral sampling with temperature, top-k and nucleus (top-p) filtering."""

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


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sets to -inf every logit outside the top-k and outside the smallest set whose
    probability mass reaches top-p (both optional). logits: (batch, vocab)."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        drop_sorted = mass_before >= top_p  # the token that crosses top-p is kept
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.inference_mode()
def sample(
    model: Seq2Seq,
    src: torch.Tensor,
    temperature: float = DEFAULTS.temperature,
    top_k: int = DEFAULTS.top_k,
    top_p: float = DEFAULTS.top_p,
    max_len_a: float = DEFAULTS.max_len_a,
    max_len_b: int = DEFAULTS.max_len_b,
    max_len: int = MAX_LEN,
    min_len: int = 0,
    generator: torch.Generator | None = None,
) -> list[Hypothesis]:
    """Draws one translation per source row.

    Tokens are drawn from the model's distribution at ``temperature``, filtered by
    ``top_k``/``top_p``; ``score`` and ``log_prob`` are the sample's log-probability
    under the model itself (temperature 1, unfiltered), the quantity beam and
    greedy search report, so scores of all searches compare.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive (use greedy search for temperature 0)")
    batch = src.size(0)
    budget = max_lengths(source_lengths(src), max_len_a, max_len_b, max_len, min_len)
    state = model.init_state(model.encode(src))
    tokens = torch.full((batch,), BOS_ID, dtype=torch.long, device=src.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
    out = torch.full((batch, int(budget.max())), PAD_ID, dtype=torch.long, device=src.device)
    log_prob = torch.zeros(batch, device=src.device)
    for step in range(int(budget.max())):
        model_logits = model.decode_step(tokens, state).float()
        normalizer = model_logits.logsumexp(dim=-1)
        logits = forbid_tokens(model_logits / temperature, step, min_len)
        logits = filter_logits(force_eos(logits, budget <= step + 1), top_k, top_p)
        probs = logits.softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tokens = tokens.masked_fill(finished, EOS_ID)
        chosen = model_logits.gather(1, tokens[:, None]).squeeze(1) - normalizer
        log_prob += torch.where(finished, 0.0, chosen)
        out[:, step] = tokens.masked_fill(finished, PAD_ID)
        finished |= tokens.eq(EOS_ID)
        if bool(finished.all()):
            break
    results = []
    for row in range(batch):
        seq = out[row][(out[row] != PAD_ID) & (out[row] != EOS_ID)].tolist()
        results.append(Hypothesis(seq, float(log_prob[row]), float(log_prob[row])))
    return results
