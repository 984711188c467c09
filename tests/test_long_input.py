"""Long inputs are split, translated whole and joined back; nothing is cut silently."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rosetta.config import DecodeConfig
from rosetta.data.tokenizer import Tokenizer
from rosetta.decode.common import Found, Hypothesis
from rosetta.decode.search import SEARCHES
from rosetta.decode.translator import (
    WORD_START,
    Translator,
    join_hypotheses,
    split_source,
)

W = WORD_START


def test_a_source_within_the_limit_is_not_split():
    assert split_source([5, 6, 7], [], 3) == [[5, 6, 7]]


def test_sentences_become_parts_of_their_own():
    pieces = [f"{W}a", f"{W}b.", f"{W}c", f"{W}d", "!", f"{W}e", f'{W}f?"', f"{W}g"]
    parts = split_source(list(range(8)), pieces, 4)
    assert parts == [[0, 1], [2, 3, 4], [5, 6], [7]]


def test_a_long_sentence_is_cut_at_word_starts_and_a_long_word_every_limit_pieces():
    pieces = [f"{W}aa", "b", "c", f"{W}d", "e", f"{W}f", "g", "h", "i"]
    assert split_source(list(range(9)), pieces, 4) == [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    word = [f"{W}x"] + ["y"] * 9
    assert split_source(list(range(10)), word, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.sampled_from([f"{W}a", "b", f"{W}c.", "!", f"{W}d", "e"]), max_size=80),
    limit=st.integers(1, 12),
)
def test_split_parts_rebuild_the_source_and_fit_the_limit(pieces, limit):
    ids = list(range(len(pieces)))
    parts = split_source(ids, pieces, limit)
    assert [i for part in parts for i in part] == ids
    assert all(1 <= len(part) <= limit for part in parts) or ids == []


def test_joined_hypotheses_concatenate_tokens_and_add_scores():
    first = [Hypothesis([4, 5], -1.0, -2.0), Hypothesis([6], -1.5, -3.0)]
    second = [Hypothesis([7], -0.5, -1.0), Hypothesis([8, 9], -0.75, -4.0)]
    assert join_hypotheses([first, second]) == [
        Hypothesis([4, 5, 7], -1.5, -3.0),
        Hypothesis([6, 8, 9], -2.25, -7.0),
    ]


class EchoEngine(Translator):
    """Translates every source into itself, and records what it was asked."""

    def __init__(self, tokenizer: Tokenizer, limit: int, nbest: int = 1) -> None:
        super().__init__(tokenizer, DecodeConfig(beam=nbest, nbest=nbest), limit)
        self.calls: list[list[list[int]]] = []

    searches = SEARCHES

    def engine_search(self, sources, trace=False):
        self.calls.append(sources)
        return [
            Found(
                [Hypothesis(list(ids), -float(len(ids)), -float(len(ids) + k)) for k in range(2)][
                    : self.search.nbest
                ]
            )
            for ids in sources
        ]


@pytest.fixture(scope="module")
def tokenizer(untrained_model_dir) -> Tokenizer:
    return Tokenizer.load(untrained_model_dir)


SENTENCE = "the big dog sees two cats under the old tree."


def test_a_5000_word_line_comes_back_whole(tokenizer):
    engine = EchoEngine(tokenizer, limit=23)
    words = (SENTENCE.rstrip(".").split() * 500)[:5000]
    no_stops = " ".join(words)
    sentences = " ".join([SENTENCE] * 500)
    result = engine.translate([no_stops, "a cat.", sentences, ""])
    assert [r.text for r in result] == [no_stops, "a cat.", sentences, ""]
    seen = engine.calls[0]
    assert all(len(ids) <= 23 for ids in seen)
    sentence_ids = tokenizer.encode_source([SENTENCE])[0]
    assert seen.count(sentence_ids) == 500  # the third line was split at its full stops
    assert len(engine.calls) == 1  # every part of every line went to one search


def test_nbest_of_a_split_line_and_of_a_blank_line(tokenizer):
    engine = EchoEngine(tokenizer, limit=23, nbest=2)
    long_line, blank = engine.translate([" ".join([SENTENCE] * 3), "   "])
    assert len(long_line.hypotheses) == 2
    parts = 3 * len(tokenizer.encode_source([SENTENCE])[0])
    assert long_line.hypotheses[0][1].log_prob == -parts
    assert long_line.hypotheses[1][1].log_prob == -(parts + 3)
    lines = long_line.nbest_lines(7)
    assert lines[0].startswith("7 ||| the big dog") and lines[0].endswith(f"||| {-parts:.4f}")
    assert blank.nbest_lines(8) == ["8 |||  ||| 0.0000"]


def test_streams_are_translated_in_chunks_in_order(tokenizer):
    engine = EchoEngine(tokenizer, limit=23)
    lines = [f"the {'big ' * n}dog." for n in range(7)]
    assert [t.text for t in engine.translate_stream(iter(lines), chunk=3)] == lines
    assert [len(call) for call in engine.calls] == [3, 3, 1]


def test_the_real_translator_never_gives_the_model_more_than_it_takes(untrained_model_dir):
    translator = Translator.load(untrained_model_dir, beam=2, max_len_b=2)
    assert translator.max_source_len == 23
    seen: list[list[int]] = []
    search = translator.engine_search
    translator.engine_search = lambda sources, trace=False: seen.extend(sources) or search(sources)
    long_line = " ".join([SENTENCE] * 20)
    results = translator.translate([long_line, "a dog."])
    assert len(results) == 2 and all("\n" not in r.text for r in results)
    assert max(map(len, seen)) <= 23
    total = len(translator.tokenizer.encode_source([long_line])[0])
    assert sum(map(len, seen)) == total + len(translator.tokenizer.encode_source(["a dog."])[0])


def test_a_translator_shared_by_threads_gives_what_it_gives_alone(untrained_model_dir):
    """``Translator`` calls run one at a time under its lock: concurrent callers get
    exactly the sequential results."""
    from concurrent.futures import ThreadPoolExecutor

    translator = Translator.load(untrained_model_dir, beam=2, max_len_b=3)
    batches = [[f"the dog sees {n} cats ."] * (n + 1) for n in range(8)]
    alone = [[t.text for t in translator.translate(batch)] for batch in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda b: [t.text for t in translator.translate(b)], batches))
    assert together == alone
