"""Token-budget batching with length bucketing, and the padded ``Batch``.

Pairs are sorted by (target length, source length) with random tie-breaking, cut
into batches whose *padded* size stays within ``max_tokens``, and the batch
order is shuffled. Both the tie-breaking and the shuffle draw from a generator
seeded with ``(seed, epoch)``, so the epoch's batch list is a pure function of
the seed and the epoch number: resuming training just rebuilds it and skips
the batches already seen. With weighted training corpora, an epoch is first a
draw of pairs from each corpus in proportion to its weight (``mix``), from its
own generator seeded the same way.

All of it is vectorised: numpy works a batch at a time, never a pair at a time,
so an epoch of millions of pairs is ordered in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from rosetta.data.arrays import TokenizedSplit
from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclass
class Batch:
    """One padded batch for teacher-forced training.

    src:        (batch, src_len)  source ids, padded with <pad>
    src_lengths:(batch,)          true source lengths
    tgt_in:     (batch, tgt_len)  decoder input: <bos> + target
    tgt_out:    (batch, tgt_len)  label: target + <eos>
    indices:    (batch,)          positions of the pairs in their split
    """

    src: torch.Tensor
    src_lengths: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    indices: torch.Tensor

    @property
    def src_pad_mask(self) -> torch.Tensor:
        """(batch, src_len), True where the source is padding."""
        return self.src.eq(PAD_ID)

    @property
    def num_tgt_tokens(self) -> int:
        """Real target tokens (labels that are not padding), the loss' normaliser."""
        return int(self.tgt_out.ne(PAD_ID).sum())

    def __len__(self) -> int:
        return self.src.size(0)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self.__dict__.values()))


def padded_size(src_len: int, tgt_len: int, n: int) -> int:
    """Tokens a batch of ``n`` pairs costs, padding included (target counts <eos>/<bos>)."""
    return n * max(src_len, tgt_len + 1)


def make_batches(
    src_lengths: np.ndarray,
    tgt_lengths: np.ndarray,
    max_tokens: int,
    seed: int | None = None,
    epoch: int = 0,
    max_sentences: int = 0,
    bucket: bool = True,
) -> list[np.ndarray]:
    """Groups pair indices into batches of at most ``max_tokens`` padded tokens.

    With ``seed=None`` the order is deterministic and unshuffled (for
    evaluation); otherwise ties are broken and batches shuffled with a
    generator seeded by ``(seed, epoch)``. A pair longer than the budget gets a
    batch of its own rather than being dropped. ``bucket=False`` keeps the
    pairs in (seeded) random order instead of sorting them by length.

    Batches are cut greedily along the order: a batch ends before the first
    pair that would take its padded size over the budget (or its count over
    ``max_sentences``). The padded size of a growing batch only grows, so each
    cut is the first ``True`` of a vectorised test over a window of the order,
    made twice the last batch's size (and doubled until it holds the cut).
    """
    n = len(src_lengths)
    rng = np.random.default_rng([seed, epoch]) if seed is not None else None
    tie_break = rng.permutation(n) if rng is not None else np.arange(n)
    # without bucketing the pairs stay in (seeded) random order: the benchmark baseline
    order = np.lexsort((tie_break, src_lengths, tgt_lengths)) if bucket else tie_break
    del tie_break
    src_sorted, tgt_sorted = np.asarray(src_lengths)[order], np.asarray(tgt_lengths)[order]
    batches, start, window = [], 0, 64
    while start < n:
        while True:
            end = min(n, start + window)
            size = np.arange(1, end - start + 1, dtype=np.int64)  # size * length: no overflow
            longest = np.maximum(
                np.maximum.accumulate(src_sorted[start:end]),
                np.maximum.accumulate(tgt_sorted[start:end]) + 1,
            )
            over = size * longest > max_tokens  # padded_size of each prefix
            if max_sentences:
                over |= size > max_sentences
            over[0] = False  # a batch holds at least one pair
            cut = int(over.argmax())
            if cut:
                end = start + cut
                break
            if end == n:
                break
            window *= 2
        batches.append(order[start:end])
        window = 2 * (end - start) + 2
        start = end
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def mix(corpora: list[tuple[int, int, float]], seed: int, epoch: int) -> np.ndarray:
    """One epoch's draw of training pairs from weighted corpora.

    ``corpora`` holds each corpus' pairs ``[first, end)`` in the split and its
    weight. The epoch has as many pairs as the corpora together; corpus ``c``
    gives ``round(total * weight_c / sum of weights)`` of them: whole passes over
    it in a random order, then a random subset without repeats (a corpus is
    over-sampled by repeating it, under-sampled by a subset; every pair of it
    is seen before any is seen again). Deterministic in ``(seed, epoch)``.
    """
    rng = np.random.default_rng([seed, epoch, 1])  # a stream apart from make_batches'
    total = sum(end - first for first, end, _ in corpora)
    weights = np.array([weight for _, _, weight in corpora], dtype=np.float64)
    shares = np.round(total * weights / weights.sum()).astype(np.int64)
    drawn = []
    for (first, end, _), share in zip(corpora, shares):
        size = end - first
        passes, rest = divmod(int(share), size) if size else (0, 0)
        drawn += [first + rng.permutation(size) for _ in range(passes)]
        drawn.append(first + rng.permutation(size)[:rest])
    return np.concatenate(drawn) if drawn else np.zeros(0, dtype=np.int64)


