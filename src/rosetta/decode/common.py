"""Pieces shared by the search algorithms."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rosetta.config import DecodeConfig
from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

# The search functions' defaults are the ``decode`` section's: one place holds them.
DEFAULTS = DecodeConfig()
MAX_LEN = 1024  # the longest output when the caller gives no model limit


@dataclass
class Hypothesis:
    """One output sequence (without <bos>/<eos>) and its score.

    ``score`` is the length-normalised log-probability used for ranking;
    ``log_prob`` the raw sum of token log-probabilities (including <eos>).
    """

    tokens: list[int]
    score: float
    log_prob: float


@dataclass(frozen=True)
class Lengths:
    """How long an output may be: ``a * source length + b`` tokens (<eos> included),
    at most ``limit`` and at least ``min_len`` before <eos> (``min_len`` forces equal
    output lengths when systems are timed against each other)."""

    a: float = DEFAULTS.max_len_a
    b: int = DEFAULTS.max_len_b
    limit: int = MAX_LEN
    min_len: int = 0

    @classmethod
    def of(cls, options: DecodeConfig, limit: int) -> Lengths:
        """The budget a ``decode`` configuration sets, for a model of ``limit`` positions."""
        return cls(options.max_len_a, options.max_len_b, limit)

    def per_source(self, src: torch.Tensor) -> torch.Tensor:
        """(batch,) budgets of a padded source batch (batch, src_len)."""
        source_lengths = src.ne(PAD_ID).sum(dim=1)
        budget = (source_lengths.float() * self.a + self.b).long()
        return budget.clamp(max=self.limit).clamp(min=self.min_len + 1)


DEFAULT_LENGTHS = Lengths()


_FORBIDDEN: dict[tuple[torch.device, bool], torch.Tensor] = {}


def forbid_tokens(log_probs: torch.Tensor, step: int, min_len: int) -> torch.Tensor:
    """Tokens that cannot come next: <pad> and <bos> never, <eos> not before
    ``min_len`` tokens (used to force equal output lengths when timing systems
    against each other). Edits its argument in place, in one ``index_fill_``,
    and works on log-probabilities and logits alike."""
    key = (log_probs.device, step < min_len)
    if key not in _FORBIDDEN:
        ids = [PAD_ID, BOS_ID, EOS_ID] if key[1] else [PAD_ID, BOS_ID]
        _FORBIDDEN[key] = torch.tensor(ids, device=log_probs.device)
    return log_probs.index_fill_(1, _FORBIDDEN[key], float("-inf"))


def force_eos(log_probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows that reached their length budget may only produce <eos>."""
    if rows.any():
        eos = log_probs[rows, EOS_ID].clone()
        log_probs[rows] = float("-inf")
        log_probs[rows, EOS_ID] = eos
    return log_probs


def length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT length penalty ((5 + |Y|) / 6) ** alpha (Wu et al., 2016); 1 when alpha = 0."""
    return ((5.0 + length.float()) / 6.0) ** alpha
