"""The small incremental interface between a model and the search algorithms.

Decoding (``rosetta.decode``) never looks inside a model. It calls:

1. ``encode(src)`` once per batch -> ``EncoderOutput``;
2. ``init_state(encoder_output)`` -> ``DecoderState`` holding everything the
   decoder carries between steps (the Transformer: cross-attention K/V of every
   layer and the growing self-attention K/V cache; the RNN: its hidden state);
3. ``decode_step(tokens, state)`` -> next-token logits (batch, vocab), with the
   state advanced by one position.

A ``DecoderState`` keeps two kinds of batch-first tensors (any nesting of
lists, tuples and dicts): ``sources``, one row per source sentence (the
encoder memory, the cross-attention K/V), and ``tensors``, one row per
hypothesis (the self-attention cache, the RNN state). Beam search gives every
source ``group = beam`` hypotheses in consecutive rows (``expand``); the model
attends from the whole group to the one copy of its source, so re-ranking
hypotheses (``select``) never copies the encoder side. ``select_sources``
drops finished sentences with all their hypotheses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class EncoderOutput:
    """memory: (batch, src_len, dim); pad_mask: (batch, src_len), True on padding;
    final_state: what else the decoder starts from (the RNN's final encoder states)."""

    memory: torch.Tensor
    pad_mask: torch.Tensor
    final_state: Any = None


def _select(value: Any, index: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index)
    if isinstance(value, dict):
        return {key: _select(item, index) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_select(item, index) for item in value)
    return value


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value
    for item in items:
        if isinstance(item, (torch.Tensor, dict, list, tuple)):
            try:
                return _first_tensor(item)
            except LookupError:
                continue
    raise LookupError("the decoder state holds no per-source tensor")


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
        rows = torch.arange(self.num_sources, device=self._device()).repeat_interleave(group)
        self.tensors = _select(self.tensors, rows)
        self.group = group

    @property
    def num_sources(self) -> int:
        return int(_first_tensor(self.sources).size(0))

    def _device(self) -> torch.device:
        return _first_tensor(self.sources).device


class Seq2SeqModel(Protocol):
    """What ``rosetta.decode`` needs of a model (Transformer and RNN alike)."""

    tgt_vocab_size: int

    def encode(self, src: torch.Tensor) -> EncoderOutput: ...

    def init_state(self, encoder_output: EncoderOutput) -> DecoderState: ...

    def decode_step(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor: ...
