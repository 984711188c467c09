"""Label-smoothed cross-entropy (SPEC §1 step 9; Szegedy et al., 2016).

The target distribution puts 1 - ε on the gold token and spreads ε uniformly
over the whole vocabulary, so the loss per token is

    (1 - ε) · (-log p(gold)) + ε · mean_v(-log p(v))

Positions whose label is <pad> contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rosetta.data.tokenizer import PAD_ID


def label_smoothed_nll(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (batch, len, vocab), labels (batch, len) -> (loss sum, nll sum) over
    non-padding positions. Callers divide by the number of target tokens."""
    log_probs = F.log_softmax(logits.float(), dim=-1).view(-1, logits.size(-1))
    labels = labels.reshape(-1)
    keep = labels.ne(PAD_ID)
    log_probs, labels = log_probs[keep], labels[keep]
    nll = -log_probs.gather(1, labels[:, None]).squeeze(1)
    uniform = -log_probs.mean(dim=-1)
    loss = (1.0 - smoothing) * nll + smoothing * uniform
    return loss.sum(), nll.sum()
