"""Token-budget batching: budget, coverage, shift-right, determinism, padding."""

from __future__ import annotations

import numpy as np

from rosetta.data.arrays import TokenizedSplit
from rosetta.data.batching import BatchIterator, collate, make_batches, padded_size
from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


def random_split(n: int = 500, seed: int = 0) -> TokenizedSplit:
    rng = np.random.default_rng(seed)
    src = [list(rng.integers(4, 100, rng.integers(1, 40))) for _ in range(n)]
    tgt = [list(rng.integers(4, 100, max(1, len(s) + rng.integers(-3, 4)))) for s in src]
    return TokenizedSplit.from_lists(src, tgt)


def test_batches_respect_the_budget_and_cover_every_pair_once():
    split = random_split()
    batches = make_batches(split.src_lengths, split.tgt_lengths, 600, seed=1, epoch=0)
    for indices in batches:
        size = padded_size(
            split.src_lengths[indices].max(), split.tgt_lengths[indices].max(), len(indices)
        )
        assert size <= 600
    every = np.sort(np.concatenate(batches))
    assert np.array_equal(every, np.arange(len(split)))


def test_over_long_pair_gets_its_own_batch():
    batches = make_batches(np.array([5, 50, 5]), np.array([5, 50, 5]), 20)
    assert sorted(len(b) for b in batches) == [1, 2]


def test_determinism_under_a_seed_and_reshuffling_between_epochs():
    split = random_split()
    iterator = BatchIterator(split, 800, seed=3)
    first = [b.tolist() for b in iterator.epoch_batches(0)]
    assert first == [b.tolist() for b in BatchIterator(split, 800, seed=3).epoch_batches(0)]
    assert first != [b.tolist() for b in iterator.epoch_batches(1)]
    assert first != [b.tolist() for b in BatchIterator(split, 800, seed=4).epoch_batches(0)]


def test_collate_shifts_the_target_right():
    split = TokenizedSplit.from_lists([[10, 11, 12], [13]], [[20, 21], [22, 23, 24]])
    batch = collate(split, np.array([0, 1]))
    assert batch.src.tolist() == [[10, 11, 12], [13, PAD_ID, PAD_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 20, 21, PAD_ID], [BOS_ID, 22, 23, 24]]
    assert batch.tgt_out.tolist() == [[20, 21, EOS_ID, PAD_ID], [22, 23, 24, EOS_ID]]
    assert batch.src_lengths.tolist() == [3, 1]
    assert batch.src_pad_mask.tolist() == [[False, False, False], [False, True, True]]
    assert batch.num_tgt_tokens == 7


def test_resume_position_iterates_the_remaining_batches():
    iterator = BatchIterator(random_split(), 700, seed=2)
    everything = [u.batches[0].indices.tolist() for u in iterator.updates(epoch=1)]
    rest = [u.batches[0].indices.tolist() for u in iterator.updates(epoch=1, start=5)]
    assert rest == everything[5:]
    assert [u.end for u in iterator.updates(epoch=1, start=5)][:2] == [6, 7]


def test_ranks_share_the_global_order_of_one_process_with_accumulation():
    iterator = BatchIterator(random_split(), 700, seed=2)
    order = [b.tolist() for b in iterator.epoch_batches(3)]
    single = list(iterator.updates(3, start=1, per_rank=4))
    ranks = [list(iterator.updates(3, start=1, per_rank=2, rank=r, world_size=2)) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == (len(order) - 1) // 4
    for k, update in enumerate(single):
        seen = [b.indices.tolist() for b in update.batches]
        assert seen == order[1 + 4 * k : 5 + 4 * k]  # the global order, the remainder unused
        shared = [b.indices.tolist() for r in ranks for b in r[k].batches]
        assert shared == seen
        tokens = sum(b.num_tgt_tokens for b in update.batches)
        assert update.tokens == ranks[0][k].tokens == ranks[1][k].tokens == tokens
        assert update.end == ranks[1][k].end == 5 + 4 * k


def test_padding_is_small_with_length_bucketing():
    split = random_split(n=3000)
    bucketed = BatchIterator(split, 4096, seed=1).padding_fraction()
    # the same batch sizes drawn in random order, as a batcher without bucketing would
    src, tgt = split.src_lengths, split.tgt_lengths + 1
    order = np.random.default_rng(0).permutation(len(split))
    real = padded = 0
    for chunk in np.array_split(order, len(BatchIterator(split, 4096, seed=1).epoch_batches(0))):
        real += src[chunk].sum() + tgt[chunk].sum()
        padded += len(chunk) * (src[chunk].max() + tgt[chunk].max())
    unsorted = 1 - real / padded
    assert bucketed < 0.12  # real corpora, with correlated lengths, do better (prepare test)
    assert bucketed < unsorted / 3
