"""SentencePiece: exact round trip on German text and fixed special-token ids."""

from __future__ import annotations

import pytest

from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

GERMAN = [
    "Ein Mädchen läuft über die Straße.",
    "„Guten Morgen“, sagt der Bäcker – zu früh.",
    "Zwei Männer\u00a0spielen Fußball im Großen Garten.",
    "Österreichische Ärzte übergeben »Blumen«.",
]
ENGLISH = ["A girl runs across the street.", "Good morning, says the baker.", "Two men play."]


@pytest.fixture(scope="module")
def corpus():
    pairs = [(ENGLISH[i % 3], GERMAN[i % 4]) for i in range(60)]
    pairs += [(f"number {i} dog", f"Nummer {i} Hund") for i in range(200)]
    return pairs


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
@pytest.mark.parametrize("joint", [True, False])
def test_round_trip_and_special_ids(tmp_path, corpus, model_type, joint):
    tokenizer = Tokenizer.train(
        corpus, tmp_path, vocab_size=400, joint=joint, model_type=model_type
    )
    unseen = "Schöne Grüße aus Köln – „Ja“\u00a0oder »Nein«? ẞ Ł"
    for text in [*GERMAN, unseen]:
        ids = tokenizer.encode_target([text])[0]
        assert min(ids) > EOS_ID  # plain text never encodes to a special token
        assert tokenizer.decode_target(ids) == text
    for processor in (tokenizer.source, tokenizer.target):
        assert [processor.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)] == [
            "<pad>",
            "<unk>",
            "<bos>",
            "<eos>",
        ]
    assert tokenizer.joint is joint
    assert (tmp_path / ("spm.model" if joint else "spm.tgt.model")).exists()
    reloaded = Tokenizer.load(tmp_path)
    assert reloaded.encode_target(GERMAN) == tokenizer.encode_target(GERMAN)


def test_decode_drops_special_tokens(tmp_path, corpus):
    tokenizer = Tokenizer.train(corpus, tmp_path, vocab_size=400)
    ids = tokenizer.encode_target(["Zwei Männer"])[0]
    assert tokenizer.decode_target([BOS_ID, *ids, EOS_ID, PAD_ID]) == "Zwei Männer"


def test_too_small_vocabulary_is_a_clear_error(tmp_path, corpus):
    with pytest.raises(ValueError, match="could not train a 50-piece model"):
        Tokenizer.train(corpus, tmp_path, vocab_size=50)