def collate(split: TokenizedSplit, indices: np.ndarray) -> Batch:
    """Pads the pairs at ``indices`` into a ``Batch`` (shift-right done here)."""
    src_lengths = split.src_lengths[indices]
    tgt_lengths = split.tgt_lengths[indices] + 1
    src = np.full((len(indices), src_lengths.max()), PAD_ID, dtype=np.int64)
    tgt_in = np.full((len(indices), tgt_lengths.max()), PAD_ID, dtype=np.int64)
    tgt_out = np.full_like(tgt_in, PAD_ID)
    for row, index in enumerate(indices):
        source, target = split.source(index), split.target(index)
        src[row, : len(source)] = source
        tgt_in[row, 0] = BOS_ID
        tgt_in[row, 1 : len(target) + 1] = target
        tgt_out[row, : len(target)] = target
        tgt_out[row, len(target)] = EOS_ID
    return Batch(
        src=torch.from_numpy(src),
        src_lengths=torch.from_numpy(src_lengths.astype(np.int64)),
        tgt_in=torch.from_numpy(tgt_in),
        tgt_out=torch.from_numpy(tgt_out),
        indices=torch.from_numpy(np.asarray(indices, dtype=np.int64)),
    )


@dataclass
class Update:
    """One optimizer update's share of the data on this process.

    end:     the epoch's batch index after the update (the resume position)
    tokens:  real target tokens of the whole update, on every process (the
             gradient's normaliser for a token-level objective)
    batches: this process's micro-batches
    sentences: sentence pairs of the whole update, on every process (the
             normaliser for a sentence-level one)
    """

    end: int
    tokens: int
    batches: list[Batch]
    sentences: int

    def count(self, unit: str) -> int:
        """The update's ``tokens`` or ``sentences`` (``unit``: "token" or "sentence")."""
        return self.tokens if unit == "token" else self.sentences


class BatchIterator:
    """Epochs of token-budget batches over a ``TokenizedSplit``.

    ``epoch_batches(epoch)`` is deterministic for the iterator's seed, which is
    what makes exact resume possible (see ``rosetta.train.trainer``).
    """

    def __init__(
        self,
        split: TokenizedSplit,
        max_tokens: int,
        seed: int | None = 1,
        corpora: list[tuple[int, int, float]] | None = None,
    ) -> None:
        self.split = split
        self.max_tokens = max_tokens
        self.seed = seed
        self.corpora = corpora  # weighted corpora to ``mix`` each epoch, or None: all pairs
        self._latest: tuple[int, list[np.ndarray]] | None = None

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches, as indices of pairs in the split. The latest epoch's
        are kept: the batch count, the padding figure and the training loop ask
        for the same epoch, and at millions of pairs it takes seconds to order."""
        if self._latest is None or self._latest[0] != epoch:
            self._latest = (epoch, self._order(epoch))
        return self._latest[1]

    def _order(self, epoch: int) -> list[np.ndarray]:
        if self.corpora is None:
            return make_batches(
                self.split.src_lengths, self.split.tgt_lengths, self.max_tokens, self.seed, epoch
            )
        drawn = mix(self.corpora, self.seed or 0, epoch)
        batches = make_batches(
            self.split.src_lengths[drawn],
            self.split.tgt_lengths[drawn],
            self.max_tokens,
            self.seed,
            epoch,
        )
        return [drawn[batch] for batch in batches]

    def updates(
        self, epoch: int, start: int = 0, per_rank: int = 1, rank: int = 0, world_size: int = 1
    ) -> Iterator[Update]:
        """The updates of ``epoch`` from global batch ``start`` on.

        Each update takes the next ``per_rank * world_size`` batches of the epoch's
        order; process ``rank`` collates its ``per_rank`` of them (one process
        with ``per_rank = 2`` trains on exactly the batches two processes with
        ``per_rank = 1`` share). The last ``< per_rank * world_size`` batches of an
        epoch make no update; the next epoch's order is a new shuffle.
        """
        batches = self.epoch_batches(epoch)
        size = per_rank * world_size
        for first in range(start, len(batches) - size + 1, size):
            group = batches[first : first + size]
            tokens = sum(int(self.split.tgt_lengths[b].sum()) + len(b) for b in group)  # + <eos>
            mine = group[rank * per_rank : (rank + 1) * per_rank]
            sentences = sum(len(b) for b in group)
            yield Update(first + size, tokens, [collate(self.split, b) for b in mine], sentences)

    def padding_fraction(self, epoch: int = 0) -> float:
        """Fraction of the padded source+target cells that are padding."""
        real = padded = 0
        src_len, tgt_len = self.split.src_lengths, self.split.tgt_lengths + 1
        for indices in self.epoch_batches(epoch):
            real += int(src_len[indices].sum() + tgt_len[indices].sum())
            padded += len(indices) * int(src_len[indices].max() + tgt_len[indices].max())
        return 1.0 - real / max(padded, 1)
