"""Continuous batching: sentences join and leave a running search between steps, and
each one's output is what the search gives it alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rosetta.config import TransformerConfig, model_config
from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from rosetta.decode.beam import BeamSearch
from rosetta.decode.common import Lengths
from rosetta.decode.greedy import GreedySearch
from rosetta.decode.sampling import SamplingSearch
from rosetta.model import build_model
from rosetta.model.attention import KVCache

VOCAB = 24
DECODERS = {
    "full": {},
    "local": {"variant": "local", "radius": 2},
    "linear": {"variant": "linear"},
    "favor": {"variant": "linear", "feature_map": "favor", "features": 16},
    "sparse": {"variant": "sparse", "radius": 1, "global_tokens": 2},
}


def transformer(decoder: str = "full", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        d_model=32, d_ff=64, heads=4, encoder_layers=1, decoder_layers=2, dropout=0.0,
        max_positions=64, decoder_attention=DECODERS[decoder],
    )  # fmt: skip
    model = build_model(cfg, VOCAB, VOCAB).eval()
    with torch.no_grad():  # sharper distributions: no float-noise ties between tokens
        model.output.weight.mul_(4.0)
    return model


def rnn(cell: str = "lstm", attention: str = "bahdanau", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    options = dict(arch="rnn", d_model=16, hidden_size=24, dropout=0.0, rnn_cell=cell)
    model = build_model(model_config({**options, "attention": attention}), VOCAB, VOCAB).eval()
    with torch.no_grad():
        model.output.weight.mul_(4.0)
    return model


MODELS = {
    **{f"transformer-{name}": (lambda name=name: transformer(name)) for name in DECODERS},
    "rnn-lstm-bahdanau": lambda: rnn("lstm", "bahdanau"),
    "rnn-gru-general": lambda: rnn("gru", "general"),
}


def sources(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (count,), generator=generator).tolist()
    return [torch.randint(4, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def alone(model, search, ids: list[int], lengths: Lengths):
    return search.run(model, torch.tensor([ids]), lengths)[0]


def tokens(found) -> list[list[int]]:
    return [h.tokens for h in found.hypotheses]


@pytest.mark.parametrize("name", MODELS)
def test_a_row_that_joins_late_gets_the_logits_it_gets_alone(name):
    model = MODELS[name]()
    first, late = torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([[11, 12, 13]])
    steps = [4, 9, 7, 5, 6, 8]  # what the late row reads after <bos>
    with torch.inference_mode():
        state = model.init_state(model.encode(late))
        expected = [model.decode_step(torch.tensor([t]), state) for t in [BOS_ID, *steps]]
        state = model.init_state(model.encode(first))
        for t in [BOS_ID, 4, 4]:  # three positions before the late row joins
            model.decode_step(torch.tensor([t]), state)
        state.admit(model.init_state(model.encode(late)))
        got = []
        for position, t in enumerate([BOS_ID, *steps]):
            if position < 3:  # beside the first row (which reads 5s)
                got.append(model.decode_step(torch.tensor([5, t]), state)[1:])
                continue
            if position == 3:  # the first row leaves: the late one goes on alone
                state.select_sources(torch.tensor([1]))
            got.append(model.decode_step(torch.tensor([t]), state))
        for position, (want, have) in enumerate(zip(expected, got)):
            torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4, msg=f"position {position}")


def test_a_cache_drops_the_slots_no_row_uses_any_more():
    cache = KVCache()
    kv = torch.randn(2, 1, 2, 4, 8)
    for _ in range(5):
        cache.append(kv)
    cache.join(KVCache(), rows=1)  # a row begins at slot 5
    assert cache.starts.tolist() == [0, 0, 5]
    assert cache.mask()[:, 0, 0].isinf().tolist() == [[False] * 5] * 2 + [[True] * 5]
    cache.append(torch.randn(3, 1, 2, 4, 8))
    cache.select_rows(torch.tensor([2]))  # the two old rows leave
    assert cache.length == 1 and cache.starts is None and cache.mask() is None


SEARCHES = {
    "greedy": GreedySearch(GreedySearch.Options()),
    "beam": BeamSearch(BeamSearch.Options(beam=3, nbest=2)),
    "sampling": SamplingSearch(SamplingSearch.Options(nbest=2, temperature=1.3, seed=5)),
}


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("name", ["transformer-full", "transformer-local", "rnn-gru-general"])
def test_the_engine_gives_each_sentence_its_output_alone(name, search):
    model, search = MODELS[name](), SEARCHES[search]
    lengths = Lengths(1.0, 4, 64)
    texts = sources(9, seed=3)
    with torch.inference_mode():
        expected = [tokens(alone(model, search, ids, lengths)) for ids in texts]
        engine = search.engine(model, lengths, max_sentences=3)
        for index, ids in enumerate(texts):
            engine.add(ids, index)
        results = engine.run()
    assert [tokens(results[i]) for i in range(len(texts))] == expected
    assert engine.stats.admissions > 1  # sentences joined a running batch


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    order=st.permutations(range(7)),
    arrivals=st.lists(st.integers(0, 6), min_size=7, max_size=7),
    room=st.integers(1, 4),
    search=st.sampled_from(sorted(SEARCHES)),
)
def test_outputs_do_not_depend_on_arrival_order_or_company(order, arrivals, room, search):
    model, search = MODEL, SEARCHES[search]
    texts = sources(7, seed=11)
    lengths = Lengths(1.0, 3, 64)
    with torch.inference_mode():
        engine = search.engine(model, lengths, max_sentences=room)
        results, step, pending = {}, 0, list(order)
        while pending or engine.busy:
            while pending and arrivals[pending[0]] <= step:  # arrives at its step
                index = pending.pop(0)
                engine.add(texts[index], index)
            results.update(engine.step())
            step += 1
    for index in range(len(texts)):
        assert tokens(results[index]) == EXPECTED[search.kind()][index], index


MODEL = transformer("full", seed=4)
EXPECTED = {
    search.kind(): [
        tokens(alone(MODEL, search, ids, Lengths(1.0, 3, 64))) for ids in sources(7, seed=11)
    ]
    for search in SEARCHES.values()
}


class NoEnd(torch.nn.Module):
    """A model that never ends a sentence by itself: <eos> only at its budget."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def encode(self, src):
        return self.model.encode(src)

    def init_state(self, encoded):
        return self.model.init_state(encoded)

    def decode_step(self, tokens, state):
        logits = self.model.decode_step(tokens, state).clone()
        logits[:, EOS_ID] = -1e4
        return logits


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_a_row_that_ends_at_step_one_beside_one_that_runs_to_its_limit(search):
    model, search = NoEnd(transformer("full", seed=2)), SEARCHES[search]
    lengths = Lengths(1.0, 0, 64)  # the budget is the source's length
    short, long = [7], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    with torch.inference_mode():
        engine = search.engine(model, lengths, max_sentences=2)
        engine.add(long, "long")
        engine.add(short, "short")
        first = engine.step()
        assert [key for key, _ in first] == ["short"]  # ended at step 1, its output empty
        assert tokens(first[0][1])[0] == []
        rest = engine.run()
    assert len(tokens(rest["long"])[0]) == len(long) - 1  # ran to its limit (<eos> last)
    assert tokens(rest["long"]) == tokens(alone(model, search, long, lengths))
    assert engine.stats.steps == len(long)


