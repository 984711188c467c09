"""What every search shares: the ``Search`` interface, its result, length budgets
and the masks of tokens that cannot come next.

A search is one class (``Search``) with one signature: ``run(model, src,
lengths, ...)`` on a padded batch of sources gives one ``Found`` per source (its
n-best ``Hypothesis`` list and, on request, a ``Trace``). Its options are a
pydantic class (``SearchOptions``), the single statement of their names, types,
bounds and help, from which the command line, the HTTP schema and the
CTranslate2 mapping are derived. ``rosetta.decode.search`` lists the searches
and is the one place that chooses among them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rosetta.config import DecodeConfig, Section
from rosetta.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

MAX_LEN = 1024  # the longest output when the caller gives no model limit


@dataclass
class Hypothesis:
    """One output sequence (without <bos>/<eos>) and its score.

    ``score`` is the length-normalised log-probability used for ranking;
    ``log_prob`` the raw sum of token log-probabilities (including <eos>).
    """

    tokens: list[int]
    score: float
    log_prob: float


@dataclass(frozen=True)
class Lengths:
    """How long an output may be: ``a * source length + b`` tokens (<eos> included),
    at most ``limit`` and at least ``min_len`` before <eos> (``min_len`` forces equal
    output lengths when systems are timed against each other)."""

    a: float = DecodeConfig().max_len_a
    b: int = DecodeConfig().max_len_b
    limit: int = MAX_LEN
    min_len: int = 0

    @classmethod
    def of(cls, options: DecodeConfig, limit: int) -> Lengths:
        """The budget a ``decode`` configuration sets, for a model of ``limit`` positions."""
        return cls(options.max_len_a, options.max_len_b, limit)

    def budget(self, source_length: int) -> int:
        """The budget of one source of ``source_length`` ids (as ``per_source``)."""
        budget = int(float(source_length) * self.a + self.b)
        return max(min(budget, self.limit), self.min_len + 1)

    def per_source(self, src: torch.Tensor) -> torch.Tensor:
        """(batch,) budgets of a padded source batch (batch, src_len)."""
        source_lengths = src.ne(PAD_ID).sum(dim=1)
        budget = (source_lengths.float() * self.a + self.b).long()
        return budget.clamp(max=self.limit).clamp(min=self.min_len + 1)


DEFAULT_LENGTHS = Lengths()


def pad_batch(
    sequences: list[list[int]], device: torch.device | str = "cpu", value: int = PAD_ID
) -> torch.Tensor:
    """Right-pads id lists into (batch, max_len) with ``value`` (<pad> by default)."""
    out = torch.full((len(sequences), max(map(len, sequences))), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out.to(device)


_FORBIDDEN: dict[tuple[torch.device, bool], torch.Tensor] = {}


def forbid_tokens(log_probs: torch.Tensor, step: int, min_len: int) -> torch.Tensor:
    """Tokens that cannot come next: <pad> and <bos> never, <eos> not before
    ``min_len`` tokens (used to force equal output lengths when timing systems
    against each other). Edits its argument in place, in one ``index_fill_``,
    and works on log-probabilities and logits alike."""
    key = (log_probs.device, step < min_len)
    if key not in _FORBIDDEN:
        ids = [PAD_ID, BOS_ID, EOS_ID] if key[1] else [PAD_ID, BOS_ID]
        _FORBIDDEN[key] = torch.tensor(ids, device=log_probs.device)
    return log_probs.index_fill_(1, _FORBIDDEN[key], float("-inf"))


def force_eos(log_probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows that reached their length budget may only produce <eos>."""
    if rows.any():
        eos = log_probs[rows, EOS_ID].clone()
        log_probs[rows] = float("-inf")
        log_probs[rows, EOS_ID] = eos
    return log_probs


