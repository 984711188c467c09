"""The contract every model family and every search keeps, run over what is
registered: the architectures of ``rosetta.config.ARCHITECTURES`` and the searches
of ``rosetta.decode.search.SEARCHES``. A new family or search is tested here by
registering it.

- a family: attention maps of the stated shapes; if it decodes step by step
  (``IncrementalDecoder``), cached decoding equals the full teacher-forced pass;
  its model directory loads back to the same outputs;
- a search, on every family that can run it: one result per source with its
  ``nbest`` hypotheses of real tokens within the length budget, a batch of N
  equal to N batches of 1 (a random search: the same seed, the same output),
  a trace that lines up with the hypothesis, a tree where it says it has one;
- every option of every search reaches the command line and the HTTP schema.
"""

from __future__ import annotations

import pytest
import torch

from rosetta.config import ARCHITECTURES, model_config
from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from rosetta.decode.common import Lengths
from rosetta.decode.search import SEARCHES, configure, option_fields
from rosetta.model import build_model
from rosetta.model.interface import IncrementalDecoder

VOCAB = 24
SOURCES = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [19, 20, 21]]
LENGTHS = Lengths(1.5, 4, limit=30)


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model of family ``arch``: its section with small sizes for the fields
    it has (``d_ff``, ``heads``, ``hidden_size``: set only where they exist)."""
    fields = ARCHITECTURES[arch].model_fields
    sizes = {"d_ff": 32, "heads": 2, "hidden_size": 16, "max_positions": 64}
    values = {"arch": arch, "d_model": 16, "encoder_layers": 1, "decoder_layers": 2}
    values |= {key: value for key, value in sizes.items() if key in fields}
    values |= {"dropout": 0.0}
    torch.manual_seed(seed)
    model = build_model(model_config(values), VOCAB, VOCAB).eval()
    with torch.no_grad():  # sharper distributions: fewer near-ties between outputs
        model.output.weight.mul_(4.0)
    return model


def padded(rows: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


FAMILIES = sorted(ARCHITECTURES)
PAIRS = [
    (arch, search)
    for arch in FAMILIES
    for search in SEARCHES
    if search.runs_on(tiny(arch))  # every registered search a family can run
]


def test_every_family_runs_some_search_and_every_search_some_family():
    assert {arch for arch, _ in PAIRS} == set(FAMILIES)
    assert {search for _, search in PAIRS} == set(SEARCHES)


# ---- families ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", FAMILIES)
def test_attention_maps_have_the_stated_shapes(arch):
    model = tiny(arch)
    src = padded(SOURCES[:2])
    tgt_in = padded([[BOS_ID, 5, 6, 7], [BOS_ID, 8]])
    maps = model.attention_maps(src, tgt_in)
    assert maps and set(maps) <= {"cross", "encoder_self", "decoder_self"}
    sides = {
        "cross": (tgt_in.size(1), src.size(1)),
        "encoder_self": (src.size(1), src.size(1)),
        "decoder_self": (tgt_in.size(1), tgt_in.size(1)),
    }
    for kind, layers in maps.items():
        for weights in layers:
            assert weights.dim() == 4 and weights.shape[0] == 2
            assert tuple(weights.shape[2:]) == sides[kind]
            real = weights[1, :, :2]  # rows of the shorter target's real positions
            torch.testing.assert_close(real.sum(-1), torch.ones_like(real.sum(-1)))


@pytest.mark.parametrize("arch", [a for a in FAMILIES if isinstance(tiny(a), IncrementalDecoder)])
def test_cached_decoding_equals_the_full_pass(arch):
    model = tiny(arch)
    src = padded(SOURCES)
    tgt_in = torch.tensor([[BOS_ID, 5, 9, 11, 6, 7]] * len(SOURCES))
    with torch.no_grad():
        full = model(src, tgt_in).float()
        state = model.init_state(model.encode(src))
        steps = [model.decode_step(tgt_in[:, t], state).float() for t in range(tgt_in.size(1))]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_model_directory_loads_back_to_the_same_outputs(arch, untrained_model_dir, tmp_path):
    from rosetta.data.tokenizer import Tokenizer
    from rosetta.modeldir import load_model_dir, save_model_dir

    config, tokenizer, _ = load_model_dir(untrained_model_dir)
    values = tiny(arch).cfg.model_dump()
    config = config.model_copy(update={"model": model_config(values), "decode": config.decode})
    tokenizer = Tokenizer.load(untrained_model_dir)
    torch.manual_seed(1)
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).eval()
    saved = save_model_dir(tmp_path / "model", config, untrained_model_dir, model, {})
    loaded_config, _, loaded = load_model_dir(saved)
    assert loaded_config.model == config.model
    src = padded(SOURCES[:2])
    tgt_in = padded([[BOS_ID, 5, 6], [BOS_ID, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(src, tgt_in), model(src, tgt_in))


# ---- searches ------------------------------------------------------------------------


def run(search, model, rows, trace=False):
    return search.run(model, padded(rows), LENGTHS, trace=trace)


def several(search_type, model):
    """The search with several hypotheses per source, where it can return them."""
    given = {"search": search_type.kind()}
    if "nbest" in search_type.reads():
        given["nbest"] = 2
    return configure({}, given, [search_type])


@pytest.mark.parametrize(("arch", "search_type"), PAIRS)
def test_results_have_the_stated_shape(arch, search_type):
    model = tiny(arch)
    search = several(search_type, model)
    found = run(search, model, SOURCES)
    assert len(found) == len(SOURCES)
    budget = LENGTHS.per_source(padded(SOURCES)).tolist()
    for result, limit in zip(found, budget):
        assert 1 <= len(result.hypotheses) <= search.nbest and result.trace is None
        for hypothesis in result.hypotheses:
            assert not {PAD_ID, BOS_ID, EOS_ID} & set(hypothesis.tokens)
            assert len(hypothesis.tokens) < limit  # <eos> counts in the budget
        if not search_type.random:  # ranked best first
            scores = [h.score for h in result.hypotheses]
            assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(("arch", "search_type"), PAIRS)
def test_a_batch_gives_what_each_source_gives_alone(arch, search_type):
    model = tiny(arch)
    search = several(search_type, model)
    together = run(search, model, SOURCES)
    if search_type.random:  # draws depend on the batch; the same seed repeats them
        again = run(search, model, SOURCES)
        assert [[h.tokens for h in r.hypotheses] for r in together] == [
            [h.tokens for h in r.hypotheses] for r in again
        ]
        return
    for source, result in zip(SOURCES, together):
        alone = run(search, model, [source])[0]
        assert [h.tokens for h in alone.hypotheses] == [h.tokens for h in result.hypotheses]
        for a, b in zip(alone.hypotheses, result.hypotheses):
            assert a.score == pytest.approx(b.score, abs=1e-4)


@pytest.mark.parametrize(("arch", "search_type"), PAIRS)
def test_a_trace_lines_up_with_the_hypothesis_and_changes_nothing(arch, search_type):
    model = tiny(arch)
    search = several(search_type, model)
    plain = run(search, model, SOURCES)
    traced = run(search, model, SOURCES, trace=True)
    for a, b in zip(plain, traced):
        assert [h.tokens for h in a.hypotheses] == [h.tokens for h in b.hypotheses]
        trace, best = b.trace, b.hypotheses[0].tokens
        assert len(trace.decoder_input) == len(trace.produced)
        assert trace.produced[: len(best)] == best  # then <eos>, for a left-to-right one
        assert (trace.tree is not None) == search.has_tree
        if trace.tree is not None:
            nodes = trace.tree["nodes"]
            assert nodes[0]["status"] == "root" and len(trace.tree["chosen"]) == search.nbest
            assert len(nodes) <= 1 + search.tree_width() * LENGTHS.limit


def test_every_search_option_reaches_the_command_line_and_the_http_schema():
    from rosetta.cli import build_parser
    from rosetta.serve.schemas import TranslateRequest

    translate = build_parser().parse_args(["translate", "MODEL"])
    for name, info in option_fields().items():
        assert hasattr(translate, name), f"--{name.replace('_', '-')} is missing"
        assert name in TranslateRequest.model_fields, f"{name} is not in the HTTP schema"
        assert info.description, f"{name} has no description (its help text)"
    kinds = TranslateRequest.model_fields["search"].annotation
    assert {search.kind() for search in SEARCHES} <= set(str(kinds).split("'"))
