"""The decoding engine of every left-to-right search: sentences join and leave
between two decoding steps.

One ``Engine`` runs one search (greedy, beam with its n-best, sampling) on an
``IncrementalDecoder``. It holds a queue of sources and the sentences being
decoded; each ``step``:

1. **admits** queued sources while there is room (at most ``max_sentences``
   sentences, and their padded source tokens, sentences x the longest source,
   at most ``max_tokens``): they are encoded together, their decoder state
   (``DecoderState.admit``) and the search's bookkeeping (``Rows.admit``) are
   appended to the running ones, and they start at position 0 while the others
   go on where they are (every state keeps per-row positions: the Transformer's
   KV cache masks the slots before a row began, ``rosetta.model.attention``);
2. runs **one decoder call** for every hypothesis row, of whatever age;
3. lets the search **advance** (choose tokens, re-rank a beam) and hands back
   the sentences that finished: they leave the state and the bookkeeping at
   once (``DecoderState.select_sources``: one gather of the cache, which also
   drops the slots no row uses any more), and their rows are free for the next
   admission.

A sentence's output is that of the search run on it alone: nothing a row
computes depends on the other rows (padding and the slots before a row began
are masked; sampling draws each sentence's tokens from its own stream,
``Rows.admit``). So one engine serves a static batch (``Search.run``: every
source admitted at step 0), offline translation from a length-sorted queue
(``Translator``), and the service, whose requests join the running batch as
they come (``rosetta.serve.batcher``).

Beam search gives a sentence ``group = beam`` hypothesis rows that enter and
leave together; its first step reads only <bos>, so when nothing else is
running the engine makes that step once per sentence and expands the state
after it (what a static batch did), and otherwise in the shared call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rosetta.data.tokenizer import BOS_ID, PAD_ID
from rosetta.decode.common import Found, Lengths, Search, pad_batch
from rosetta.decode.constraints import Constraint
from rosetta.model.interface import DecoderState, IncrementalDecoder, Seq2Seq


class Rows(ABC):
    """What a search keeps about the sentences being decoded, as tensors over those
    sentences (``group`` hypothesis rows each, consecutive). Sentences are admitted
    at the end, and leave by ``keep``; nothing loops over sentences in Python."""

    group: int = 1
    constrained: bool = False  # sentences may carry lexical constraints (beam search)

    def __init__(self, lengths: Lengths, scores: bool, trace: bool) -> None:
        self.lengths = lengths
        self.scores = scores
        self.trace = trace
        self._safe = 1 << 62  # steps before some row may reach its length budget

    def budgets_admitted(self, budget: torch.Tensor) -> None:
        """Notes the budgets of sentences admitted at position 0."""
        self._safe = min(self._safe, int(budget.min()) - 1)

    def budget_may_end(self) -> bool:
        """Called once per step: whether some row may be at its length budget now (a
        row at it may only end); False saves the check on the most steps."""
        self._safe -= 1
        return self._safe < 0

    def emptied(self) -> None:
        """Every sentence has left."""
        self._safe = 1 << 62

    @abstractmethod
    def admit(
        self,
        budget: torch.Tensor,
        sources: Sequence[Sequence[int]],
        copies: list[int],
        serials: torch.Tensor,
        constraints: Sequence[Sequence[Constraint]] | None = None,
    ) -> None:
        """Appends sentences at position 0: their output ``budget`` (count,), their
        source ids and copy numbers (the samples of one source), the engine's
        serial number of each (trace rows) and, where ``constrained``, each one's
        lexical constraints (None: none)."""

    @abstractmethod
    def tokens(self) -> torch.Tensor:
        """(rows,): the token each hypothesis row reads next."""

    @abstractmethod
    def advance(self, logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One step on the decoder's logits (rows, vocab): returns the order of the
        hypothesis rows the state must follow (None: unchanged) and which sentences
        are done (sentences,) bool."""

    @abstractmethod
    def results(self, index: torch.Tensor) -> list[Found]:
        """The results of sentences ``index`` (done ones), in that order."""

    @abstractmethod
    def keep(self, index: torch.Tensor) -> None:
        """Keeps sentences ``index``, in that order (the others have left)."""


@dataclass
class _Queued:
    ids: Sequence[int]
    key: Hashable
    copy: int
    constraints: Sequence[Constraint] = ()


