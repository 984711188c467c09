"""Sequence-level training (issue 36): minimum risk and REINFORCE: the risk's
gradient against finite differences, the renormalised distribution, a reward that
moves probability, the training phase from a model directory, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import copy_prepared, quiet, toy_config
from rosetta.config import ConfigError, SequenceLevelConfig, TransformerConfig
from rosetta.data.batching import Batch
from rosetta.data.prepare import prepare
from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from rosetta.model import build_model
from rosetta.modeldir import load_model_dir
from rosetta.train import checkpoint
from rosetta.train.sequence_level import (
    SentenceMetric,
    candidate_batch,
    grid,
    reinforce_loss,
    risk,
    sequence_log_probs,
)
from rosetta.train.trainer import train

SRC = torch.tensor([[5, 6, 7, 8], [9, 10, PAD_ID, PAD_ID]])
# two sources: three candidates for the first (one empty), two for the second
CANDIDATES = [[[11, 12, 13], [11, 14], []], [[15, 16, 17, 18], [15]]]
COSTS = torch.tensor([0.2, 0.9, 1.0, 0.4, 0.7], dtype=torch.float64)


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        d_model=16, d_ff=32, heads=2, encoder_layers=1, decoder_layers=1, dropout=0.0
    )
    return build_model(cfg, 30, 30).double().eval()


def batch_risk(model, sharpness: float) -> torch.Tensor:
    src, tgt_in, tgt_out = candidate_batch(SRC, CANDIDATES)
    counts = [len(group) for group in CANDIDATES]
    log_probs, mask = grid(sequence_log_probs(model, src, tgt_in, tgt_out), counts, 0.0)
    costs, _ = grid(COSTS, counts, 0.0)
    return risk(log_probs, costs, mask, sharpness)[0].sum()


def test_candidate_batch_repeats_sources_and_pads_candidates():
    src, tgt_in, tgt_out = candidate_batch(SRC, CANDIDATES)
    assert torch.equal(src, SRC[[0, 0, 0, 1, 1]])
    assert tgt_in.shape == tgt_out.shape == (5, 5)
    assert tgt_in[2].tolist() == [BOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]  # the empty one
    assert tgt_out[2].tolist() == [EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]
    assert tgt_in[3].tolist() == [BOS_ID, 15, 16, 17, 18]
    assert tgt_out[1].tolist() == [11, 14, EOS_ID, PAD_ID, PAD_ID]


def test_sequence_log_probs_are_the_sum_of_each_candidates_token_log_probs():
    model = tiny()
    src, tgt_in, tgt_out = candidate_batch(SRC, CANDIDATES)
    with torch.no_grad():
        got = sequence_log_probs(model, src, tgt_in, tgt_out)
        for row in range(5):
            length = int(tgt_out[row].ne(PAD_ID).sum())
            logits = model(src[row : row + 1], tgt_in[row : row + 1, :length])[0]
            expected = logits.log_softmax(-1).gather(1, tgt_out[row, :length, None]).sum()
            assert got[row].item() == pytest.approx(expected.item(), abs=1e-9)


def test_the_renormalised_distribution_sums_to_one_over_each_sources_candidates():
    log_probs = torch.tensor([[-1.0, -2.0, -5.0], [-3.0, -0.5, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    costs = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0]])
    for sharpness in (0.005, 1.0, 3.0):
        per_source, dist = risk(log_probs, costs, mask, sharpness)
        assert torch.allclose(dist.sum(1), torch.ones(2))
        assert (dist[~mask] == 0).all()
        expected = (dist * costs).sum(1)
        assert torch.allclose(per_source, expected)
    _, flat = risk(log_probs, costs, mask, 1e-9)  # alpha -> 0: uniform over the set
    assert torch.allclose(flat[0], torch.full((3,), 1 / 3), atol=1e-6)
    assert torch.allclose(flat[1, :2], torch.full((2,), 1 / 2), atol=1e-6)


def test_the_risks_gradient_equals_finite_differences():
    model = tiny()
    batch_risk(model, 0.5).backward()
    eps = 1e-6
    checked = 0
    for name, parameter in model.named_parameters():
        if parameter.grad is None or parameter.dim() < 2:
            continue
        for index in [(0, 0), (1, 2), (parameter.size(0) - 1, parameter.size(1) - 1)]:
            with torch.no_grad():
                original = parameter[index].item()
                parameter[index] = original + eps
                up = batch_risk(model, 0.5).item()
                parameter[index] = original - eps
                down = batch_risk(model, 0.5).item()
                parameter[index] = original
            numeric = (up - down) / (2 * eps)
            assert parameter.grad[index].item() == pytest.approx(numeric, rel=1e-4, abs=1e-9), name
            checked += 1
    assert checked >= 10


def test_reinforce_uses_the_leave_one_out_baseline():
    log_probs = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    rewards = torch.tensor([[0.9, 0.3, 0.0]])
    reinforce_loss(log_probs, rewards).sum().backward()
    baseline = torch.tensor([(0.3 + 0.0) / 2, (0.9 + 0.0) / 2, (0.9 + 0.3) / 2])
    assert torch.allclose(log_probs.grad[0], -(rewards[0] - baseline) / 3)
    equal = torch.tensor([[0.5, 0.5, 0.5]])  # the same reward for every draw: no signal
    assert reinforce_loss(torch.zeros(1, 3, requires_grad=True), equal).abs().item() == 0


@pytest.mark.parametrize("method", ["mrt", "reinforce"])
def test_a_reward_that_prefers_one_candidate_moves_probability_to_it(method):
    model = tiny(seed=1).train()
    src, tgt_in, tgt_out = candidate_batch(SRC[:1], CANDIDATES[:1])
    costs = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)  # the second is best

    def probabilities() -> torch.Tensor:
        with torch.no_grad():
            return sequence_log_probs(model, src, tgt_in, tgt_out).softmax(0)

    before = probabilities()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        log_probs = sequence_log_probs(model, src, tgt_in, tgt_out)[None]
        if method == "mrt":
            loss = risk(log_probs, costs, torch.ones_like(costs, dtype=torch.bool), 1.0)[0]
        else:
            loss = reinforce_loss(log_probs, 1.0 - costs)
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
    after = probabilities()
    assert after[1] > before[1] + 0.3, (before, after)
    assert after[1] > 0.6


def test_sentence_costs_come_from_sacrebleu():
    bleu, chrf = SentenceMetric("bleu"), SentenceMetric("chrf")
    assert bleu.cost("a small house", "a small house") == pytest.approx(0.0)
    assert chrf.cost("a small house", "a small house") == pytest.approx(0.0)
    assert bleu.cost("", "a small house") == pytest.approx(1.0)
    assert 0 < chrf.cost("a small horse", "a small house") < chrf.cost("tree", "a small house")


def test_configurations_that_cannot_work_are_refused(tmp_path):
    with pytest.raises((ConfigError, ValueError), match="left to right"):
        toy_config(tmp_path, model={"arch": "nat"}, train={"sequence_level": {}})
    with pytest.raises((ConfigError, ValueError), match="draws"):
        SequenceLevelConfig(method="reinforce", generate="beam")
    with pytest.raises((ConfigError, ValueError), match="one of them"):
        toy_config(tmp_path, train={"sequence_level": {}, "scheduled_sampling": {}})


def phase(folder, pretrained, **train_keys):
    """A sequence-level phase from ``pretrained`` on the same prepared data."""
    keys = {"max_steps": 6, "valid_every": 3, "max_tokens": 256, **train_keys}
    keys.setdefault("sequence_level", {"method": "mrt", "candidates": 4})
    config = toy_config(folder, train=keys)
    return config.model_copy(update={"init": pretrained})


@pytest.mark.parametrize(
    "level",
    [
        {"method": "mrt", "candidates": 4, "include_reference": True, "token_weight": 0.3},
        {"method": "reinforce", "candidates": 3, "metric": "chrf"},
    ],
)
def test_the_phase_starts_from_a_model_and_resumes_exactly(tmp_path, pretrained, level):
    base = pretrained.parent
    straight = copy_prepared(base, tmp_path / "straight")
    train(phase(straight, pretrained, sequence_level=level), log=quiet)
    interrupted = copy_prepared(base, tmp_path / "interrupted")
    train(phase(interrupted, pretrained, sequence_level=level, max_steps=3), log=quiet)
    train(phase(interrupted, pretrained, sequence_level=level), resume=True, log=quiet)

    a = checkpoint.load(straight / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(interrupted / "checkpoints" / "last.pt")["model"]
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=0, msg=name)
    start = load_model_dir(pretrained, device="cpu")[2].state_dict()
    assert any(not torch.equal(start[name], a[name]) for name in a)  # it trained
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["type"] == "train"]
    assert logged and all(0.0 <= r["reward"] <= 1.0 for r in logged)
    assert all(r["candidate_length"] > 0 and r["candidates"] >= 2 for r in logged)
    if level["method"] == "mrt":
        assert all(0.0 <= r["risk"] <= 1.0 for r in logged)
        assert all(r["candidates"] <= 5 for r in logged)  # distinct, with the reference


def test_the_rnn_trains_on_whole_sentences(tmp_path):
    config = toy_config(
        tmp_path / "rnn",
        model={"arch": "rnn", "d_model": 16, "hidden_size": 16},
        train={"max_steps": 2, "valid_every": 2, "max_tokens": 256,
               "sequence_level": {"method": "reinforce", "candidates": 2}},
    )  # fmt: skip
    prepare(config, log=quiet)
    train(config, log=quiet)
    weights = checkpoint.load(tmp_path / "rnn" / "checkpoints" / "last.pt")["model"]
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    records = [json.loads(line) for line in (tmp_path / "rnn" / "metrics.jsonl").open()]
    assert any(r["type"] == "train" and "reward" in r for r in records)


def test_a_batch_of_sentences_is_the_unit(tmp_path):
    from rosetta.data.tokenizer import Tokenizer
    from rosetta.train.objectives import objective_for

    config = toy_config(tmp_path, train={"sequence_level": {"candidates": 2}})
    prepare(config, log=quiet)
    model = build_model(config.model, 300, 300)
    objective = objective_for(config, model, Tokenizer.load(tmp_path / "tokenizer"))
    assert objective.unit == "sentence"
    batch = Batch(
        src=torch.tensor([[5, 6, 7]]),
        src_lengths=torch.tensor([3]),
        tgt_in=torch.tensor([[BOS_ID, 8, 9]]),
        tgt_out=torch.tensor([[8, 9, EOS_ID]]),
        indices=torch.arange(1),
    )
    terms = objective.loss(model.train(), batch, step=0)
    assert terms["loss"].requires_grad and terms["candidates"].item() <= 2


def test_two_processes_train_on_whole_sentences_as_one_does(tmp_path):
    """DDP: the per-sentence loss is divided by the update's sentences on every
    process, so two processes make the update one process makes with two batches."""
    from test_distributed import finish, free_port, rosetta_train, sensitive_config, write_config

    level = {"sequence_level": {"method": "mrt", "candidates": 3, "generate": "beam"}}
    single = tmp_path / "single"
    config = sensitive_config(single, accumulate=2, max_tokens=256, **level)
    prepare(config, log=quiet)
    train(config, log=quiet)
    two = copy_prepared(single, tmp_path / "two")
    path = write_config(sensitive_config(two, max_tokens=256, **level), tmp_path / "two.yaml")
    status, output = finish(rosetta_train(path, "--nproc-per-node", "2", port=free_port()))
    assert status == 0, output
    one = checkpoint.load(single / "checkpoints" / "last.pt")["model"]
    both = checkpoint.load(two / "checkpoints" / "last.pt")["model"]
    start = checkpoint.load(single / "checkpoints" / "step_3.pt")["model"]
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert moved > 1e-4  # the comparison below can fail
    assert max(float((one[k] - both[k]).abs().max()) for k in one) < moved / 100
