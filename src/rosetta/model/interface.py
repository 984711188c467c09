"""What every model family is: ``Seq2Seq``, and its small incremental interface.

A family (the Transformer, the RNN) subclasses ``Seq2Seq`` and so provides:

- ``hidden_states(src, tgt_in)``: the teacher-forced decoder states, from which
  ``forward`` (logits) follows, and with ``output`` the training objectives'
  losses (``rosetta.train.objectives``; the model holds no loss of its own);
- ``scheduled_states``, the decoder states under scheduled sampling;
- ``attention_maps(src, tgt_in)`` for plots;
- ``encode(src)``, once per batch, and one of the capabilities below, for search;
- ``prepare_for_inference()``: the model in eval mode with its linear layers'
  inference layouts made once (see ``rosetta.model.linear``).

Decoding (``rosetta.decode``) never looks inside a model: a search names the
capability it needs, and a family has it by having its methods (a
``typing.Protocol``), not by a flag or a base class that refuses.

``IncrementalDecoder`` (the Transformer, the RNN), for left-to-right searches:

1. ``encode(src)`` once per batch -> ``EncoderOutput``;
2. ``init_state(encoder_output)`` -> ``DecoderState`` holding everything the
   decoder carries between steps (the Transformer: cross-attention K/V of every
   layer and the growing self-attention K/V cache; the RNN: its hidden state);
3. ``decode_step(tokens, state)`` -> next-token logits (batch, vocab), with the
   state advanced by one position.

``IterativeRefiner`` (the non-autoregressive Transformer), for mask-predict:
``encode``, then ``predict_lengths`` (target lengths to try), ``memories`` (the
encoder side each pass reads) and ``fill_in`` (one pass over a target with
``<mask>`` where unknown).

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

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from rosetta.data.tokenizer import PAD_ID
from rosetta.model.layers import Block


@dataclass
class EncoderOutput:
    """memory: (batch, src_len, dim); pad_mask: (batch, src_len), True on padding;
    final_state: what else the decoder starts from (the RNN's final encoder states);
    padding: the Transformer's ``SourcePadding``, for the cross-attention to use the
    same packing of real tokens; attention: the encoder's self-attention weights per
    layer, when asked for."""

    memory: torch.Tensor
    pad_mask: torch.Tensor
    final_state: Any = None
    padding: Any = None
    attention: list[torch.Tensor] = field(default_factory=list)


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


@runtime_checkable
class RowJoinable(Protocol):
    """A state object that takes in the rows of new sentences (a cache: empty rows)."""

    def join(self, other: Any, rows: int) -> Any: ...


def _join(value: Any, other: Any, rows: int) -> Any:
    """``value``'s rows followed by ``other``'s (``rows`` of them), for the states of
    new sentences joining a running search (``DecoderState.admit``). Plain tensors
    are concatenated along the batch, each padded at the end of every other
    dimension to the longer of the two (zeros; False: a boolean mask then hides
    the padded positions); an object joins itself (``RowJoinable``)."""
    if isinstance(value, torch.Tensor):
        shape = [max(a, b) for a, b in zip(value.shape[1:], other.shape[1:])]

        def padded(t: torch.Tensor) -> torch.Tensor:
            grow = [x for size, have in zip(reversed(shape), reversed(t.shape[1:]))
                    for x in (0, size - have)]  # fmt: skip
            return torch.nn.functional.pad(t, grow) if any(grow) else t

        return torch.cat([padded(value), padded(other)])
    if isinstance(value, RowJoinable):
        return value.join(other, rows)
    if isinstance(value, dict):
        return {key: _join(item, other[key], rows) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_join(a, b, rows) for a, b in zip(value, other))
    return value


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nesting of dicts, lists, tuples and dataclasses, in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif dataclasses.is_dataclass(value):
        for item in dataclasses.fields(value):
            yield from _tensors(getattr(value, item.name))
    elif isinstance(value, (dict, list, tuple)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _tensors(item)


@dataclass
class DecoderState:
    """What incremental decoding carries from step to step; ``step`` positions done.

    ``sources``: per-source tensors (batch = number of sources); ``tensors``:
    per-hypothesis tensors (batch = sources * ``group``, a source's hypotheses
    in consecutive rows). ``born``: the ``step`` at which each hypothesis row
    began (rows of sentences that joined a running search, ``admit``), or None
    while every row began at step 0; a row's position is ``step - born``.
    """

    tensors: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    group: int = 1
    step: int = 0
    born: torch.Tensor | None = None

    @property
    def positions(self) -> int | torch.Tensor:
        """The position each row decodes next: one int while all rows began together,
        else (rows,)."""
        return self.step if self.born is None else self.step - self.born

    def _rows(self, index: torch.Tensor) -> None:
        self.tensors = _select(self.tensors, index)
        if self.born is not None:
            self.born = self.born.index_select(0, index)

    def select(self, index: torch.Tensor) -> None:
        """Keeps hypothesis rows ``index`` (in that order, repeats allowed), in place.

        Row ``r`` of the result must belong to the same source as row ``r`` before
        (beam search re-ranks within each source's group); with ``group == 1`` any
        reordering of the sources goes through ``select_sources``.
        """
        self._rows(index)

    def select_sources(self, index: torch.Tensor) -> None:
        """Keeps sources ``index`` (in that order) with all their hypotheses, in place."""
        self.sources = _select(self.sources, index)
        if self.group > 1:
            offsets = torch.arange(self.group, device=index.device)
            index = (index[:, None] * self.group + offsets).view(-1)
        self._rows(index)

    def expand(self, group: int) -> None:
        """Gives each source ``group`` hypotheses, copies of its single current one."""
        if self.group != 1:
            raise ValueError("the state is already expanded")
        first = next(_tensors(self.sources))
        rows = torch.arange(first.size(0), device=first.device).repeat_interleave(group)
        self._rows(rows)
        self.group = group

    def admit(self, new: DecoderState) -> None:
        """Takes in the sentences of ``new``, a state of the same group at step 0 (new
        sentences joining the search between two steps), after its own: their rows
        begin at this state's ``step``. Caches gain empty rows (``RowJoinable``), and
        per-source tensors are padded to the longer source."""
        if new.step != 0 or new.group != self.group:
            raise ValueError("only a state at step 0, of the same group, can be admitted")
        rows = new.num_sources * new.group
        first = next(_tensors(self.sources))
        if self.born is not None or self.step:
            born = self.born
            if born is None:
                born = torch.zeros(self.num_sources * self.group, dtype=torch.long,
                                   device=first.device)  # fmt: skip
            self.born = torch.cat([born, born.new_full((rows,), self.step)])
        self.sources = _join(self.sources, new.sources, new.num_sources)
        self.tensors = _join(self.tensors, new.tensors, rows)

    @property
    def num_sources(self) -> int:
        return int(next(_tensors(self.sources)).size(0))


@runtime_checkable
class IncrementalDecoder(Protocol):
    """A model that writes left to right, one token per call, with a cache: what
    greedy search, beam search and sampling need."""

    def encode(self, src: torch.Tensor) -> EncoderOutput:
        """src (batch, src_len) -> the encoder output, once per batch."""

    def init_state(self, encoder_output: EncoderOutput) -> DecoderState:
        """What the decoder carries between steps, at step 0."""

    def decode_step(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """tokens (batch,) at position ``state.step`` -> logits (batch, tgt_vocab);
        advances ``state`` by one position."""


@runtime_checkable
class IterativeRefiner(Protocol):
    """A model that fills in every target position at once and can be asked again
    with some positions re-masked: what mask-predict needs."""

    def encode(self, src: torch.Tensor) -> EncoderOutput:
        """src (batch, src_len) -> the encoder output, once per batch."""

    def predict_lengths(
        self,
        encoder_output: EncoderOutput,
        src_lengths: torch.Tensor,
        candidates: int,
        max_lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``candidates`` likeliest target lengths per source, best first, and
        whether each is possible (within 1..``max_lengths``)."""

    def memories(self, encoder_output: EncoderOutput) -> list[Any]:
        """The encoder side every pass reads, made once (rows: ``select_rows``)."""

    def fill_in(
        self, memories: list[Any], tokens: torch.Tensor, where: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One pass over ``tokens`` (``<mask>`` where unknown): logits at every
        position, or at the ``where`` positions only."""


class Seq2Seq(Block, ABC):
    """Base of every model family. Subclasses set ``cfg``, ``src_vocab_size``,
    ``tgt_vocab_size`` and ``output`` (the projection to the target vocabulary),
    and implement ``encode`` and the capability their search needs
    (``IncrementalDecoder`` or ``IterativeRefiner``)."""

    cfg: Any
    src_vocab_size: int
    tgt_vocab_size: int
    output: nn.Module

    # top-level submodules by part (``parts``); every family names its modules so
    # (what a family lacks is skipped; the RNN's bridges and attention are its decoder's)
    PARTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "embeddings": ("src_embed", "tgt_embed", "output"),
        "encoder": ("encoder",),
        "decoder": ("decoder", "attention", "readout", "bridge", "cell_bridge", "length_head"),
    }

    def parts(self, *names: str) -> list[nn.Parameter]:
        """The parameters of the named parts (``PARTS``): what fine-tuning can freeze.
        A parameter tied into several parts (the output layer tied to the target
        embeddings) is listed once."""
        prefixes = tuple(f"{module}." for name in names for module in self.PARTS[name])
        return [p for n, p in self.named_parameters() if n.startswith(prefixes)]

    # ---- training ------------------------------------------------------------------
    @abstractmethod
    def hidden_states(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: src (batch, src_len), tgt_in (batch, tgt_len) -> the
        states the output layer reads, (batch, tgt_len, d_model)."""

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Logits (batch, tgt_len, tgt_vocab) for every target position."""
        return self.output(self.hidden_states(src, tgt_in))

    def scheduled_states(
        self, src: torch.Tensor, tgt_in: torch.Tensor, rate: float, sample: bool = False
    ) -> torch.Tensor:
        """``hidden_states`` under scheduled sampling (Bengio et al. 2015), each decoder
        input after <bos> being the model's own prediction with probability ``rate``
        (``rosetta.train.objectives.ScheduledSampling`` calls it; it is meant for an
        ``IncrementalDecoder``). Here the parallel two-pass form
        (``with_own_predictions``); a family that decodes step by step in training
        anyway (the RNN) overrides it with the classic per-step form."""
        return self.hidden_states(src, self.with_own_predictions(src, tgt_in, rate, sample))

    def with_own_predictions(
        self, src: torch.Tensor, tgt_in: torch.Tensor, rate: float, sample: bool = False
    ) -> torch.Tensor:
        """Scheduled sampling's decoder input, in the parallel two-pass form: a
        teacher-forced pass without gradients predicts every position (its most
        probable token, or one drawn with ``sample``), and each input after <bos> is
        replaced by the prediction of it with probability ``rate``. The draws use
        PyTorch's global generator, which checkpoints save (exact resume)."""
        with torch.no_grad():
            logits = self(src, tgt_in).float()  # position t predicts input t + 1
            if sample:
                flat = torch.multinomial(logits.softmax(-1).view(-1, logits.size(-1)), 1)
                guess = flat.view(logits.shape[:-1])
            else:
                guess = logits.argmax(-1)
        predicted = torch.cat([tgt_in[:, :1], guess[:, :-1]], dim=1)
        swap = torch.rand(tgt_in.shape, device=tgt_in.device) < rate
        swap[:, 0] = False  # <bos> stays
        swap &= tgt_in.ne(PAD_ID)
        return torch.where(swap, predicted, tgt_in)

    @abstractmethod
    def attention_maps(
        self, src: torch.Tensor, tgt_in: torch.Tensor
    ) -> dict[str, list[torch.Tensor]]:
        """Lists over layers of (batch, heads, q_len, k_len) weights under
        ``encoder_self``, ``decoder_self`` and ``cross`` for a teacher-forced pass."""

    # ---- search ------------------------------------------------------------------------
    @abstractmethod
    def encode(self, src: torch.Tensor) -> EncoderOutput:
        """src (batch, src_len) -> the encoder output, once per batch."""

    def prepare_for_inference(self, onednn: bool | None = None) -> Seq2Seq:
        """Eval mode, with every ``rosetta.model.linear.Linear``'s inference layout made
        now (CPU, float32; ``onednn``: see ``Linear.prepare_for_inference``). Call it
        again after changing the weights; ``train()`` drops the layouts."""
        from rosetta.model.linear import Linear

        self.eval()
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepare_for_inference(onednn)
        return self
