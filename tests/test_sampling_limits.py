"""Sampling at the edges of its settings (issue 30): any positive temperature gives a
distribution (tiny ones are greedy search, never NaN), and a ``top_k`` over the
vocabulary keeps every token, in rosetta's search and in CTranslate2's."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from rosetta.decode.sampling import filter_logits, sampling_probs
from rosetta.decode.translator import Translator

TINY = [1e-30, 1e-38, 1e-40, 1e-45, 5e-324]
SENTENCES = ["the dog sees a cat.", "two big teachers follow the girls in the tree.", "a cat"]


def logits_with_edges() -> torch.Tensor:
    """Rows with forbidden tokens, huge and tiny values, and a tie for the best."""
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 10
    logits[:, :2] = float("-inf")  # forbidden, as <pad> and <bos> are
    logits[1] *= 1e6  # logits far from 0
    logits[2] *= 1e-6  # logits all close together
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1  # a tie
    logits[4, 2:] = float("-inf")
    logits[4, 30] = -5.0  # a single token allowed
    return logits


@pytest.mark.parametrize("temperature", TINY)
@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (5, 1.0), (0, 0.5), (10**6, 0.9)])
def test_a_tiny_temperature_is_greedy_and_never_nan(temperature, top_k, top_p):
    logits = logits_with_edges()
    probs = sampling_probs(logits, temperature, top_k, top_p)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    best = logits.argmax(-1)
    for row in (0, 1, 2, 4):
        assert probs[row, best[row]] == 1.0
    if top_p > 0.5:  # a tie stays a tie (top-p 0.5 keeps the first of two alone)
        assert probs[3, 7] == probs[3, 9] == 0.5


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_ordinary_temperatures_are_unchanged(temperature):
    logits = logits_with_edges()[[0, 2, 3]]
    expected = filter_logits(logits / temperature, 5, 0.9).softmax(-1)
    torch.testing.assert_close(sampling_probs(logits, temperature, 5, 0.9), expected)


@pytest.fixture(scope="module")
def export(untrained_model_dir, tmp_path_factory):
    pytest.importorskip("ctranslate2")
    from rosetta.export.ctranslate2 import export_ctranslate2

    return export_ctranslate2(untrained_model_dir, tmp_path_factory.mktemp("ct2") / "export")


@pytest.mark.parametrize("engine", ["torch", "ctranslate2"])
def test_sampling_at_a_tiny_temperature_translates_as_greedy_search(
    engine, untrained_model_dir, request
):
    model_dir = (
        request.getfixturevalue("export") if engine == "ctranslate2" else untrained_model_dir
    )
    greedy = Translator.load(model_dir, engine, beam=1).translate(SENTENCES)
    for temperature in TINY:
        sampler = Translator.load(model_dir, engine, sampling=True, temperature=temperature)
        sampled = sampler.translate(SENTENCES)
        assert [t.text for t in sampled] == [t.text for t in greedy], temperature


def test_ctranslate2_takes_a_top_k_over_the_vocabulary(export):
    from rosetta.config import ServeConfig
    from rosetta.serve.app import create_app
    from rosetta.serve.service import TranslationService

    vocabulary = Translator.load(export, "ctranslate2").tokenizer.tgt_vocab_size
    texts = {}
    for top_k in (vocabulary, vocabulary + 1, 10**6):
        sampler = Translator.load(export, "ctranslate2", sampling=True, top_k=top_k, seed=5)
        texts[top_k] = [t.text for t in sampler.translate(SENTENCES)]
    assert texts[vocabulary] == texts[vocabulary + 1] == texts[10**6]
    service = TranslationService.load(export, "ctranslate2", config=ServeConfig(max_wait_ms=0))
    with TestClient(create_app(service)) as client:
        for sampling in ({"top_k": 10**6}, {"temperature": 1e-40}):
            body = {"text": SENTENCES, "sampling": sampling}
            response = client.post("/v1/translate", json=body)
            assert response.status_code == 200, response.text
