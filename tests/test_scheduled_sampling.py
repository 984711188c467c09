"""Scheduled sampling: the schedules, the two-pass decoder input, exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import toy_config
from rosetta.config import ConfigError, ScheduledSamplingConfig, TransformerConfig
from rosetta.data.prepare import prepare
from rosetta.data.tokenizer import BOS_ID, PAD_ID
from rosetta.model import build_model
from rosetta.train import checkpoint
from rosetta.train.trainer import train


def test_schedules_go_from_start_to_end():
    linear = ScheduledSamplingConfig(schedule="linear", start=0.1, end=0.5, speed=100)
    assert linear.rate(0) == pytest.approx(0.1)
    assert linear.rate(50) == pytest.approx(0.3)
    assert linear.rate(100) == linear.rate(10_000) == pytest.approx(0.5)
    exponential = ScheduledSamplingConfig(schedule="exponential", end=0.4, speed=100)
    assert exponential.rate(0) == 0.0
    assert exponential.rate(100) == pytest.approx(0.4 * (1 - math.exp(-1)))
    sigmoid = ScheduledSamplingConfig(schedule="inverse_sigmoid", end=0.5, speed=10)
    assert sigmoid.rate(0) == pytest.approx(0.0)
    # Bengio et al.'s teacher-forcing probability k / (k + exp(i / k)), rescaled
    eps = 10 / (10 + math.exp(3.0))
    assert sigmoid.rate(30) == pytest.approx(0.5 * (1 - eps / (10 / 11)))
    assert sigmoid.rate(10**9) == pytest.approx(0.5)
    for schedule in (linear, exponential, sigmoid):
        rates = [schedule.rate(step) for step in range(0, 2000, 10)]
        assert rates == sorted(rates)


def tiny_transformer():
    torch.manual_seed(0)
    cfg = TransformerConfig(
        d_model=16, d_ff=32, heads=2, encoder_layers=1, decoder_layers=1, dropout=0.0
    )
    return build_model(cfg, 30, 30).eval()


def test_own_predictions_replace_gold_inputs_at_the_rate():
    model = tiny_transformer()
    src = torch.tensor([[5, 6, 7, 8], [9, 10, PAD_ID, PAD_ID]])
    tgt_in = torch.tensor([[BOS_ID, 11, 12, 13, 14], [BOS_ID, 15, 16, PAD_ID, PAD_ID]])
    assert torch.equal(model.with_own_predictions(src, tgt_in, 0.0), tgt_in)
    everything = model.with_own_predictions(src, tgt_in, 1.0)
    guess = model(src, tgt_in).argmax(-1)  # position t predicts input t + 1
    real = tgt_in.ne(PAD_ID)
    assert (everything[:, 0] == BOS_ID).all()
    assert torch.equal(everything[:, 1:][real[:, 1:]], guess[:, :-1][real[:, 1:]])
    assert torch.equal(everything[~real], tgt_in[~real])  # padding stays padding
    torch.manual_seed(0)
    long_in = torch.randint(5, 30, (64, 40))
    long_in[:, 0] = BOS_ID
    long_src = torch.randint(5, 30, (64, 10))
    half = model.with_own_predictions(long_src, long_in, 0.3)
    predicted = torch.cat([long_in[:, :1], model(long_src, long_in).argmax(-1)[:, :-1]], 1)
    could_change = predicted[:, 1:].ne(long_in[:, 1:])
    changed = half[:, 1:].ne(long_in[:, 1:])
    assert not (changed & ~could_change).any()
    assert changed.sum() / could_change.sum() == pytest.approx(0.3, abs=0.05)
    sampled = model.with_own_predictions(long_src, long_in, 1.0, sample=True)
    assert not torch.equal(sampled[:, 1:], predicted[:, 1:])  # drawn, not the argmax


def test_scheduled_sampling_changes_training_and_resumes_exactly(tmp_path):
    schedule = {"schedule": "linear", "start": 0.3, "end": 0.6, "speed": 10, "sample": True}
    plain = tmp_path / "plain"
    prepare(toy_config(plain), log=lambda *_: None)
    train(toy_config(plain), log=lambda *_: None)
    straight = tmp_path / "straight"
    config = toy_config(straight, train={"scheduled_sampling": schedule})
    prepare(config, log=lambda *_: None)
    train(config, log=lambda *_: None)
    interrupted = tmp_path / "interrupted"
    stop = {"max_steps": 6, "valid_every": 3, "scheduled_sampling": schedule}
    prepare(toy_config(interrupted, train=stop), log=lambda *_: None)
    train(toy_config(interrupted, train=stop), log=lambda *_: None)
    again = {"valid_every": 3, "scheduled_sampling": schedule}
    train(toy_config(interrupted, train=again), resume=True, log=lambda *_: None)

    a = checkpoint.load(straight / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(interrupted / "checkpoints" / "last.pt")["model"]
    c = checkpoint.load(plain / "checkpoints" / "last.pt")["model"]
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(a[name], c[name]) for name in a)  # it did something
    logged = (straight / "metrics.jsonl").read_text()
    assert '"own_rate"' in logged


def test_a_nat_model_refuses_scheduled_sampling(tmp_path):
    with pytest.raises((ConfigError, ValueError), match="glancing"):
        toy_config(tmp_path, model={"arch": "nat"}, train={"scheduled_sampling": {}})


def test_the_rnn_reads_its_own_previous_word_step_by_step():
    from rosetta.config import RNNConfig

    torch.manual_seed(0)
    cfg = RNNConfig(arch="rnn", d_model=16, hidden_size=16, encoder_layers=1, decoder_layers=1)
    model = build_model(cfg, 30, 30).eval()
    src = torch.tensor([[5, 6, 7, 8], [9, 10, 11, PAD_ID]])
    tgt_in = torch.tensor([[BOS_ID, 11, 12, 13, 14], [BOS_ID, 15, 16, 17, PAD_ID]])
    with torch.no_grad():
        torch.testing.assert_close(
            model.scheduled_states(src, tgt_in, 0.0), model.hidden_states(src, tgt_in)
        )
        states = model.scheduled_states(src, tgt_in, 1.0)
        # every input after <bos> was the word predicted the step before: teacher
        # forcing on those words reproduces the same states
        own = model.output(states[:, :-1]).argmax(-1)
        read = torch.cat([tgt_in[:, :1], own], dim=1).masked_fill(tgt_in.eq(PAD_ID), PAD_ID)
        assert not torch.equal(read, tgt_in)
        real = tgt_in.ne(PAD_ID)
        torch.testing.assert_close(model.hidden_states(src, read)[real], states[real])