class Engine:
    """One search decoding a stream of sources, ``max_sentences`` and ``max_tokens``
    (padded source tokens) at a time; see the module's docstring.

    ``add`` queues a source under a ``key``; ``step`` admits, decodes one position
    and returns ``(key, Found)`` for each source whose last sentence finished
    (a search with ``copies`` > 1, sampling's n-best, decodes a source as that many
    sentences and returns their hypotheses in one ``Found``, in copy order).
    """

    def __init__(
        self,
        model: Seq2Seq,
        rows: Rows,
        lengths: Lengths,
        copies: int = 1,
        max_sentences: int = 64,
        max_tokens: int = 4000,
        min_admission: int | None = None,
        patience: int | None = None,
    ) -> None:
        """``min_admission``: the fewest queued sentences admitted into a running
        batch at once (default: an eighth of ``max_sentences``); fewer join once the
        queue's front has waited ``patience`` steps (default: never)."""
        self.model = model
        self.min_admission = min_admission or max(1, max_sentences // 8)
        self.patience = patience if patience is not None else 1 << 62
        self.rows = rows
        self.lengths = lengths
        self.copies = copies
        self.max_sentences = max_sentences
        self.max_tokens = max_tokens
        self.device = next(model.parameters()).device
        self.queue: deque[_Queued] = deque()
        self.state: DecoderState | None = None
        self._keys: list[Hashable] = []  # the key of each live sentence, in order
        self._source_lengths: list[int] = []  # of each live sentence
        self._serial = 0
        self._parts: dict[Hashable, list[Any]] = {}  # a source's finished copies
        self._first: torch.Tensor | None = None  # a beam's first step, made at admission
        self._waiting_since = 0  # the step since which the queue's front has waited
        self.stats = EngineStats()

    # ---- the queue ------------------------------------------------------------------
    def add(
        self, ids: Sequence[int], key: Hashable, constraints: Sequence[Constraint] = ()
    ) -> None:
        """Queues a non-empty source (``copies`` sentences) under ``key``, which must
        differ from every key queued or live, with its lexical ``constraints`` (a
        search whose rows are ``constrained``)."""
        if key in self._parts:
            raise ValueError(f"key {key!r} is already in the engine")
        if constraints and not self.rows.constrained:
            raise ValueError("lexical constraints need beam search set up for them")
        self._parts[key] = [None] * self.copies
        if not self.queue:
            self._waiting_since = self.stats.steps
        self.queue.extend(_Queued(ids, key, copy, constraints) for copy in range(self.copies))

    def discard(self, key: Hashable) -> None:
        """Forgets ``key``: its queued sentences leave the queue; live ones finish,
        and no result is returned for it."""
        self.queue = deque(item for item in self.queue if item.key != key)
        self._parts.pop(key, None)

    @property
    def live(self) -> int:
        """Sentences being decoded."""
        return len(self._keys)

    @property
    def busy(self) -> bool:
        return bool(self.queue or self._keys)

    # ---- decoding -----------------------------------------------------------------------
    def _room(self) -> list[_Queued]:
        """The queued sentences to admit now, from the front of the queue: those that
        fit, if they are at least ``min_admission`` (or all there are, or the engine
        is empty). Each admission copies every cache once (new rows), so admitting
        a sentence or two at every step would cost more than it gains."""
        taken: list[_Queued] = []
        count = self.live
        longest = max(self._source_lengths, default=0)
        for item in self.queue:
            longer = max(longest, len(item.ids))
            if count and (count + 1 > self.max_sentences or (count + 1) * longer > self.max_tokens):
                break
            taken.append(item)
            count, longest = count + 1, longer
        waited = self.stats.steps - self._waiting_since >= self.patience
        if self.live and not (len(taken) >= self.min_admission or (taken and waited)):
            return []
        for _ in taken:
            self.queue.popleft()
        self._waiting_since = self.stats.steps
        return taken

    def _admit(self, items: list[_Queued]) -> None:
        """Encodes and appends ``items``."""
        src = pad_batch([list(item.ids) for item in items], self.device)
        self.admit_batch(src, [item.key for item in items], [item.copy for item in items],
                         [list(item.ids) for item in items],
                         [item.constraints for item in items])  # fmt: skip

    def admit_batch(
        self,
        src: torch.Tensor,
        keys: Sequence[Hashable],
        copies: Sequence[int] | None = None,
        sources: Sequence[Sequence[int]] | None = None,
        constraints: Sequence[Sequence[Constraint]] | None = None,
    ) -> None:
        """Admits a padded source batch (sentences, src_len) at once: what ``add`` and
        ``step`` do for queued sources, for a caller holding a batch (``Search.run``)."""
        count = src.size(0)
        copies = list(copies) if copies is not None else [0] * count
        if sources is None:
            sources = [row[row.ne(PAD_ID)].tolist() for row in src]
        for key in keys:
            self._parts.setdefault(key, [None] * self.copies)
        new = self.model.init_state(self.model.encode(src))
        group = self.rows.group
        if self.state is None:
            if group > 1:  # the first step reads only <bos>: once per sentence
                bos = torch.full((count,), BOS_ID, dtype=torch.long, device=src.device)
                first = self.model.decode_step(bos, new)
                self._first = first.repeat_interleave(group, dim=0)
                new.expand(group)
            self.state = new
        else:
            if group > 1:
                new.expand(group)
            self.state.admit(new)
        budget = self.lengths.per_source(src)
        serials = torch.arange(self._serial, self._serial + count, device=src.device)
        self._serial += count
        if self.rows.constrained:
            self.rows.admit(budget, sources, copies, serials, constraints)
        else:
            self.rows.admit(budget, sources, copies, serials)
        self._keys += [(key, copy) for key, copy in zip(keys, copies)]
        self._source_lengths += [len(ids) for ids in sources]
        self.stats.admissions += 1

    def step(self) -> list[tuple[Hashable, Found]]:
        """Admits what fits, decodes one position for every live sentence and returns
        the sources finished by it."""
        room = self._room() if self.queue else []
        if room:
            self._admit(room)
        if self.state is None:
            return []
        logits, self._first = self._first, None
        if logits is None:
            logits = self.model.decode_step(self.rows.tokens(), self.state)
        self.stats.steps += 1
        self.stats.rows += logits.size(0)
        order, done = self.rows.advance(logits)
        if order is not None:
            self.state.select(order)
        if not bool(done.any()):
            return []
        finished = done.nonzero().squeeze(1)
        found = self.rows.results(finished)
        out = []
        for index, result in zip(finished.tolist(), found):
            key, copy = self._keys[index]
            parts = self._parts.get(key)
            if parts is None:  # discarded
                continue
            parts[copy] = result
            if all(part is not None for part in parts):
                del self._parts[key]
                hypotheses = [h for part in parts for h in part.hypotheses]
                out.append((key, Found(hypotheses, parts[0].trace)))
        if bool(done.all()):
            self.state, self._keys, self._source_lengths = None, [], []
            self.rows.keep(finished[:0])
            return out
        kept = (~done).nonzero().squeeze(1)
        self.state.select_sources(kept)
        self.rows.keep(kept)
        kept_list = kept.tolist()
        self._keys = [self._keys[i] for i in kept_list]
        self._source_lengths = [self._source_lengths[i] for i in kept_list]
        return out

    def run(self) -> dict[Hashable, Found]:
        """Steps until nothing is queued or live; every result by key."""
        results: dict[Hashable, Found] = {}
        while self.busy:
            results.update(self.step())
        return results


@dataclass
class EngineStats:
    """What an engine did: decoder calls, hypothesis rows decoded over them (rows /
    steps is the mean batch), and admissions."""

    steps: int = 0
    rows: int = 0
    admissions: int = 0


def run_all(engine: Engine, src: torch.Tensor) -> list[Found]:
    """A padded batch through ``engine`` admitted at once: one ``Found`` per row."""
    count, copies = src.size(0), engine.copies
    keys = list(range(count))
    if copies > 1:  # a source's samples: consecutive sentences
        src = src.repeat_interleave(copies, dim=0)
        keys = [key for key in keys for _ in range(copies)]
    engine.admit_batch(src, keys, list(range(copies)) * count)
    results = engine.run()
    return [results[row] for row in range(count)]


def queue_all(
    engine: Engine,
    sources: Iterable[Sequence[int]],
    constraints: Sequence[Sequence[Constraint]] | None = None,
) -> list[Found]:
    """Sources through ``engine``'s queue (in the order given), each with its lexical
    ``constraints`` if given: one ``Found`` each."""
    sources = list(sources)
    for index, ids in enumerate(sources):
        engine.add(ids, index, constraints[index] if constraints is not None else ())
    results = engine.run()
    return [results[index] for index in range(len(sources))]


class LeftToRightSearch(Search):
    """A search that writes left to right on an ``IncrementalDecoder``: its
    bookkeeping is a ``Rows``, and it runs on an ``Engine`` (static batches and
    continuous batching alike)."""

    needs = IncrementalDecoder
    takes_constraints = False  # lexical constraints (beam search)

    @abstractmethod
    def rows(self, lengths: Lengths, scores: bool, trace: bool, constrained: bool = False) -> Rows:
        """This search's bookkeeping for an engine (``constrained``: for sentences
        with lexical constraints, where ``takes_constraints``)."""

    @property
    def copies(self) -> int:
        """Sentences decoded per source (sampling's n-best: independent samples)."""
        return 1

    def engine(
        self,
        model: Seq2Seq,
        lengths: Lengths,
        *,
        scores: bool = True,
        trace: bool = False,
        max_sentences: int = 64,
        max_tokens: int = 4000,
        min_admission: int | None = None,
        patience: int | None = None,
        constrained: bool = False,
    ) -> Engine:
        """An engine running this search on ``model`` (arguments: ``Engine``);
        ``constrained``: its sentences may carry lexical constraints."""
        if constrained and not self.takes_constraints:
            raise ValueError(f"lexical constraints need beam search, not {self.describe()['kind']}")
        rows = self.rows(lengths, scores, trace, constrained)
        return Engine(
            model, rows, lengths, self.copies, max_sentences, max_tokens, min_admission,
            patience,
        )  # fmt: skip

    def run(
        self,
        model: Any,
        src: torch.Tensor,
        lengths: Lengths,
        *,
        scores: bool = True,
        trace: bool = False,
    ) -> list[Found]:
        with torch.inference_mode():
            return run_all(self.engine(model, lengths, scores=scores, trace=trace), src)
