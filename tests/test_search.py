"""Search algorithms: beam = exhaustive search, beam 1 = greedy, batch independence."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rosetta.config import TransformerConfig
from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from rosetta.decode import beam_search, greedy_search, sample
from rosetta.decode.common import Lengths, length_penalty
from rosetta.decode.sampling import draw, filter_logits, stream_uniforms
from rosetta.model import build_model


def make_model(vocab: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        d_model=32, d_ff=64, heads=2, encoder_layers=1, decoder_layers=2, dropout=0
    )
    model = build_model(cfg, vocab, vocab).eval()
    with torch.no_grad():  # sharper distributions: fewer near-ties between sequences
        model.output.weight.mul_(4.0)
    return model


def sequence_log_prob(model, src: torch.Tensor, tokens: list[int]) -> float:
    """Log-probability of ``tokens + <eos>`` by a full teacher-forced pass."""
    tgt_in = torch.tensor([[BOS_ID, *tokens]])
    labels = torch.tensor([*tokens, EOS_ID])
    with torch.no_grad():
        log_probs = model(src, tgt_in).log_softmax(-1)[0]
    return float(log_probs.gather(1, labels[:, None]).sum())


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_equals_exhaustive_search(alpha, seed):
    vocab = 6  # <pad> <unk> <bos> <eos> and two real tokens
    model = make_model(vocab, seed)
    src = torch.tensor([[4, 5, 4]])
    max_tokens = 4  # output budget including <eos>
    words = [UNK_ID, 4, 5]  # everything but <pad>, <bos> (never generated) and <eos>
    scored = []
    for length in range(max_tokens):
        for seq in itertools.product(words, repeat=length):
            log_prob = sequence_log_prob(model, src, list(seq))
            penalty = float(length_penalty(torch.tensor(length + 1), alpha))
            scored.append((log_prob / penalty, list(seq)))
    scored.sort(key=lambda item: -item[0])

    beam = len(words) ** (max_tokens - 1)  # holds every prefix
    found = beam_search(
        model, src, beam=beam, alpha=alpha, nbest=5, lengths=Lengths(0.0, max_tokens)
    )[0]
    assert found[0].tokens == scored[0][1]
    assert found[0].score == pytest.approx(scored[0][0], abs=1e-4)
    assert [h.tokens for h in found] == [seq for _, seq in scored[:5]]


def test_beam_one_equals_greedy():
    model = make_model(30)
    src = torch.randint(4, 30, (6, 9), generator=torch.Generator().manual_seed(0))
    src[2, 5:] = PAD_ID
    greedy = greedy_search(model, src, lengths=Lengths(b=12))
    beam = beam_search(model, src, beam=1, alpha=0.0, lengths=Lengths(b=12))
    assert [h.tokens for h in greedy] == [hyps[0].tokens for hyps in beam]
    for g, b in zip(greedy, beam):
        assert g.log_prob == pytest.approx(b[0].log_prob, abs=1e-4)


def test_greedy_without_scores_gives_the_same_tokens_and_nan_scores():
    model = make_model(30)
    src = torch.randint(4, 30, (6, 9), generator=torch.Generator().manual_seed(1))
    src[3, 4:] = PAD_ID
    scored = greedy_search(model, src, lengths=Lengths(b=12))
    unscored = greedy_search(model, src, lengths=Lengths(b=12), with_scores=False)
    assert [h.tokens for h in unscored] == [h.tokens for h in scored]
    assert all(math.isfinite(h.score) for h in scored)
    assert all(math.isnan(h.score) and math.isnan(h.log_prob) for h in unscored)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_result_does_not_depend_on_the_rest_of_the_batch(search):
    model = make_model(30, seed=3)
    generator = torch.Generator().manual_seed(1)
    sentences = [torch.randint(4, 30, (n,), generator=generator) for n in (3, 9, 5, 7, 2)]

    def run(batch_sentences):
        src = torch.full((len(batch_sentences), 9), PAD_ID)
        for row, s in enumerate(batch_sentences):
            src[row, : len(s)] = s
        if search == "greedy":
            return [h.tokens for h in greedy_search(model, src)]
        return [hyps[0].tokens for hyps in beam_search(model, src, beam=4)]

    together = run(sentences)
    alone = [run([s])[0] for s in sentences]
    reversed_batch = run(sentences[::-1])[::-1]
    assert together == alone == reversed_batch


def test_nbest_is_sorted_and_distinct():
    model = make_model(30, seed=4)
    src = torch.tensor([[5, 6, 7, 8]])
    hyps = beam_search(model, src, beam=6, nbest=6)[0]
    scores = [h.score for h in hyps]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(h.tokens) for h in hyps}) == 6


def test_output_respects_the_length_budget():
    model = make_model(30, seed=5)
    src = torch.tensor([[5, 6, PAD_ID], [5, 6, 7]])
    for hyp in greedy_search(model, src, lengths=Lengths(1.0, 2)):
        assert len(hyp.tokens) <= 4  # budget a*len+b counts <eos>: at most 4 tokens + <eos>
    for hyps in beam_search(model, src, beam=3, lengths=Lengths(0.0, 3)):
        assert len(hyps[0].tokens) <= 2


def test_sampling_with_top_k_one_is_greedy_and_seeded_sampling_repeats():
    model = make_model(30, seed=6)
    src = torch.randint(4, 30, (4, 6), generator=torch.Generator().manual_seed(2))
    greedy = [h.tokens for h in greedy_search(model, src)]
    assert [h.tokens for h in sample(model, src, top_k=1)] == greedy
    first = sample(model, src, seed=7, temperature=5.0)
    second = sample(model, src, seed=7, temperature=5.0)
    assert [h.tokens for h in first] == [h.tokens for h in second]
    other = sample(model, src, seed=8, temperature=5.0)
    assert [h.tokens for h in first] != [h.tokens for h in other]


def test_stream_draws_follow_the_distribution():
    """Inverse-transform draws from counter-based uniforms: frequencies match the
    probabilities (a zero-probability token is never drawn), and each stream's
    draws do not depend on the other rows."""
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    rows = 40_000
    streams = torch.arange(rows)
    drawn = draw(
        probs.expand(rows, -1), stream_uniforms(3, streams, torch.zeros(rows, dtype=torch.long))
    )
    counts = torch.bincount(drawn, minlength=5).float() / rows
    assert counts[1] == 0
    torch.testing.assert_close(counts, probs, atol=0.01, rtol=0)
    alone = draw(probs[None], stream_uniforms(3, streams[7:8], torch.zeros(1, dtype=torch.long)))
    assert alone.item() == drawn[7].item()
    later = stream_uniforms(3, streams[:100], torch.ones(100, dtype=torch.long))
    assert not torch.equal(
        later, stream_uniforms(3, streams[:100], torch.zeros(100, dtype=torch.long))
    )


def test_a_sample_is_scored_by_the_model_as_beam_search_scores():
    # log_prob is under the model itself, not the tempered, filtered distribution
    model = make_model(30, seed=8)
    src = torch.randint(4, 30, (3, 5), generator=torch.Generator().manual_seed(4))
    drawn = sample(model, src, seed=1, temperature=1.7, top_k=4)
    for row, hyp in enumerate(drawn):
        expected = sequence_log_prob(model, src[row : row + 1], hyp.tokens)
        assert hyp.log_prob == pytest.approx(expected, abs=1e-4)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # top-p 0.7: 0.5 alone is not enough, 0.5 + 0.3 reaches it
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]


def test_min_len_forces_equal_output_lengths():
    model = make_model(30, seed=7)
    src = torch.randint(4, 30, (5, 6), generator=torch.Generator().manual_seed(3))
    lengths = Lengths(a=0.0, b=9, min_len=8)
    assert [len(h.tokens) for h in greedy_search(model, src, lengths)] == [8] * 5
    assert [len(h[0].tokens) for h in beam_search(model, src, beam=3, lengths=lengths)] == [8] * 5
    assert [len(h.tokens) for h in sample(model, src, lengths=lengths)] == [8] * 5
