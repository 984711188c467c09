"""Lexically constrained beam search (dynamic beam allocation) and its automaton."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rosetta.cli import main
from rosetta.config import TransformerConfig
from rosetta.decode.beam import BeamOptions, BeamSearch
from rosetta.decode.common import Lengths, pad_batch
from rosetta.decode.constraints import (
    Automaton,
    Constraint,
    ConstraintTables,
    met,
    read_constraint_lines,
)
from rosetta.decode.glossary import Glossary, with_capitals
from rosetta.decode.translator import CTranslate2Translator, Translator
from rosetta.model import build_model

VOCAB = 24
LENGTHS = Lengths(a=1.0, b=6, limit=40)


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        d_model=32, d_ff=64, heads=4, encoder_layers=1, decoder_layers=2, dropout=0.0,
        max_positions=64,
    )  # fmt: skip
    built = build_model(cfg, VOCAB, VOCAB).eval()
    with torch.no_grad():
        built.output.weight.mul_(4.0)
    return built


def phrase(*tokens: int) -> Constraint:
    return Constraint((tuple(tokens),), " ".join(map(str, tokens)))


def search(m, sources, constraints, beam=4, nbest=1, ordered=False, lengths=LENGTHS):
    options = BeamOptions(beam=beam, nbest=nbest, ordered_constraints=ordered)
    engine = BeamSearch(options).engine(m, lengths, constrained=True, max_sentences=64)
    with torch.inference_mode():
        for key, (ids, cons) in enumerate(zip(sources, constraints)):
            engine.add(ids, key, cons)
        results = engine.run()
    return [results[key].hypotheses for key in range(len(sources))]


def plain(m, sources, beam=4, nbest=1):
    src = pad_batch(sources)
    found = BeamSearch(BeamOptions(beam=beam, nbest=nbest)).run(m, src, LENGTHS)
    return [result.hypotheses for result in found]


SOURCES = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 5], [7, 7, 8]]


# ---- the automaton ----------------------------------------------------------------------
def walk(constraints, tokens, ordered=False):
    tables = ConstraintTables(ordered)
    tables.admit([constraints], torch.device("cpu"))
    node = met_mask = torch.zeros(1, 1, dtype=torch.long)
    for token in tokens:
        node, met_mask = tables.step(node, met_mask, torch.tensor([[token]]))
    return int(met_mask), int(tables.progress(node, met_mask))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.integers(4, 7), min_size=1, max_size=3), min_size=1, max_size=3),
    st.lists(st.integers(4, 8), max_size=12),
    st.booleans(),
)
def test_automaton_counts_what_the_output_contains(phrases, tokens, ordered) -> None:
    constraints = [phrase(*p) for p in phrases]
    mask, _ = walk(constraints, tokens, ordered)
    expected = met(constraints, tokens, ordered)
    assert [bool(mask >> bit & 1) for bit in range(len(constraints))] == expected


def test_shared_prefix_and_overlap_and_progress() -> None:
    shared = [phrase(4, 5, 6), phrase(4, 5, 7)]  # two constraints sharing a prefix
    assert walk(shared, [4, 5]) == (0, 2)
    assert walk(shared, [4, 5, 6]) == (1, 3)  # one met (credit 3); 4 5 ... again counts
    assert walk(shared, [4, 5, 6, 4, 5, 7]) == (3, 6)
    assert walk([phrase(4, 5), phrase(5, 6)], [4, 5, 6])[0] == 3  # overlapping
    assert walk([phrase(4, 4, 5)], [4, 4, 4, 5])[0] == 1  # failure links
    ordered = [phrase(6), phrase(4)]
    assert walk(ordered, [4, 6], ordered=True)[0] == 1  # 4 before 6 does not count
    assert walk(ordered, [4, 6, 4], ordered=True)[0] == 3
    either = Constraint(((8,), (9, 10)), "alternatives")
    assert walk([either], [9, 10])[0] == 1 and walk([either], [8])[0] == 1
    assert Automaton.build([]).tokens == []


# ---- the search ---------------------------------------------------------------------------
def test_constraints_appear_and_free_sentences_are_unchanged() -> None:
    m = model()
    free = plain(m, SOURCES)
    # a token the model never produces for these sources
    produced = {t for hyps in free for t in hyps[0].tokens}
    rare = next(t for t in range(4, VOCAB) if t not in produced)
    constraints = [[phrase(rare)], [], [phrase(rare, rare + 1 if rare + 1 < VOCAB else 4)], []]
    got = search(m, SOURCES, constraints)
    for hyps, cons in zip(got, constraints):
        assert all(met(cons, hyps[0].tokens, False))
    for i in (1, 3):  # mixed batch: a sentence without constraints is searched as alone
        assert got[i][0].tokens == free[i][0].tokens
        assert got[i][0].score == pytest.approx(free[i][0].score, abs=1e-5)


def test_a_constraint_the_output_meets_early_changes_nothing() -> None:
    """Met in the first steps, the hypotheses that met it fill the beam as in plain
    beam search. (One met late can change the output: until then the hypotheses
    that have not met it get only part of the beam: README, "Lexical constraints".)"""
    m = model(1)
    free = plain(m, SOURCES, nbest=1)
    constraints = [[phrase(*hyps[0].tokens[1:3])] if len(hyps[0].tokens) >= 3 else []
                   for hyps in free]  # fmt: skip
    got = search(m, SOURCES, constraints)
    for before, after in zip(free, got):
        assert after[0].tokens == before[0].tokens


def test_mixed_batch_gives_each_sentence_what_it_gives_alone() -> None:
    m = model(2)
    constraints = [[phrase(9), phrase(10, 11)], [], [phrase(4)], [phrase(20), phrase(21)]]
    together = search(m, SOURCES, constraints, nbest=2)
    for i, (source, cons) in enumerate(zip(SOURCES, constraints)):
        alone = search(m, [source], [cons], nbest=2)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in together[i]]
        for a, b in zip(alone, together[i]):
            assert a.score == pytest.approx(b.score, abs=1e-5)


def test_ordered_against_unordered() -> None:
    m = model(3)
    cons = [phrase(17), phrase(18)]
    unordered = search(m, SOURCES, [cons] * 4, beam=6)
    ordered = search(m, SOURCES, [cons] * 4, beam=6, ordered=True)
    for hyps in ordered:
        tokens = hyps[0].tokens
        assert 17 in tokens and 18 in tokens[tokens.index(17) + 1 :]
    for hyps in unordered:
        assert all(met(cons, hyps[0].tokens, False))


def test_best_meeting_most_when_not_all_fit() -> None:
    m = model(4)
    tight = Lengths(a=0.0, b=4, limit=40)  # 3 tokens and <eos>
    cons = [[phrase(20, 21), phrase(22, 23)]]
    hyps = search(m, [[5, 6, 7]], cons, lengths=tight)[0]
    assert len(hyps[0].tokens) <= 3
    assert sum(met(cons[0], hyps[0].tokens, False)) == 1


def test_nbest_all_meet_and_are_ranked() -> None:
    m = model(5)
    hyps = search(m, [SOURCES[0]], [[phrase(19)]], beam=5, nbest=3)[0]
    assert len(hyps) == 3 and all(19 in h.tokens for h in hyps)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def test_wide_beam_equals_exhaustive_constrained_search() -> None:
    """With a beam holding every prefix, the best hypothesis is the best of all
    sequences that meet the constraint (exhaustive over a 3-token vocabulary)."""
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=16, d_ff=32, heads=2, encoder_layers=1, decoder_layers=1,
                            dropout=0.0, max_positions=16)  # fmt: skip
    tiny = build_model(cfg, 7, 7).eval()
    lengths = Lengths(a=0.0, b=4, limit=16)
    source, need = [4, 5], [phrase(6, 4)]
    best = search(tiny, [source], [need], beam=64, lengths=lengths)[0][0]
    src = torch.tensor([source])
    scored = []
    with torch.inference_mode():
        for n in range(0, 4):  # 3 tokens and <eos> at most
            for seq in itertools.product([1, 4, 5, 6], repeat=n):
                if not all(met(need, list(seq), False)):
                    continue
                tgt = torch.tensor([[2, *seq]])
                logp = tiny(src, tgt).log_softmax(-1)[0]
                total = sum(float(logp[i, t]) for i, t in enumerate([*seq, 3]))
                scored.append((total / ((5 + n + 1) / 6) ** 0.6, list(seq)))
    assert best.tokens == max(scored)[1]


# ---- glossary, API and command line -----------------------------------------------------------
def toy_sources(model_dir) -> list[str]:
    corpus = model_dir.parent / "corpus"
    return (corpus / "test.en").read_text(encoding="utf-8").splitlines()[:3]


def test_glossary_matches_whole_words_leftmost_longest() -> None:
    glossary = Glossary.from_pairs(
        [("cat", ["Katze"]), ("New York", ["New York"]), ("York", ["Jork"]),
         ("cat", ["Kater"]), ("Straße", ["street"])]
    )  # fmt: skip
    assert glossary.match("The cats concatenate.") == []
    assert glossary.match("A CAT, a cat and New  York; york.") == [
        ("cat", ["Katze", "Kater"]), ("new york", ["New York"]), ("york", ["Jork"]),
    ]  # fmt: skip
    assert glossary.match("STRASSE")[0][1] == ["street"]  # case folding: ß is ss
    # a lower-case target may also start a sentence capitalised
    assert with_capitals(["street", "Straße", "x"]) == ["street", "Straße", "x", "Street", "X"]
    with pytest.raises(ValueError, match="no target term"):
        Glossary.from_pairs([("dog", [" "])])


def test_glossary_file_errors_name_the_line(tmp_path) -> None:
    path = tmp_path / "g.tsv"
    path.write_text("# terms\ndog\tHund\tRüde\n\ncat Katze\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"g.tsv:4: expected 'source term<TAB>target term'"):
        Glossary.load(path)
    path.write_text("dog\tHund\tRüde\n", encoding="utf-8")
    assert Glossary.load(path).terms == {("dog",): ["Hund", "Rüde"]}


def test_translator_honours_constraints_and_reports_them(toy_model_dir) -> None:
    translator = Translator.load(toy_model_dir, beam=4)
    sentences = toy_sources(toy_model_dir)
    free = translator.translate(sentences)
    word = free[0].text.split()[0]
    other = next(w for t in free[1:] for w in t.text.split() if w not in free[0].text.split())
    got = translator.translate(sentences, constraints=[[word, other], None, []])
    assert got[0].constraints == [{"text": word, "met": True}, {"text": other, "met": True}]
    assert other in got[0].text.split() or other in got[0].text
    assert [t.text for t in got[1:]] == [t.text for t in free[1:]]  # unconstrained: as before
    assert got[1].constraints == []
    glossary = Glossary.from_pairs([(sentences[1].split()[0], [other])])
    assert translator.translate(sentences[1:2], glossary=glossary)[0].constraints[0]["met"]
    with pytest.raises(ValueError, match="longer than the output limit"):
        translator.translate(sentences[:1], constraints=[[" ".join([other] * 200)]])
    with pytest.raises(ValueError, match="2 constraint lists for 3 sentences"):
        translator.translate(sentences, constraints=[[word], []])
    with pytest.raises(ValueError, match="need beam search, not sampling"):
        translator.with_options(search="sampling").translate(sentences, [[word], [], []])


def test_ctranslate2_refuses_constraints() -> None:
    engine = object.__new__(CTranslate2Translator)
    with pytest.raises(ValueError, match="CTranslate2 cannot decode with lexical constraints"):
        engine.engine_search([[5, 6]], False, [(phrase(7),)])


def test_cli_constraints_file(toy_model_dir, tmp_path, capsys) -> None:
    src, cons = tmp_path / "in.txt", tmp_path / "cons.jsonl"
    src.write_text("\n".join(toy_sources(toy_model_dir)) + "\n", encoding="utf-8")
    main(["translate", str(toy_model_dir), "-i", str(src), "--beam", "3"])
    free = capsys.readouterr().out.splitlines()
    wanted = free[1].split()[-1]
    cons.write_text(json.dumps([wanted]) + "\n\n[]\n", encoding="utf-8")
    main(["translate", str(toy_model_dir), "-i", str(src), "--beam", "3",
          "--constraints", str(cons)])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and wanted in out[0] and out[1:] == free[1:]
    cons.write_text(json.dumps([wanted]) + "\n", encoding="utf-8")
    assert main(["translate", str(toy_model_dir), "-i", str(src), "--constraints", str(cons)])
    assert "the constraints end before input line 1" in capsys.readouterr().err
    cons.write_text('["ok"]\n{"a": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"cons.jsonl:2: expected a JSON list"):
        list(read_constraint_lines(cons))
