"""Ancestral sampling with temperature, top-k and nucleus (top-p) filtering.

Any positive temperature gives a distribution, never NaN: the logits are shifted
so the largest is 0 before they are divided (``tempered``), so as the
temperature goes to 0 every other logit goes to -inf and sampling becomes greedy
search, where dividing first would overflow to inf / inf (float32 at about 1e-37
already).
"""

from __future__ import annotations

import torch

from rosetta.decode.common import DEFAULT_LENGTHS, DEFAULTS, Hypothesis, Lengths
from rosetta.decode.greedy import decode_rows
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


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` less its row maximum, in float32: the best logit of a
    row is 0 and no value is NaN or +inf, whatever the positive temperature (one
    below float32's smallest normal number, about 1e-38, counts as that, which
    changes nothing: every logit below the best is -inf by then). logits: (batch,
    vocab), with -inf where a token is forbidden; a row of -inf only stays -inf."""
    logits = logits.float()
    best = logits.amax(dim=-1, keepdim=True)
    best = best.masked_fill(~best.isfinite(), 0.0)  # a row of -inf: nothing to shift
    return (logits - best) / max(temperature, torch.finfo(torch.float32).tiny)


def sampling_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """The distribution sampling draws from: (batch, vocab) logits at ``temperature``,
    filtered by ``top_k``/``top_p`` (``filter_logits``), softmaxed."""
    return filter_logits(tempered(logits, temperature), top_k, top_p).softmax(dim=-1)


@torch.inference_mode()
def sample(
    model: Seq2Seq,
    src: torch.Tensor,
    generator: torch.Generator | None = None,
    temperature: float = DEFAULTS.temperature,
    top_k: int = DEFAULTS.top_k,
    top_p: float = DEFAULTS.top_p,
    lengths: Lengths = DEFAULT_LENGTHS,
) -> list[Hypothesis]:
    """Draws one translation per source row.

    Tokens are drawn from the model's distribution at ``temperature``, filtered by
    ``top_k``/``top_p``; ``score`` and ``log_prob`` are the sample's log-probability
    under the model itself (temperature 1, unfiltered), the quantity beam and
    greedy search report, so scores of all searches compare.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive (use greedy search for temperature 0)")

    def draw(logits: torch.Tensor) -> torch.Tensor:
        probs = sampling_probs(logits, temperature, top_k, top_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return decode_rows(model, src, draw, lengths, True)