def test_a_discarded_source_is_not_returned_and_frees_its_place():
    model = transformer()
    search = SEARCHES["greedy"]
    with torch.inference_mode():
        engine = search.engine(model, Lengths(1.0, 3, 64), max_sentences=1)
        engine.add([5, 6, 7], "kept")
        engine.add([8, 9], "dropped")
        engine.discard("dropped")
        assert set(engine.run()) == {"kept"}


def test_a_token_budget_limits_the_padded_source_tokens():
    model = transformer()
    search = SEARCHES["greedy"]
    texts = sources(8, seed=5)
    with torch.inference_mode():
        engine = search.engine(model, Lengths(1.0, 3, 64), max_sentences=64, max_tokens=12)
        for index, ids in enumerate(texts):
            engine.add(ids, index)
        most = 0
        while engine.busy:
            engine.step()
            lengths = engine._source_lengths
            most = max(most, len(lengths) * max(lengths, default=0))
    assert 0 < most <= max(12, max(len(t) for t in texts))


def test_padding_in_a_joined_batch_is_masked():
    """Sources of different lengths joined into one memory: the shorter one's padded
    positions are hidden (its output is its own)."""
    model = transformer()
    search = SEARCHES["beam"]
    lengths = Lengths(1.0, 4, 64)
    short, long = [9, 10], [4, 5, 6, 7, 8, 9, 10, 11]
    with torch.inference_mode():
        engine = search.engine(model, lengths, max_sentences=2)
        engine.add(short, "short")
        engine.step()
        engine.add(long, "long")  # joins with a longer source: the memory is padded
        results = engine.run()
    assert tokens(results["short"]) == tokens(alone(model, search, short, lengths))
    assert tokens(results["long"]) == tokens(alone(model, search, long, lengths))
    assert PAD_ID not in [t for h in results["long"].hypotheses for t in h.tokens]
