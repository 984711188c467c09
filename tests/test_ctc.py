"""CTC for the non-autoregressive decoder: collapse, up-sampling, best alignment."""

from __future__ import annotations

import itertools
import math

import torch

from rosetta.model.ctc import BLANK_ID, best_alignment, collapse, decoder_lengths, upsample_index

_ = BLANK_ID


def test_collapse_merges_repeats_then_drops_blanks():
    assert collapse([7, 7, _, 7, 9, 9]) == [7, 7, 9]
    assert collapse([_, _, _]) == []
    assert collapse([5, _, _, 5, 5, 6, _]) == [5, 5, 6]
    assert collapse([]) == []


def test_decoder_lengths_are_capped_and_upsample_reads_each_source_position_in_turn():
    lengths = decoder_lengths(torch.tensor([1, 3, 10, 0]), 2.5, cap=20)
    assert lengths.tolist() == [3, 8, 20, 1]  # ceil(2.5 x), at most the cap, at least 1
    index = upsample_index(torch.tensor([3, 2]), torch.tensor([6, 3]))
    assert index.tolist() == [[0, 0, 1, 1, 2, 2], [0, 0, 1, 0, 0, 0]]


def test_ctc_loss_of_hand_made_cases():
    """PyTorch's ctc_loss with rosetta's blank: the sum over the alignments by hand."""
    vocab = 8
    a = 6
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])  # two positions: p(blank), p(a), other
    log_probs = torch.full((2, vocab), -30.0)
    log_probs[:, BLANK_ID], log_probs[:, a], log_probs[:, 7] = probs.log().unbind(1)
    loss = torch.nn.functional.ctc_loss(
        log_probs[:, None, :], torch.tensor([[a]]), torch.tensor([2]), torch.tensor([1]),
        blank=BLANK_ID, reduction="sum",
    )  # fmt: skip
    # a a, a _, _ a
    by_hand = 0.3 * 0.6 + 0.3 * 0.1 + 0.5 * 0.6
    assert math.isclose(float(loss), -math.log(by_hand), rel_tol=1e-5)


def test_best_alignment_is_the_best_of_all_alignments():
    """Viterbi against every sequence of the positions whose collapse is the target,
    for random scores, targets with repeats, and rows of different lengths."""
    generator = torch.Generator().manual_seed(0)
    vocab = 9
    targets = [[5, 5, 6], [7], [6, 8], []]
    lengths = [7, 4, 5, 3]
    log_probs = torch.randn(len(targets), 7, vocab, generator=generator).log_softmax(-1)
    padded = torch.tensor([t + [0] * (3 - len(t)) for t in targets])
    path = best_alignment(
        log_probs, padded, torch.tensor(lengths), torch.tensor([len(t) for t in targets])
    )
    for row, (target, length) in enumerate(zip(targets, lengths)):
        symbols = sorted({BLANK_ID, *target})
        best, best_score = None, -math.inf
        for candidate in itertools.product(symbols, repeat=length):
            if collapse(list(candidate)) != target:
                continue
            score = sum(float(log_probs[row, t, c]) for t, c in enumerate(candidate))
            if score > best_score:
                best, best_score = list(candidate), score
        assert path[row, :length].tolist() == best
        assert path[row, length:].eq(BLANK_ID).all()