def length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT length penalty ((5 + |Y|) / 6) ** alpha (Wu et al., 2016); 1 when alpha = 0."""
    return ((5.0 + length.float()) / 6.0) ** alpha


class SearchOptions(Section):
    """A search's settings; each search subclasses it with a ``kind`` literal and its
    own fields (``Field(description=...)`` is the help the CLI and the HTTP schema
    show). A field whose ``json_schema_extra`` holds ``{"work": True}`` multiplies
    the work per sentence (the service bounds it by ``serve.max_beam``)."""

    kind: str


@dataclass
class Trace:
    """What a search did for one source's best hypothesis, for people (attention
    and search views): ``decoder_input``, what the decoder read in producing it
    (<bos> and the output, left to right; a refining search's last input);
    ``produced``, what each of those decoder positions produced; ``tree``, the
    beam search's tree (``rosetta.decode.beam.BeamTrace`` of the source), if any."""

    decoder_input: list[int]
    produced: list[int]
    tree: dict[str, Any] | None = None

    @classmethod
    def left_to_right(cls, tokens: list[int], tree: dict[str, Any] | None = None) -> Trace:
        """The trace of an output written left to right: read <bos> and the output,
        produced the output and <eos>."""
        return cls([BOS_ID, *tokens], [*tokens, EOS_ID], tree)


@dataclass
class Found:
    """A search's result for one source: its hypotheses, best first (or in the order
    drawn, for sampling), and, when asked for, its ``Trace``."""

    hypotheses: list[Hypothesis]
    trace: Trace | None = None


class Search(ABC):
    """One search algorithm with its options.

    ``Options``: its ``SearchOptions`` subclass; ``needs``: the model capability
    it runs on (a runtime-checkable Protocol of ``rosetta.model.interface``).
    """

    Options: ClassVar[type[SearchOptions]]
    needs: ClassVar[type]
    in_ctranslate2: ClassVar[bool] = False  # CTranslate2 runs it (``ctranslate2``)
    random: ClassVar[bool] = False  # draws at random: used only when asked for by name

    def __init__(self, options: SearchOptions) -> None:
        self.options = options

    @classmethod
    def kind(cls) -> str:
        """The name configurations use (``decode.search.kind``)."""
        return cls.Options.model_fields["kind"].default

    @classmethod
    def reads(cls) -> set[str]:
        """The option names this search reads."""
        return set(cls.Options.model_fields) - {"kind"}

    @classmethod
    def runs_on(cls, model: Any) -> bool:
        """Whether ``model`` has the capability this search needs."""
        return isinstance(model, cls.needs)

    @property
    def seed(self) -> int | None:
        """The seed of a search that draws at random (what a sentence draws is a
        function of it and the sentence: the same call gives the same output);
        None: deterministic."""
        return None

    @abstractmethod
    def run(
        self,
        model: Any,
        src: torch.Tensor,
        lengths: Lengths,
        *,
        scores: bool = True,
        trace: bool = False,
    ) -> list[Found]:
        """Searches a padded source batch (batch, src_len): one ``Found`` per row.
        ``scores=False`` lets a search skip log-probabilities it does not need
        (then NaN); ``trace`` asks for each row's ``Trace``."""

    @property
    def nbest(self) -> int:
        """How many hypotheses the search returns per source."""
        return getattr(self.options, "nbest", 1)

    def for_hypotheses(self, count: int) -> dict[str, Any]:
        """The settings to ask for (``Translator.with_options``) to get ``count``
        hypotheses per source from this search."""
        return {"nbest": count} if count > 1 else {}

    def tree_width(self) -> int:
        """Tree nodes a traced search adds per output step (0: no tree)."""
        return 0

    @property
    def has_tree(self) -> bool:
        """Whether a trace of this search holds a search tree."""
        return self.tree_width() > 0

    def ctranslate2(self, vocab_size: int) -> dict[str, Any]:
        """This search as CTranslate2's ``translate_batch`` arguments (``beam_size``,
        ``num_hypotheses``, ``length_penalty``, ``sampling_*``), for a search with
        ``in_ctranslate2``."""
        raise NotImplementedError(f"CTranslate2 does not run {self.kind()} search")

    def describe(self) -> dict[str, Any]:
        """The settings, as configurations and responses show them."""
        return self.options.model_dump(mode="json")
