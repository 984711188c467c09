"""Ancestral sampling with temperature, top-k and nucleus (top-p) filtering.

Any positive temperature gives a distribution, never NaN: the logits are shifted
so the largest is 0 before they are divided (``tempered``), so as the
temperature goes to 0 every other logit goes to -inf and sampling becomes greedy
search, where dividing first would overflow to inf / inf (float32 at about 1e-37
already).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from rosetta.decode.common import DEFAULT_LENGTHS, Hypothesis, Lengths, SearchOptions
from rosetta.decode.engine import LeftToRightSearch, Rows
from rosetta.decode.greedy import TokenRows
from rosetta.model.interface import Seq2Seq

# Below this temperature CTranslate2's float32 division could overflow to NaN; sampling
# there draws the best token, which is what rosetta's sampling does (``tempered``)
GREEDY_TEMPERATURE = 1e-30


class SamplingOptions(SearchOptions):
    """``kind: sampling``: draw each token from the model's distribution; ``nbest``
    samples per input, in the order drawn, seeded by ``seed``."""

    kind: Literal["sampling"] = "sampling"
    nbest: int = Field(
        1, ge=1, description="samples drawn per input", json_schema_extra={"work": True}
    )
    temperature: float = Field(
        1.0, gt=0.0, le=100.0, description="divide the logits by T: > 1 flatter, < 1 sharper"
    )
    top_k: int = Field(
        0, ge=0, le=1_000_000, description="sample among the K likeliest tokens; 0 = all"
    )
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="sample among the likeliest tokens holding probability P"
    )
    seed: int = Field(
        1, ge=0, le=2**32 - 1, description="random seed of the samples (same seed, same output)"
    )


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


HASH_BITS = 31


def _mixed(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of int64 values in [0, 2**31), to [0, 2**31) (two rounds of
    xor-shift-multiply; products stay below 2**58, so int64 never overflows)."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) % (1 << HASH_BITS)
    return x ^ (x >> 16)


def stream_uniforms(seed: int, streams: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform number in (0, 1) per row (float64), a function of the ``seed``, the
    row's ``streams`` id and its ``counters`` (the step) alone: a counter-based
    generator, so what a sentence draws does not depend on the other rows of its
    batch, on when it joined the search, or on the device."""
    base = _mixed(torch.tensor(seed % (1 << HASH_BITS), device=streams.device))
    h = _mixed(_mixed(base ^ streams) ^ (counters % (1 << HASH_BITS)))
    return (h.double() + 0.5) / (1 << HASH_BITS)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The token of each row (rows, vocab) whose cumulative probability first exceeds
    its uniform number (inverse transform sampling): a token of probability 0 is
    never drawn."""
    cdf = probs.double().cumsum(dim=-1)
    at = (uniforms * cdf[:, -1])[:, None]  # below the total: some token exceeds it
    return torch.searchsorted(cdf, at, right=True).squeeze(1).clamp_(max=probs.size(-1) - 1)


def stream_of(ids: Sequence[int], copy: int) -> int:
    """The random stream of sample ``copy`` of a source: from its ids, so the same
    sentence draws the same sample with the same seed wherever it is decoded."""
    digest = zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes())
    return (digest + copy * 0x9E3779B1) % (1 << HASH_BITS)


class SampleRows(TokenRows):
    """``TokenRows`` that draw each token (``SamplingOptions``) from the sentence's
    own stream (``stream_uniforms``)."""

    def __init__(
        self, lengths: Lengths, scores: bool, trace: bool, options: SamplingOptions
    ) -> None:
        super().__init__(lengths, True, trace)  # a sample's log-probability is its score
        self.options = options
        self.streams = torch.zeros(0, dtype=torch.long)

    def admit(self, budget: torch.Tensor, sources: Sequence[Sequence[int]], copies: list[int],
              serials: torch.Tensor) -> None:  # fmt: skip
        super().admit(budget, sources, copies, serials)
        new = [stream_of(ids, copy) for ids, copy in zip(sources, copies)]
        streams = torch.tensor(new, dtype=torch.long, device=budget.device)
        self.streams = torch.cat([self.streams.to(budget.device), streams])

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        opts = self.options
        probs = sampling_probs(logits, opts.temperature, opts.top_k, opts.top_p)
        return draw(probs, stream_uniforms(opts.seed, self.streams, self.ages))

    def keep(self, index: torch.Tensor) -> None:
        super().keep(index)
        self.streams = self.streams[index]


def sample(
    model: Seq2Seq,
    src: torch.Tensor,
    seed: int = SamplingOptions().seed,
    temperature: float = SamplingOptions().temperature,
    top_k: int = SamplingOptions().top_k,
    top_p: float = SamplingOptions().top_p,
    lengths: Lengths = DEFAULT_LENGTHS,
) -> list[Hypothesis]:
    """Draws one translation per source row.

    Tokens are drawn from the model's distribution at ``temperature``, filtered by
    ``top_k``/``top_p``; ``score`` and ``log_prob`` are the sample's log-probability
    under the model itself (temperature 1, unfiltered), the quantity beam and
    greedy search report, so scores of all searches compare. The draws are a
    function of ``seed`` and each source (``stream_of``).
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive (use greedy search for temperature 0)")
    options = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    found = SamplingSearch(options).run(model, src, lengths)
    return [result.hypotheses[0] for result in found]


class SamplingSearch(LeftToRightSearch):
    in_ctranslate2 = True
    random = True
    Options = SamplingOptions
    options: SamplingOptions

    @property
    def seed(self) -> int:
        return self.options.seed

    @property
    def copies(self) -> int:
        return self.options.nbest

    def rows(self, lengths: Lengths, scores: bool, trace: bool, constrained: bool = False) -> Rows:
        return SampleRows(lengths, scores, trace, self.options)

    def ctranslate2(self, vocab_size: int) -> dict[str, Any]:
        """CTranslate2's random sampling (beam 1), as rosetta's sampling reads the
        options: a ``top_k`` over the vocabulary keeps every token (CTranslate2
        refuses it), and a temperature under ``GREEDY_TEMPERATURE`` draws the best
        token (``top_k`` 1), which is what sampling at such a temperature does."""
        opts = self.options
        top_k = 1 if opts.temperature < GREEDY_TEMPERATURE else min(opts.top_k, vocab_size)
        return {
            "beam_size": 1,
            "num_hypotheses": opts.nbest,
            "length_penalty": 0.0,
            "sampling_topk": top_k,
            "sampling_topp": opts.top_p,
            "sampling_temperature": max(opts.temperature, GREEDY_TEMPERATURE),
        }
