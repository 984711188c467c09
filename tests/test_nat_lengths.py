"""NAT without a length classifier (``model.length``: ``eos``, ``ctc``, ``crf``): positions,
the objectives, glancing on CTC, the single pass, and every path a model takes."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import batch_of, toy_config, train_on_distilled
from rosetta.config import NATConfig
from rosetta.data.prepare import prepare
from rosetta.data.tokenizer import EOS_ID, MASK_ID, PAD_ID
from rosetta.decode.mask_predict import emit_once
from rosetta.decode.translator import Translator
from rosetta.model import NATransformer, build_model
from rosetta.model.ctc import BLANK_ID
from rosetta.serve.app import create_app
from rosetta.serve.service import TranslationService
from rosetta.train.objectives import PositionsNAT
from rosetta.train.trainer import train

VOCAB = 40
SOURCES = [[5, 6, 7, 8, 9], [10, 11, 12]]
TARGETS = [[13, 14, 15, 16, 17, 18], [19, 19, 20]]  # a repeat: CTC needs a blank between


def tiny(**overrides) -> NATransformer:
    torch.manual_seed(0)
    settings = {"max_positions": 64, **overrides}
    cfg = NATConfig(
        arch="nat", d_model=16, d_ff=32, heads=2, encoder_layers=1, decoder_layers=2,
        dropout=0.0, **settings,
    )  # fmt: skip
    return build_model(cfg, VOCAB, VOCAB)


def test_positions_are_the_upsampled_source_within_the_model():
    model = tiny(length="ctc", upsample=2.5, max_positions=12)
    assert model.positions(torch.tensor([2, 3, 9])).tolist() == [5, 8, 12]
    assert not hasattr(model, "length_head")  # no classifier to train


@pytest.mark.parametrize("mode", ["eos", "ctc", "crf"])
def test_training_steps_learn_a_fixed_batch(mode):
    model = tiny(length=mode, upsample=2.0, glancing=0.0 if mode == "eos" else 0.5)
    objective = PositionsNAT(0.0, model.cfg.glancing, mode)
    batch = batch_of(SOURCES, TARGETS)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for step in range(150):
        loss = objective.loss(model, batch, step)["loss"]
        first = first if first is not None else float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert float(objective.loss(model, batch, 0)["loss"]) < first / 5
    found = emit_once(model, batch.src)
    assert [hyps[0].tokens for hyps in found] == TARGETS  # learned, length included
    record = objective.report(
        {k: float(v) for k, v in objective.validation(model, batch).items()}, 9
    )
    assert record["valid_length_ratio"] == 1.0 and record["valid_length_accuracy"] == 1.0


def test_eos_targets_end_with_eos_then_padding():
    """What an ``eos`` pass learns at each position: the target, <eos>, <pad>s (10
    positions for the 5-piece source, 6 for the 3-piece one)."""
    model = tiny(length="eos", upsample=2.0).eval()
    batch = batch_of(SOURCES, TARGETS)
    loss = PositionsNAT(0.0, 0.0, "eos").loss(model, batch, 0)["loss"]
    encoded = model.encode(batch.src)
    lengths = torch.tensor([10, 6])
    logits = model.emit(encoded, model.memories(encoded), lengths)
    labels = [
        [13, 14, 15, 16, 17, 18, EOS_ID, PAD_ID, PAD_ID, PAD_ID],
        [19, 19, 20, EOS_ID, PAD_ID, PAD_ID],
    ]
    by_hand = sum(
        torch.nn.functional.cross_entropy(
            logits[row, : len(ids)], torch.tensor(ids), reduction="sum"
        )
        for row, ids in enumerate(labels)
    )
    torch.testing.assert_close(loss, by_hand)


def test_glancing_on_ctc_reveals_the_chosen_count_at_the_best_alignment():
    model = tiny(length="ctc", upsample=2.0, glancing=0.5)
    objective = PositionsNAT(0.0, 0.5, "ctc")
    target = torch.tensor([[13, 14, 15], [19, 19, PAD_ID]])
    target_lengths = torch.tensor([3, 2])
    lengths = torch.tensor([8, 6])
    real = torch.arange(8)[None, :] < lengths[:, None]
    log_probs = torch.randn(2, 8, VOCAB).log_softmax(-1)
    guess = log_probs.argmax(-1)
    from rosetta.model.ctc import best_alignment

    aligned = best_alignment(log_probs, target, lengths, target_lengths)
    wrong = (guess.ne(aligned) & real).sum(1)
    torch.manual_seed(1)
    shown, learned = objective._glance(
        log_probs, guess, target, target_lengths, None, lengths, real
    )
    revealed = shown.ne(PAD_ID)
    assert revealed.sum(1).tolist() == (wrong.float() * 0.5).long().tolist()
    assert torch.equal(shown[revealed], aligned[revealed])  # gold tokens where they align
    assert not (revealed & ~real).any() and torch.equal(learned, real & ~revealed)
    del model


def test_the_single_pass_cuts_at_eos_and_collapses_ctc():
    for mode, emitted, expected in (
        ("eos", [13, 14, 14, EOS_ID, 15, PAD_ID], [13, 14, 14]),
        ("ctc", [13, 13, BLANK_ID, 13, 14, BLANK_ID], [13, 13, 14]),
        ("crf", [13, 14, 14, EOS_ID, 15, PAD_ID], [13, 14, 14]),  # transitions start ~0
    ):
        model = tiny(length=mode, upsample=2.0).eval()

        def fixed(encoded, memories, lengths, shown=None, emitted=emitted):
            logits = torch.full((1, 6, VOCAB), -10.0)
            logits[0, torch.arange(6), torch.tensor(emitted)] = 10.0
            return logits

        model.emit = fixed
        traced = []
        (hyps,) = emit_once(model, torch.tensor([[5, 6, 7]]), final_inputs=traced)
        assert hyps[0].tokens == expected
        assert traced == [([MASK_ID] * 6, emitted)]  # read, and emitted at each position


@pytest.mark.parametrize("mode", ["eos", "ctc", "crf"])
def test_a_length_mode_round_trips_through_the_model_directory_and_the_service(mode, tmp_path):
    config = toy_config(
        tmp_path / "exp",
        model={"arch": "nat", "length": mode, "upsample": 2.0, "max_positions": 64},
        train={"max_steps": 6, "valid_every": 3},
    )
    prepare(config, log=lambda _: None)
    model_dir = train(config, log=lambda _: None)
    sentences = ["the dog sees a cat.", "two big teachers follow the girls in the tree."]
    translator = Translator.load(model_dir)
    assert translator.model.length_mode == mode
    assert len(translator.translate(sentences)) == 2
    with TestClient(create_app(TranslationService.load(model_dir))) as client:
        body = {"text": sentences, "return_attention": True, "attention_kinds": ["cross"]}
        results = client.post("/v1/translate", json=body).json()["translations"]
    for result, sentence in zip(results, sentences):
        attention = result["attention"]
        rows = len(attention["target_pieces"])  # one per decoder position
        positions = int(translator.model.positions(torch.tensor([len(attention["source_pieces"])])))
        assert rows == positions
        assert [len(layer[0]) for layer in attention["cross"]] == [rows]
        assert result["text"] == translator.translate([sentence])[0].text


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ctc", "eos", "crf"])
def test_a_tiny_length_free_nat_learns_the_toy_task(mode, distilled_toy, tmp_path):
    """The recipe of tests/test_nat.py's CMLM (a tiny AR teacher's distilled set, 600
    updates), one pass, no length prediction."""
    from rosetta.evaluate.metrics import bleu

    distilled = distilled_toy
    model_dir = train_on_distilled(distilled, tmp_path / "exp", length=mode, glancing=0.5)
    sources = (distilled / "test.en").read_text(encoding="utf-8").splitlines()
    references = (distilled / "test.zeta").read_text(encoding="utf-8").splitlines()
    outputs = [t.text for t in Translator.load(model_dir).translate([*sources, ""])]
    assert len(outputs) == len(sources) + 1 and outputs[-1] == ""  # N lines in, N out
    score = bleu(outputs[:-1], references).score
    # measured 98.9 (ctc), 74.6 (eos) and 100.0 (crf), glancing 0.5, in one pass; the
    # CMLM of tests/test_nat.py: 73.9-81.8 in one pass, 77.1-84.2 with 10
    assert score > {"ctc": 85, "eos": 55, "crf": 85}[mode], score
