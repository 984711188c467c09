"""The toy task generator: deterministic, held-out splits, and real grammar."""

from __future__ import annotations

import random

from rosetta.data.toy import (
    ADJECTIVES,
    NOUNS,
    VERBS,
    ToySplits,
    generate_corpus,
    generate_pair,
    write_corpus,
)

SMALL = ToySplits(train=2000, valid=100, test=100)
ZETA_NOUNS = {stem for _, _, stem in NOUNS}
ZETA_ADJECTIVES = {stem for _, stem in ADJECTIVES}


def test_deterministic_for_a_seed():
    assert generate_corpus(7, SMALL) == generate_corpus(7, SMALL)
    assert generate_corpus(7, SMALL)["train"] != generate_corpus(8, SMALL)["train"]


def test_split_sizes_and_held_out_sources():
    corpus = generate_corpus(1, SMALL)
    assert [len(corpus[s]) for s in ("train", "valid", "test")] == [2000, 100, 100]
    train = {s for s, _ in corpus["train"]}
    valid = {s for s, _ in corpus["valid"]}
    test = {s for s, _ in corpus["test"]}
    assert not (train & valid) and not (train & test) and not (valid & test)
    assert len(valid) == 100 and len(test) == 100


def test_grammar_verb_last_with_agreement_and_adjectives_after_nouns():
    rng = random.Random(3)
    checked_plural = checked_past = checked_adjective = 0
    for _ in range(500):
        english, zeta = generate_pair(rng)
        en_words, zeta_words = english[:-1].split(), zeta[:-1].split()
        verb = zeta_words[-1]  # subject-object-verb
        stems = {stem: forms for *forms, stem in VERBS}
        stem = next(s for s in stems if verb.startswith(s))
        third_singular, base, past = stems[stem]
        english_verb = next(w for w in en_words if w in (third_singular, base, past))
        subject_plural = english_verb == base or (english_verb == past and verb.endswith("in"))
        expected_ending = {
            third_singular: "as",
            base: "an",
            past: "in" if subject_plural else "is",
        }[english_verb]
        assert verb == stem + expected_ending, (english, zeta)
        checked_plural += expected_ending in ("an", "in")
        checked_past += english_verb == past
        # adjectives follow their noun and agree with it in number and case
        for i, word in enumerate(zeta_words):
            base_adj = word.rstrip("jn")
            if base_adj in ZETA_ADJECTIVES:
                noun = zeta_words[i - 1]
                assert noun.rstrip("jn") in ZETA_NOUNS
                assert word[len(base_adj) :] == noun[len(noun.rstrip("jn")) :]
                checked_adjective += 1
    assert checked_plural > 50 and checked_past > 50 and checked_adjective > 100


def test_prepositional_phrase_moves_to_the_front():
    rng = random.Random(5)
    pairs = [generate_pair(rng) for _ in range(300)]
    moved = [(e, z) for e, z in pairs if " near the " in e]
    assert moved
    for english, zeta in moved:
        assert zeta.startswith("apud la ")
        assert english.split(" near the ")[1].rstrip(".") in {"river", "house", "tree", "market"}


def test_target_side_has_non_ascii_letters():
    corpus = generate_corpus(1, SMALL)
    assert any(not t.isascii() for _, t in corpus["train"])


def test_write_corpus(tmp_path):
    paths = write_corpus(tmp_path / "toy", seed=2, sizes=SMALL)
    for split, (src, tgt) in paths.items():
        src_lines = src.read_text(encoding="utf-8").splitlines()
        tgt_lines = tgt.read_text(encoding="utf-8").splitlines()
        assert len(src_lines) == len(tgt_lines) == getattr(SMALL, split)
        assert src.name == f"{split}.en" and tgt.name == f"{split}.zeta"
