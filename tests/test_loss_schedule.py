"""Label-smoothed loss and the warm-up schedule against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from rosetta.data.tokenizer import PAD_ID
from rosetta.model.loss import label_smoothed_nll
from rosetta.train.schedule import learning_rate


def test_label_smoothed_loss_by_hand():
    # one sentence, two real labels and one padding position; vocabulary of 4
    logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 3.0], [9.0, 9.0, 9.0, 9.0]]])
    labels = torch.tensor([[0 + 2, 3, PAD_ID]])  # label 2 at position 0, 3 at position 1
    eps = 0.1
    loss, nll = label_smoothed_nll(logits, labels, eps)

    def log_softmax(row):
        z = math.log(sum(math.exp(x) for x in row))
        return [x - z for x in row]

    first, second = log_softmax([2.0, 0.0, 0.0, 0.0]), log_softmax([0.0, 1.0, 0.0, 3.0])
    expected_nll = -first[2] - second[3]
    expected = (1 - eps) * expected_nll + eps * (-sum(first) / 4 - sum(second) / 4)
    assert float(nll) == pytest.approx(expected_nll, rel=1e-6)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_no_smoothing_is_cross_entropy_ignoring_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(1, 11, (2, 5))
    labels[1, 3:] = PAD_ID
    loss, nll = label_smoothed_nll(logits, labels, 0.0)
    reference = torch.nn.functional.cross_entropy(
        logits.view(-1, 11), labels.view(-1), ignore_index=PAD_ID, reduction="sum"
    )
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(nll, reference)


@pytest.mark.parametrize("step", [1, 100, 3999, 4000, 4001, 20000])
def test_noam_schedule_is_the_paper_formula(step):
    d_model, warmup = 512, 4000
    expected = d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
    assert learning_rate(step, "noam", d_model, warmup) == pytest.approx(expected)
    assert learning_rate(step, "inverse_sqrt", d_model, warmup) == pytest.approx(expected)


def test_peak_learning_rate_is_reached_at_the_end_of_warmup():
    assert learning_rate(400, "inverse_sqrt", 256, 400, peak=1e-3) == pytest.approx(1e-3)
    assert learning_rate(200, "inverse_sqrt", 256, 400, peak=1e-3) == pytest.approx(5e-4)
    assert learning_rate(1600, "inverse_sqrt", 256, 400, peak=1e-3) == pytest.approx(5e-4)
    assert learning_rate(800, "constant", 256, 400, peak=3e-4) == pytest.approx(3e-4)


def test_closed_form_gradient_matches_autograd():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 13, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(1, 13, (2, 6))
    labels[0, 4:] = PAD_ID
    eps = 0.1
    loss, nll = label_smoothed_nll(logits, labels, eps)
    (2.0 * loss + 0.5 * nll).backward()
    ours = logits.grad.clone()

    logits.grad = None
    log_probs = torch.log_softmax(logits, -1)[labels.ne(PAD_ID)]
    gold = labels[labels.ne(PAD_ID)]
    ref_nll = -log_probs.gather(1, gold[:, None]).sum()
    ref_loss = (1 - eps) * ref_nll + eps * (-log_probs.mean(-1)).sum()
    (2.0 * ref_loss + 0.5 * ref_nll).backward()
    torch.testing.assert_close(ours, logits.grad)
    torch.testing.assert_close(loss, ref_loss)
