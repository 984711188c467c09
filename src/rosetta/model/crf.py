"""A linear-chain CRF over the non-autoregressive decoder's positions
(``model.length: crf``; Sun et al. 2019, *Fast Structured Decoding for Sequence
Models*).

A NAT picks each position's token on its own, so neighbouring positions cannot
agree: the classic failures are a word repeated at two positions, or one left
out, when the model hesitates between two phrasings. A CRF scores a whole
output sequence y of T positions as

    score(y) = sum_i s_i(y_i) + sum_{i>0} M(y_{i-1}, y_i)

with the decoder's logits as the emission scores s_i and a transition score M
between consecutive tokens, trained by maximising log p(y) = score(y) - log Z
and decoded by Viterbi: still one parallel pass of the decoder, then a dynamic
programme over T positions. Two approximations make it affordable with a
vocabulary of thousands (Sun et al.'s):

- *low rank*: M = E1 E2^T with E1, E2 (vocab, rank) embeddings, so only the
  rows and columns in use are ever formed;
- *beam*: the normaliser Z and Viterbi range over each position's ``beam``
  highest-scoring tokens only (in training the gold token is always among
  them, so the gold path is inside the normaliser and log p(y) <= 0).

Positions past a row's length (``mask`` false) are skipped: the recursion
carries the previous scores through them unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearChainCRF(nn.Module):
    """Low-rank transition scores between target tokens, the beam-approximated
    log-likelihood of a sequence, and Viterbi decoding."""

    def __init__(self, vocab_size: int, rank: int = 32) -> None:
        super().__init__()
        self.E1 = nn.Embedding(vocab_size, rank)
        self.E2 = nn.Embedding(vocab_size, rank)
        # small start: the transitions begin near zero and the CRF near the
        # independent per-position model it refines
        nn.init.normal_(self.E1.weight, std=0.02)
        nn.init.normal_(self.E2.weight, std=0.02)

    def transitions(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """M(before, after): (..., k) x (..., m) token ids -> (..., k, m) scores."""
        return self.E1(before) @ self.E2(after).transpose(-1, -2)

    def score(
        self, emissions: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(batch,) score of each row's ``tokens`` (batch, T) under ``emissions``
        (batch, T, vocab), over its ``mask``ed positions (a prefix of each row)."""
        unary = emissions.gather(2, tokens[..., None]).squeeze(-1)
        pair = (self.E1(tokens[:, :-1]) * self.E2(tokens[:, 1:])).sum(-1)
        return (unary * mask).sum(1) + (pair * mask[:, 1:]).sum(1)

    def _beam(
        self, emissions: torch.Tensor, beam: int, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each position's ``beam`` best tokens (``forced`` among them, where given):
        their ids and emission scores (batch, T, k) and the transitions between
        consecutive positions' beams (batch, T - 1, k, k)."""
        k = min(beam, emissions.size(-1))
        ranked = emissions
        if forced is not None:
            ranked = emissions.scatter(2, forced[..., None], float("inf"))
        ids = ranked.topk(k, dim=2).indices
        return ids, emissions.gather(2, ids), self.transitions(ids[:, :-1], ids[:, 1:])

    def log_likelihood(
        self, emissions: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, beam: int
    ) -> torch.Tensor:
        """(batch,) log p(tokens) = score - log Z, Z summed over the paths through each
        position's ``beam`` best tokens and the gold one."""
        emissions, mask = emissions.float(), mask.bool()
        _, unary, pairs = self._beam(emissions, beam, tokens)
        # per-position views by unbind, not indexing: autograd then gathers the
        # gradients of all steps once instead of a full-size buffer per step
        unary, pairs, keep = unary.unbind(1), pairs.unbind(1), mask[..., None].unbind(1)
        alpha = unary[0]  # (batch, k): log-sum of the paths ending at each token
        for i in range(1, len(unary)):
            step = torch.logsumexp(alpha[:, :, None] + pairs[i - 1], dim=1) + unary[i]
            alpha = torch.where(keep[i], step, alpha)
        return self.score(emissions, tokens, mask.float()) - torch.logsumexp(alpha, dim=1)

    @torch.no_grad()
    def viterbi(
        self, emissions: torch.Tensor, mask: torch.Tensor, beam: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The best path of each row among its positions' ``beam`` best tokens: its
        tokens (batch, T; past a row's length, filler) and score (batch,)."""
        emissions, mask = emissions.float(), mask.bool()
        ids, unary, pairs = self._beam(emissions, beam)
        batch, width, k = ids.shape
        unary, pairs, keep = unary.unbind(1), pairs.unbind(1), mask[..., None].unbind(1)
        best = unary[0]
        same = torch.arange(k, device=ids.device).expand(batch, k)
        pointers = []
        for i in range(1, width):
            step, came_from = (best[:, :, None] + pairs[i - 1]).max(dim=1)
            best = torch.where(keep[i], step + unary[i], best)
            pointers.append(torch.where(keep[i], came_from, same))  # skipped: stay put
        score, last = best.max(dim=1)
        path = [last]
        for came_from in reversed(pointers):
            path.append(came_from.gather(1, path[-1][:, None]).squeeze(1))
        chosen = torch.stack(path[::-1], dim=1)  # (batch, T) beam slots
        return ids.gather(2, chosen[..., None]).squeeze(-1), score
