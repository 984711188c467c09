"""The linear-chain CRF of ``model.length: crf`` against brute force over every
sequence, on hand-made cases small enough to enumerate."""

from __future__ import annotations

import itertools

import torch

from rosetta.model.crf import LinearChainCRF

VOCAB, WIDTH = 4, 4


def crf_and_emissions(seed: int = 0) -> tuple[LinearChainCRF, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    crf = LinearChainCRF(VOCAB, rank=3)
    for table in (crf.E1, crf.E2):
        torch.nn.init.normal_(table.weight)  # transitions as large as the emissions
    emissions = torch.randn(2, WIDTH, VOCAB)
    mask = torch.tensor([[True] * WIDTH, [True, True, True, False]])  # row 2: 3 positions
    return crf, emissions, mask


@torch.no_grad()
def every_path(crf: LinearChainCRF, emissions: torch.Tensor, length: int) -> dict[tuple, float]:
    """The score of every sequence of ``length`` tokens, by the CRF's definition."""
    scores = {}
    for path in itertools.product(range(VOCAB), repeat=length):
        total = sum(float(emissions[i, t]) for i, t in enumerate(path))
        for before, after in itertools.pairwise(path):
            total += float(crf.E1.weight[before] @ crf.E2.weight[after])
        scores[path] = total
    return scores


def padded(path: tuple, width: int = WIDTH) -> list[int]:
    return [*path, *[0] * (width - len(path))]


def test_the_likelihood_with_the_whole_vocabulary_in_the_beam_is_exact():
    crf, emissions, mask = crf_and_emissions()
    tokens = torch.tensor([padded((1, 2, 2, 0)), padded((3, 0, 1))])
    got = crf.log_likelihood(emissions, tokens, mask, beam=VOCAB)
    for row, length in enumerate(mask.sum(1).tolist()):
        scores = every_path(crf, emissions[row], length)
        gold = tuple(tokens[row, :length].tolist())
        log_z = torch.logsumexp(torch.tensor(list(scores.values())), 0)
        torch.testing.assert_close(got[row], scores[gold] - log_z, rtol=1e-5, atol=1e-5)
    assert torch.allclose(torch.logsumexp(torch.stack([
        crf.log_likelihood(emissions[:1], torch.tensor([padded(p)]), mask[:1], VOCAB)[0]
        for p in itertools.product(range(VOCAB), repeat=WIDTH)
    ]), 0), torch.tensor(0.0), atol=1e-4)  # fmt: skip  # a distribution: sums to one


def test_a_beam_of_one_keeps_only_the_gold_path():
    crf, emissions, mask = crf_and_emissions(1)
    tokens = torch.tensor([padded((1, 2, 2, 0)), padded((3, 0, 1))])
    assert torch.allclose(crf.log_likelihood(emissions, tokens, mask, beam=1), torch.zeros(2))
    # a beam narrower than the vocabulary sums over fewer paths: a higher likelihood
    narrow = crf.log_likelihood(emissions, tokens, mask, beam=2)
    assert (narrow >= crf.log_likelihood(emissions, tokens, mask, beam=VOCAB) - 1e-6).all()
    assert (narrow <= 1e-6).all()


def test_viterbi_finds_the_best_sequence():
    for seed in range(4):
        crf, emissions, mask = crf_and_emissions(seed)
        tokens, score = crf.viterbi(emissions, mask, beam=VOCAB)
        for row, length in enumerate(mask.sum(1).tolist()):
            scores = every_path(crf, emissions[row], length)
            best = max(scores, key=scores.get)
            assert tuple(tokens[row, :length].tolist()) == best
            assert abs(float(score[row]) - scores[best]) < 1e-4


def test_transitions_choose_a_consistent_pair_where_positions_alone_cannot():
    """Two phrasings, 'a b' and 'b a', equally likely at each position: chosen
    independently, the positions give 'a a' or 'b b' (a repeated word); the CRF's
    transitions, which penalise a repeat, give one of the two phrasings."""
    crf = LinearChainCRF(VOCAB, rank=2)
    with torch.no_grad():
        crf.E1.weight.copy_(torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 0.0]]))
        crf.E2.weight.copy_(torch.tensor([[0.0, 0.0], [-1.0, 1.0], [1.0, -1.0], [0.0, 0.0]]))
    emissions = torch.tensor([[[0.0, 2.0, 1.99, 0.0], [0.0, 2.0, 1.99, 0.0]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert emissions.argmax(-1).tolist() == [[1, 1]]  # position by position: a repeat
    tokens, score = crf.viterbi(emissions, mask, beam=2)
    assert tokens.tolist() in ([[1, 2]], [[2, 1]]) and abs(float(score) - 6.99) < 1e-4


def test_the_likelihood_trains_the_transitions():
    """Gradient reaches both embedding tables and the emissions; a few steps on one
    sequence raise its likelihood."""
    crf, emissions, mask = crf_and_emissions(2)
    emissions.requires_grad_(True)
    tokens = torch.tensor([padded((1, 2, 2, 0)), padded((3, 0, 1))])
    optimizer = torch.optim.SGD([*crf.parameters(), emissions], lr=0.1)
    before = float(crf.log_likelihood(emissions, tokens, mask, 3).sum().detach())
    for _ in range(20):
        loss = -crf.log_likelihood(emissions, tokens, mask, 3).sum()
        optimizer.zero_grad()
        loss.backward()
        assert crf.E1.weight.grad.abs().sum() > 0 and crf.E2.weight.grad.abs().sum() > 0
        assert emissions.grad[1, 3].abs().sum() == 0  # past row 2's length: no gradient
        optimizer.step()
    assert float(crf.log_likelihood(emissions, tokens, mask, 3).sum().detach()) > before + 1.0
