"""What a request asks to see, counted before anything is decoded.

A translation's own text is bounded by ``max_texts`` and ``max_chars``; what can
make a response large is what a request asks to see inside the model. Every
attention map is (layers, heads, rows, columns) numbers, the search view a row
of ``candidates`` per output piece and, for beam search, up to ``2 * beam``
tree nodes per step. Rows are output pieces, whose number is bounded before
decoding by the output's length budget (``rosetta.decode.common.Lengths``:
``max_len_a * source length + max_len_b``, at most the model's positions), so
these counts are upper bounds known when the request arrives: the service
refuses a request over ``max_attention_weights`` or ``max_search_items``
(``ServeConfig``) before it queues it, and what it returns never exceeds them.
"""

from __future__ import annotations

from collections.abc import Sequence

from rosetta.config import DecodeConfig, ModelConfig


def maps_per_kind(model: ModelConfig) -> dict[str, int]:
    """How many attention maps (layers x heads) each kind of ``model`` returns; a
    kind it lacks is left out. The RNN's alignment is one map, as ``cross``."""
    if model.arch == "rnn":
        return {"cross": 1}
    heads = {kind: 0 for kind in ("cross", "encoder_self", "decoder_self")}
    for module in model.attention_modules():  # a pruned model's layers differ
        part, _, kind = module.split(".")
        heads["cross" if kind == "cross" else f"{part}_self"] += model.heads_at(module)
    return heads


def longest_output(source_length: int, options: DecodeConfig, limit: int) -> int:
    """The most pieces a search may produce for a source (<eos> included): the
    length budget of ``Lengths.per_source``, plus one for rounding."""
    budget = int(source_length * options.max_len_a + options.max_len_b) + 1
    return max(1, min(budget, limit))


def attention_size(
    source_lengths: Sequence[int],
    kinds: Sequence[str],
    maps: dict[str, int],
    options: DecodeConfig,
    limit: int,
) -> int:
    """The most attention weights a request can get back: for each non-empty
    source of ``S`` pieces and output of at most ``T``, ``maps[kind]`` maps of
    T x S (cross), S x S (encoder_self) or T x T (decoder_self)."""
    total = 0
    for length in source_lengths:
        if length == 0:  # an empty text has no attention
            continue
        rows = longest_output(length, options, limit)
        cells = {"cross": rows * length, "encoder_self": length * length, "decoder_self": rows**2}
        total += sum(maps.get(kind, 0) * cells[kind] for kind in kinds)
    return total


def search_size(
    source_lengths: Sequence[int],
    candidates: int,
    tree_width: int,
    options: DecodeConfig,
    limit: int,
) -> int:
    """The most search items a request can get back: for each non-empty source,
    ``candidates`` per output piece and, with ``tree_width`` > 0 (a traced search
    with a tree, ``Search.tree_width``), the root and ``tree_width`` nodes per step."""
    total = 0
    for length in source_lengths:
        if length == 0:
            continue
        rows = longest_output(length, options, limit)
        total += candidates * rows + (1 + tree_width * rows if tree_width else 0)
    return total
