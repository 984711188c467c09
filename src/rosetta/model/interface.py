"""The small incremental interface between a model and the search algorithms.

Decoding (``rosetta.decode``) never looks inside a model. It calls:

1. ``encode(src)`` once per batch -> ``EncoderOutput``;
2. ``init_state(encoder_output)`` -> ``DecoderState`` holding everything the
   decoder carries between steps (the Transformer: cross-attention K/V of every
   layer and the growing self-attention K/V cache; the RNN: its hidden state);
3. ``decode_step(tokens, state)`` -> next-token logits (batch, vocab), with the
   state advanced by one position.

``DecoderState.select(index)`` reorders or shrinks the batch (beam search
re-ranking hypotheses, greedy search dropping finished sentences); it works on
any nesting of lists, tuples and dicts of batch-first tensors.
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


@dataclass
class DecoderState:
    """What incremental decoding carries from step to step; ``step`` positions done."""

    tensors: dict[str, Any] = field(default_factory=dict)
    step: int = 0

    def select(self, index: torch.Tensor) -> None:
        """Keeps batch rows ``index`` (in that order, repeats allowed), in place."""
        self.tensors = _select(self.tensors, index)

    @property
    def batch_size(self) -> int:
        return int(self.tensors["memory_mask"].size(0))


class Seq2SeqModel(Protocol):
    """What ``rosetta.decode`` needs of a model (Transformer and RNN alike)."""

    tgt_vocab_size: int

    def encode(self, src: torch.Tensor) -> EncoderOutput: ...

    def init_state(self, encoder_output: EncoderOutput) -> DecoderState: ...

    def decode_step(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor: ...
