"""The long-input task: documents of consecutive toy sentences, and each attention
variant learning it (a system test, as the sentence task's)."""

from __future__ import annotations

import random

import pytest

from conftest import learning_config, toy_config
from rosetta.data.prepare import _settings, prepare
from rosetta.data.toy import ToySplits, generate_corpus, generate_document, generate_pair
from rosetta.decode.translator import Translator
from rosetta.evaluate.metrics import bleu
from rosetta.train.trainer import train


def test_a_document_is_consecutive_sentences_translated_in_order():
    rng, again = random.Random(4), random.Random(4)
    source, target = generate_document(rng, (3, 5))
    count = source.count(".")
    assert 3 <= count <= 5 and target.count(".") == count
    assert again.randint(3, 5) == count  # the document's length is drawn first
    pairs = [generate_pair(again) for _ in range(count)]
    assert source == " ".join(s for s, _ in pairs)
    assert target == " ".join(t for _, t in pairs)


def test_the_sentence_task_is_unchanged_by_the_document_option():
    sizes = dict(train=30, valid=5, test=5)
    assert generate_corpus(3, ToySplits(**sizes)) == generate_corpus(3, ToySplits(**sizes), (1, 1))
    documents = generate_corpus(3, ToySplits(**sizes), (2, 4))
    assert all(2 <= s.count(".") <= 4 for s, _ in documents["train"])


VARIANTS = {
    "local": ({"variant": "local", "radius": 8}, {"variant": "local", "radius": 8}),
    "linear": ({"variant": "linear"}, {"variant": "linear"}),
    "lowrank": ({"variant": "lowrank", "rank": 32}, {"variant": "full"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_attention_variant_learns_the_long_input_task(variant, tmp_path):
    encoder, decoder = VARIANTS[variant]
    config = learning_config(tmp_path / "exp", encoder_attention=encoder, decoder_attention=decoder)
    config.data.toy.sentences = (2, 4)
    config.data.max_len = 160
    config.model.max_positions = 160
    prepare(config, log=lambda _: None)
    model_dir = train(config, log=lambda _: None)
    corpus = tmp_path / "exp" / "corpus"
    sources = (corpus / "test.en").read_text(encoding="utf-8").splitlines()[:60]
    references = (corpus / "test.zeta").read_text(encoding="utf-8").splitlines()[:60]
    translator = Translator.load(model_dir, beam=1)
    outputs = [t.text for t in translator.translate(sources)]
    assert bleu(outputs, references).score > 70, variant  # an untrained model scores ~0


def test_experiments_prepared_before_the_option_existed_stay_up_to_date(tmp_path):
    """The option is left out of the data fingerprint at its default, so the
    settings of a sentence-task experiment are what they were before it existed."""
    config = toy_config(tmp_path / "exp")
    assert "sentences" not in _settings(config)["data"]["toy"]
    config.data.toy.sentences = (2, 3)
    assert _settings(config)["data"]["toy"]["sentences"] == [2, 3]
