"""The small incremental interface between a model and the search algorithms.

Decoding (``rosetta.decode``) never looks inside a model. It calls:

1. ``encode(src)`` once per batch -> ``EncoderOutput``;
2. ``init_state(encoder_output)`` -> ``DecoderState`` holding everything the
   decoder carries between steps (the Transformer: cross-attention K/V of every
   layer and the growing self-attention K/V cache; the RNN: its hidden state);
3. ``decode_step(tokens, state)`` -> next-token logits (batch, vocab), with the
   state advanced by one position.

A ``DecoderState`` keeps two kinds of batch-first tensors (any nesting of
lists, tuples and dicts; an object with ``select_rows`` reorders itself):
``sources``, one row per source sentence (the encoder memory, the
cross-attention K/V), and ``tensors``, one row per hypothesis (the
self-attention cache, the RNN state). Beam search gives every source
``group = beam`` hypotheses in consecutive rows (``expand``); the model
attends from the whole group to the one copy of its source, so re-ranking
hypotheses (``select``) never copies the encoder side. ``select_sources``
drops finished sentences with all their hypotheses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class EncoderOutput:
    """memory: (batch, src_len, dim); pad_mask: (batch, src_len), True on padding;
    final_state: what else the decoder starts from (the RNN's final encoder states);
    packing: where the real tokens are, when the encoder worked on them alone (the
    Transformer's ``Packing``), for the decoder side to do the same."""

    memory: torch.Tensor
    pad_mask: torch.Tensor
    final_state: Any = None
    packing: Any = None


@runtime_checkable
class RowSelectable(Protocol):
    """A state object that reorders its own batch rows (the Transformer's KV cache)."""

    def select_rows(self, index: torch.Tensor) -> Any: ...


def _select(value: Any, index: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index)
    if isinstance(value, RowSelectable):
        return value.select_rows(index)
    if isinstance(value, dict):
        return {key: _select(item, index) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_select(item, index) for item in value)
    return value


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nesting of dicts, lists and tuples, in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (dict, list, tuple)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _tensors(item)


@dataclass
class DecoderState:
    """What incremental decoding carries from step to step; ``step`` positions done.

    ``sources``: per-source tensors (batch = number of sources); ``tensors``:
    per-hypothesis tensors (batch = sources * ``group``, a source's hypotheses
    in consecutive rows).
    """

    tensors: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    group: int = 1
    step: int = 0
    fixed: dict[str, Any] = field(default_factory=dict)  # the same for the whole search

    def select(self, index: torch.Tensor) -> None:
        """Keeps hypothesis rows ``index`` (in that order, repeats allowed), in place.

        Row ``r`` of the result must belong to the same source as row ``r`` before
        (beam search re-ranks within each source's group); with ``group == 1`` any
        reordering of the sources goes through ``select_sources``.
        """
        self.tensors = _select(self.tensors, index)

    def select_sources(self, index: torch.Tensor) -> None:
        """Keeps sources ``index`` (in that order) with all their hypotheses, in place."""
        self.sources = _select(self.sources, index)
        if self.group > 1:
            offsets = torch.arange(self.group, device=index.device)
            index = (index[:, None] * self.group + offsets).view(-1)
        self.tensors = _select(self.tensors, index)

    def expand(self, group: int) -> None:
        """Gives each source ``group`` hypotheses, copies of its single current one."""
        if self.group != 1:
            raise ValueError("the state is already expanded")
        first = next(_tensors(self.sources))
        rows = torch.arange(first.size(0), device=first.device).repeat_interleave(group)
        self.tensors = _select(self.tensors, rows)
        self.group = group

    @property
    def num_sources(self) -> int:
        return int(next(_tensors(self.sources)).size(0))


class Seq2SeqModel(Protocol):
    """What ``rosetta.decode`` needs of a model (Transformer and RNN alike)."""

    tgt_vocab_size: int

    def encode(self, src: torch.Tensor) -> EncoderOutput: ...

    def init_state(self, encoder_output: EncoderOutput) -> DecoderState: ...

    def decode_step(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor: ...
