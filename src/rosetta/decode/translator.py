"""Text in, text out: clean, tokenise, split what is too long, search, detokenise.

``Translator`` is the Python API and what every engine shares: rosetta's own
search (``TorchTranslator`` below) and CTranslate2 (``CTranslate2Translator``)
differ only in ``engine_search``, which turns id sequences of at most
``max_source_len`` subwords into hypotheses, and in the searches they can run.
The search itself is a ``rosetta.decode.common.Search`` chosen by
``rosetta.decode.search.configure``. Around it, and the same for both:

- every line goes through ``rosetta.data.text.clean_line``; a blank line gives
  one empty hypothesis of log-probability 0, so N lines in give N results out;
- a source longer than ``max_source_len`` subwords is split into sentences,
  and a sentence still too long into chunks at word boundaries; the pieces are
  translated on their own and joined back into one output (``split_source``),
  so nothing is cut off;
- long streams are translated ``chunk`` lines at a time (``translate_stream``);
- a sentence may carry lexical constraints, target phrases its translation must
  contain (``constraints``, or terms a ``Glossary`` finds in it), which beam
  search honours (``rosetta.decode.constraints``); a constrained source must fit
  ``max_source_len``, and each phrase the output limit of its source.

Inside an engine, sentences are sorted by length and batched by a token budget,
and results come back in input order. Each sentence's result does not depend on
the batch it landed in (padding is masked everywhere).
"""

from __future__ import annotations

import copy
import math
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rosetta.config import DecodeConfig, load_config
from rosetta.data.batching import make_batches
from rosetta.data.text import clean_line, one_line
from rosetta.data.tokenizer import BOS_ID, PAD_ID, SPECIAL_PIECES, Tokenizer
from rosetta.decode.common import Found, Hypothesis, Lengths, Search, Trace, pad_batch
from rosetta.decode.constraints import Constraint, met
from rosetta.decode.engine import LeftToRightSearch, queue_all
from rosetta.decode.glossary import Glossary, with_capitals
from rosetta.decode.search import SEARCHES, configure, option_fields, runnable
from rosetta.device import resolve_device
from rosetta.model.interface import Seq2Seq
from rosetta.model.quantize import quantize_int8
from rosetta.modeldir import CONFIG, load_model_dir, verify_checksums

# what a caller gives for one sentence's lexical constraints: each item a target
# phrase, or a list of phrases of which one must appear
ConstraintSpec = Sequence[str | Sequence[str]]


@dataclass(frozen=True)
class Source:
    """One input ready for search: its cleaned text, its source subword ids and the
    lexical constraints its translation must meet."""

    text: str
    ids: list[int]
    constraints: tuple[Constraint, ...] = ()


@dataclass
class Translation:
    """The n-best translations of one input, best first; ``constraints``, for a
    constrained input, each constraint's text and whether the best one meets it."""

    source: str
    hypotheses: list[tuple[str, Hypothesis]] = field(default_factory=list)
    trace: Trace | None = None  # what the search did for the best one, when asked for
    constraints: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.hypotheses[0][0] if self.hypotheses else ""

    def nbest_lines(self, sentence_id: int) -> list[str]:
        """``sentence_id ||| hypothesis ||| log_prob`` per hypothesis (the Moses and
        fairseq n-best form; ids count input lines from 0). The score is the total
        log-probability of the output tokens and <eos> under the model."""
        return [f"{sentence_id} ||| {text} ||| {h.log_prob:.4f}" for text, h in self.hypotheses]


WORD_START = "\u2581"  # SentencePiece's marker of a piece that begins a word
# a piece that ends a sentence: final punctuation, then any closing quotes or brackets
_SENTENCE_END = re.compile("[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019\u00bb)\\]]*$")


def split_source(ids: list[int], pieces: list[str], limit: int) -> list[list[int]]:
    """Splits a source longer than ``limit`` subwords into parts of at most ``limit``.

    ``pieces`` are the SentencePiece pieces of ``ids``. A sentence ends after a
    piece ending in . ! ? … 。！？ (closing quotes allowed) when the next piece
    starts a word; each sentence becomes a part of its own (the model was trained
    on sentences). A sentence still longer than ``limit`` is cut into chunks at
    word starts, each as long as fits; a single word longer than ``limit`` is cut
    every ``limit`` pieces. A source within the limit is returned whole.
    """
    if len(ids) <= limit:
        return [ids]
    sentences, start = [], 0
    for i in range(1, len(ids)):
        if pieces[i].startswith(WORD_START) and _SENTENCE_END.search(pieces[i - 1]):
            sentences.append(range(start, i))
            start = i
    sentences.append(range(start, len(ids)))
    parts: list[list[int]] = []
    for sentence in sentences:
        if len(sentence) <= limit:
            parts.append(ids[sentence.start : sentence.stop])
            continue
        begin = sentence.start
        while sentence.stop - begin > limit:
            # the last word start that keeps the chunk within the limit, else a hard cut
            ends = range(begin + limit, begin, -1)
            cut = next((i for i in ends if pieces[i].startswith(WORD_START)), begin + limit)
            parts.append(ids[begin:cut])
            begin = cut
        parts.append(ids[begin : sentence.stop])
    return parts


def join_hypotheses(parts: list[list[Hypothesis]]) -> list[Hypothesis]:
    """The hypotheses of a split source: the k-th joins every part's k-th hypothesis;
    its tokens are concatenated and its score and log_prob summed."""
    count = min(len(hyps) for hyps in parts)
    return [
        Hypothesis(
            [token for hyps in parts for token in hyps[k].tokens],
            sum(hyps[k].score for hyps in parts),
            sum(hyps[k].log_prob for hyps in parts),
        )
        for k in range(count)
    ]


@dataclass
class Segmented:
    """``count`` sources as the engine searches them: ``segments``, the non-empty
    parts of at most ``max_source_len`` ids, and ``spans``, each non-empty source's
    segments (``Translator.segment``)."""

    count: int
    segments: list[list[int]] = field(default_factory=list)
    spans: dict[int, range] = field(default_factory=dict)

    def assemble(self, found: Sequence[Found]) -> list[Found]:
        """Each source's result from its segments' (``found``, one per segment): an
        empty source one empty hypothesis of log-probability 0, a split one its
        parts' hypotheses joined (``join_hypotheses``), without a trace."""
        results = [Found([Hypothesis([], 0.0, 0.0)]) for _ in range(self.count)]
        for index, span in self.spans.items():
            parts = found[span.start : span.stop]
            if len(parts) == 1:
                results[index] = parts[0]
            else:
                results[index] = Found(join_hypotheses([part.hypotheses for part in parts]))
        return results


class Translator(ABC):
    """Raw sentences to translations: the Python API, the same for every engine.

    ``Translator.load(model_dir, engine=...)`` gives rosetta's own PyTorch search
    (``TorchTranslator``) or CTranslate2 on an exported model
    (``CTranslate2Translator`` below); an engine implements
    ``engine_search`` and ``searches``. ``search`` is the ``Search`` that runs
    (``options.search`` states it). A translator may be shared by threads: its
    calls run one at a time (a lock), each using the whole machine.
    """

    def __init__(
        self, tokenizer: Tokenizer, options: DecodeConfig, max_source_len: int, **given: Any
    ) -> None:
        """``max_source_len``: the longest source, in subwords, the engine accepts;
        ``given``: settings over ``options``, as ``with_options`` takes them."""
        self.tokenizer = tokenizer
        self.max_source_len = max_source_len
        self._lock = threading.Lock()
        self.options, self.search = self._settings(options, given)

    def _settings(
        self, options: DecodeConfig, given: dict[str, Any]
    ) -> tuple[DecodeConfig, Search]:
        """``options`` with a caller's choices (``with_options``), and its search."""
        shared = set(DecodeConfig.model_fields) - {"search"}
        search = configure(
            options.search,
            {k: v for k, v in given.items() if k not in shared},
            self.searches,
            self.describe(),
        )
        common = {k: v for k, v in given.items() if k in shared}
        options = options.with_overrides(**common).model_copy(update={"search": search.describe()})
        return options, search

    @property
    @abstractmethod
    def searches(self) -> Sequence[type[Search]]:
        """The searches this engine can run on its model, the default first."""

    def describe(self) -> str:
        """The engine and model, as errors name them."""
        return "this model"

    @staticmethod
    def load(
        model_dir: str | Path,
        engine: str = "torch",
        device: str | None = None,
        quantize: str | None = None,
        **search: Any,
    ) -> Translator:
        """Loads a model directory (``engine="torch"``) or a ``rosetta export`` folder
        (``engine="ctranslate2"``) onto ``device`` (auto, cpu, cuda or cuda:N; None:
        the model's ``decode.device``); ``search`` overrides the model's ``decode``
        settings (``beam=4``, ``nbest=2``, ``sampling=True``, ...; None keeps one)."""
        if engine == "torch":
            return TorchTranslator.from_model_dir(model_dir, device, quantize, **search)
        if engine == "ctranslate2":
            if quantize not in (None, "none"):
                raise ValueError(
                    "CTranslate2 models are quantized when exported: "
                    "rosetta export MODEL_DIR OUT --quantization int8"
                )
            return CTranslate2Translator.from_export(model_dir, device, **search)
        raise ValueError(f"unknown engine {engine!r}: expected torch or ctranslate2")

    @abstractmethod
    def engine_search(
        self,
        sources: list[list[int]],
        trace: bool = False,
        constraints: list[tuple[Constraint, ...]] | None = None,
    ) -> list[Found]:
        """The engine's search on non-empty sources of at most ``max_source_len`` ids:
        ``search.nbest`` hypotheses per source, best first, in input order; with
        ``trace``, each with its ``Trace`` (an engine that cannot says so); with
        ``constraints``, each source's lexical constraints (an engine or search
        that cannot honour them says so)."""

    def segment(self, sources: list[list[int]]) -> Segmented:
        """The parts of ``sources`` the engine searches (``Segmented``): a source over
        ``max_source_len`` is split (``split_source``), an empty one has none."""
        segmented = Segmented(len(sources))
        for index, ids in enumerate(sources):
            if not ids:
                continue
            pieces = self.tokenizer.source_pieces(ids) if len(ids) > self.max_source_len else []
            parts = split_source(list(ids), pieces, self.max_source_len)
            start = len(segmented.segments)
            segmented.spans[index] = range(start, start + len(parts))
            segmented.segments += parts
        return segmented

    def search_ids(
        self,
        sources: list[list[int]],
        trace: bool = False,
        constraints: Sequence[tuple[Constraint, ...]] | None = None,
    ) -> list[Found]:
        """Runs the configured search on id sequences of any length, in input order,
        each with its lexical ``constraints`` if given.

        An empty source gives one empty hypothesis of log-probability 0; a source
        over ``max_source_len`` is split (``split_source``) and its parts'
        hypotheses joined (``join_hypotheses``), without a trace.
        """
        segmented = self.segment(sources)
        by_segment = None
        if constraints is not None and any(constraints):
            self.check_constraints(sources, constraints)
            by_segment = [()] * len(segmented.segments)
            for index, span in segmented.spans.items():
                by_segment[span.start] = tuple(constraints[index])
        found = []
        if by_segment is not None:
            found = self.engine_search(segmented.segments, trace, by_segment)
        elif segmented.segments:  # an engine without constraints needs not take them
            found = self.engine_search(segmented.segments, trace)
        return segmented.assemble(found)

    def check_constraints(
        self, sources: list[list[int]], constraints: Sequence[tuple[Constraint, ...]]
    ) -> None:
        """A ``ValueError`` naming the first constraint that cannot be met: on a
        source over ``max_source_len`` (it would be split), or longer than the
        output limit of its source."""
        lengths = Lengths.of(self.options, self.max_source_len)
        for line, (ids, wanted) in enumerate(zip(sources, constraints)):
            if not wanted:
                continue
            if not ids:
                raise ValueError(f"input {line}: an empty source cannot meet constraints")
            if len(ids) > self.max_source_len:
                raise ValueError(
                    f"input {line}: a constrained source must fit {self.max_source_len} "
                    f"subwords (it has {len(ids)}); split it"
                )
            room = lengths.budget(len(ids)) - 1  # <eos> included in the budget
            for constraint in wanted:
                if constraint.shortest > room:
                    raise ValueError(
                        f"input {line}: constraint {constraint.text!r} "
                        f"({constraint.shortest} subwords) is longer than the output "
                        f"limit of its source ({room} subwords)"
                    )

    def settings(self) -> dict[str, Any]:
        """Every setting in one flat mapping, as responses show it: the search's
        (``kind`` and its options) and the others of ``options``."""
        return {**self.options.model_dump(exclude={"search"}), **self.search.describe()}

    @property
    def search_options(self) -> list[str]:
        """The options some search of this engine and model reads (what a caller may
        set, with ``search``, the kind)."""
        return sorted(option_fields(self.searches))

    def with_options(self, **given: Any) -> Translator:
        """The same engine and model with other settings: ``search="sampling"`` (a
        kind), any search option (``beam=4``, ``temperature=0.5``, ...; None keeps
        one; see ``rosetta.decode.search.configure``) and the ``decode`` keys every
        search reads (``batch_size``, ``scores``, ...). A shallow copy, sharing the
        model, its memory and the lock. An option the chosen search would ignore is
        a ``ConfigError`` naming it."""
        configured = copy.copy(self)
        configured.options, configured.search = self._settings(self.options, given)
        return configured

    def encode(
        self,
        sentences: list[str],
        constraints: Sequence[ConstraintSpec | None] | None = None,
        glossary: Glossary | None = None,
    ) -> list[Source]:
        """Cleans and tokenises raw sentences (cheap, and needs no lock): what
        ``translate_encoded`` takes, and what a caller can measure first.
        ``constraints``: per sentence, target phrases its translation must contain
        (an item that is a list: one of its phrases); ``glossary``: its terms found
        in a sentence add their target terms as constraints."""
        if constraints is not None and len(constraints) != len(sentences):
            raise ValueError(f"{len(constraints)} constraint lists for {len(sentences)} sentences")
        cleaned = [clean_line(s) for s in sentences]
        sources = []
        for i, (text, ids) in enumerate(zip(cleaned, self.tokenizer.encode_source(cleaned))):
            given = list(constraints[i] or []) if constraints is not None else []
            terms = [targets for _, targets in glossary.match(text)] if glossary else []
            sources.append(Source(text, ids, self.target_constraints(given, terms)))
        return sources

    def target_constraints(
        self, given: ConstraintSpec, terms: ConstraintSpec = ()
    ) -> tuple[Constraint, ...]:
        """Constraints from phrases (an item that is a list: alternatives), tokenised
        with the model's target SentencePiece; the same phrase twice counts once.
        ``terms``: a glossary's, whose phrases are also met capitalised
        (``rosetta.decode.glossary.with_capitals``)."""
        made: dict[tuple[tuple[int, ...], ...], Constraint] = {}
        for item, capitals in [*((i, False) for i in given), *((i, True) for i in terms)]:
            phrases = [item] if isinstance(item, str) else list(item)
            if not phrases or not all(isinstance(p, str) for p in phrases):
                raise ValueError(f"a constraint is a phrase or a list of phrases, got {item!r}")
            cleaned = [clean_line(p) for p in phrases]
            text = " | ".join(cleaned)
            ids = self.tokenizer.encode_target(with_capitals(cleaned) if capitals else cleaned)
            if not all(ids):
                raise ValueError(f"constraint {text!r} has no target subwords")
            alternatives = tuple(dict.fromkeys(tuple(i) for i in ids))
            made.setdefault(alternatives, Constraint(alternatives, text))
        return tuple(made.values())

    def translate_encoded(self, sources: list[Source], trace: bool = False) -> list[Translation]:
        """Translates encoded sentences: one ``Translation`` per source, each text one
        line; ``trace`` asks for what the search did (``Translation.trace``)."""
        constraints = [source.constraints for source in sources]
        with self._lock:
            found = self.search_ids(
                [source.ids for source in sources],
                trace,
                constraints if any(constraints) else None,
            )
        return [self.translation(source, result) for source, result in zip(sources, found)]

    def translation(self, source: Source, found: Found) -> Translation:
        """The ``Translation`` of ``source`` from its search result (detokenised, one
        line each), with what its best hypothesis met of its constraints."""
        detokenise = self.tokenizer.decode_target
        hypotheses = [(one_line(detokenise(h.tokens)), h) for h in found.hypotheses]
        checked = []
        if source.constraints:
            best = found.hypotheses[0].tokens if found.hypotheses else []
            ordered = bool(getattr(self.search.options, "ordered_constraints", False))
            flags = met(source.constraints, best, ordered)
            checked = [{"text": c.text, "met": f} for c, f in zip(source.constraints, flags)]
        return Translation(source.text, hypotheses, found.trace, checked)

    def translate(
        self,
        sentences: list[str],
        constraints: Sequence[ConstraintSpec | None] | None = None,
        glossary: Glossary | None = None,
    ) -> list[Translation]:
        """Translates raw sentences: one ``Translation`` per sentence, each text one
        line; ``constraints`` and ``glossary``: lexical constraints (``encode``)."""
        return self.translate_encoded(self.encode(sentences, constraints, glossary))

    def translate_stream(
        self,
        lines: Iterable[str],
        chunk: int = 1000,
        constraints: Iterable[ConstraintSpec | None] | None = None,
        glossary: Glossary | None = None,
    ) -> Iterator[Translation]:
        """Translates a long stream ``chunk`` lines at a time (each chunk is
        length-sorted inside the engine), keeping memory bounded; ``constraints``,
        one item per line, and ``glossary`` as ``translate`` takes them (a
        constraint stream shorter or longer than the lines is an error)."""
        given = iter(constraints) if constraints is not None else None
        buffer: list[str] = []
        wanted: list[ConstraintSpec | None] = []
        missing = object()

        def flush() -> Iterator[Translation]:
            yield from self.translate(buffer, wanted if given is not None else None, glossary)

        for line in lines:
            buffer.append(line)
            if given is not None:
                item = next(given, missing)
                if item is missing:
                    raise ValueError(f"the constraints end before input line {len(wanted)}")
                wanted.append(item)  # type: ignore[arg-type]
            if len(buffer) >= chunk:
                yield from flush()
                buffer, wanted = [], []
        if buffer:
            yield from flush()
        if given is not None and next(given, missing) is not missing:
            raise ValueError("there are more constraint lines than input lines")


class TorchTranslator(Translator):
    """rosetta's own search on a PyTorch model: every search the model can run."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Tokenizer, options: DecodeConfig, **given: Any
    ) -> None:
        """``given``: settings over ``options`` (``beam=4``, ...: ``with_options``)."""
        # eval mode with the CPU inference layouts made once (a dynamically quantized
        # model has no rosetta ``Linear`` left to prepare: it is put in eval mode)
        if isinstance(model, Seq2Seq):
            model.prepare_for_inference()
        self.model = model.eval()
        self.device = next(model.parameters()).device
        max_positions = getattr(getattr(model, "cfg", None), "max_positions", 1024)
        super().__init__(tokenizer, options, max_positions - 1, **given)

    @property
    def searches(self) -> list[type[Search]]:
        return runnable(self.model)

    def describe(self) -> str:
        arch = getattr(getattr(self.model, "cfg", None), "arch", type(self.model).__name__)
        return f"this model (model.arch {arch})"

    @classmethod
    def from_model_dir(
        cls, directory: str | Path, device: str | None = None, quantize: str | None = None, **search
    ) -> TorchTranslator:
        """Loads a model directory; ``quantize="int8"`` applies PyTorch's dynamic int8
        quantization to every linear layer (CPU only; weights int8, activations
        quantized on the fly)."""
        config, tokenizer, model = load_model_dir(directory, device)
        if quantize == "int8":
            model = quantize_int8(model)
        elif quantize not in (None, "none"):
            raise ValueError(f"unknown quantization {quantize!r}: expected int8")
        return cls(model, tokenizer, config.decode, **search)

    def engine_search(
        self,
        sources: list[list[int]],
        trace: bool = False,
        constraints: list[tuple[Constraint, ...]] | None = None,
    ) -> list[Found]:
        """A left-to-right search runs on one ``Engine`` fed from a queue sorted by
        length (shortest first), within ``batch_size`` sentences and ``max_tokens``
        padded source tokens: a sentence that ends leaves the batch, and waiting
        ones join it once ``refill`` of ``batch_size`` is free (1: once it has
        emptied, static batches). Other searches (mask-predict) decode static
        batches of that size."""
        opts = self.options
        lengths = Lengths.of(opts, self.max_source_len)
        order = np.argsort([len(s) for s in sources], kind="stable")
        if isinstance(self.search, LeftToRightSearch):
            engine = self.search.engine(
                self.model, lengths, scores=opts.scores, trace=trace,
                max_sentences=opts.batch_size, max_tokens=opts.max_tokens,
                min_admission=math.ceil(opts.refill * opts.batch_size),
                constrained=constraints is not None,
            )  # fmt: skip
            sorted_constraints = None
            if constraints is not None:
                sorted_constraints = [constraints[i] for i in order]
            with torch.inference_mode():
                found = queue_all(engine, [sources[i] for i in order], sorted_constraints)
            results: list[Found] = [Found([]) for _ in sources]
            for index, result in zip(order.tolist(), found):
                results[index] = result
            return results
        if constraints is not None:
            raise ValueError(
                f"lexical constraints need beam search, not {self.search.describe()['kind']}"
            )
        return self.static_search(sources, trace)

    def static_search(self, sources: list[list[int]], trace: bool = False) -> list[Found]:
        """The search on static batches: sources sorted by length and cut into batches
        of ``batch_size`` sentences and ``max_tokens`` padded tokens, each decoded
        until its last sentence ends."""
        opts = self.options
        results: list[Found] = [Found([]) for _ in sources]
        sizes = np.array([len(s) for s in sources])
        lengths = Lengths.of(opts, self.max_source_len)
        for rows in make_batches(sizes, sizes, opts.max_tokens, max_sentences=opts.batch_size):
            src = pad_batch([sources[i] for i in rows], self.device)
            found = self.search.run(self.model, src, lengths, scores=opts.scores, trace=trace)
            for row, result in zip(rows, found):
                results[row] = result
        return results


# ---- CTranslate2 (an optional dependency: pip install rosetta-nmt[export]) ----------
def ctranslate2_module() -> Any:
    """The ``ctranslate2`` module, or an ``ImportError`` saying how to install it."""
    try:
        import ctranslate2
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "CTranslate2 is not installed: pip install 'rosetta-nmt[export]'"
        ) from error
    return ctranslate2


class CTranslate2Translator(Translator):
    """The same ``translate`` as ``rosetta.decode.translator.TorchTranslator``, run by
    CTranslate2 (``Translator.load(..., engine="ctranslate2")``) on a ``rosetta
    export`` folder; it runs the searches that say how CTranslate2 runs them
    (``Search.ctranslate2``: greedy, beam, sampling).

    Everything around the search (cleaning, long inputs, n-best assembly,
    streaming, the lock) is ``Translator``'s, shared with rosetta's own engine. Within
    the search, as rosetta does: <bos> and <pad> can never be produced; sampling
    draws with beam 1 (CTranslate2's random sampling), ``nbest`` samples per
    input, seeded once per translator by ``options.seed``. Each hypothesis's
    ``log_prob`` (with ``options.scores``) is CTranslate2's own scoring of it:
    the total log-probability with <eos>, as rosetta reports. Differences: beam
    search ranks by log-probability / length ** length_penalty rather than the
    GNMT penalty, and ``score`` is that normalised value. The length limit is one
    number per call, so sentences go to it in groups of equal length budget
    (``max_len_a * source length + max_len_b``), as rosetta's search gives each
    sentence its own: an output that runs to the limit ends where rosetta's does.
    """

    def __init__(
        self,
        export_dir: str | Path,
        options: DecodeConfig | None = None,
        device: str = "cpu",
        threads: int = 0,
        **given: Any,
    ) -> None:
        """``options``: the search settings (default: the export's ``decode`` section),
        ``given`` settings over them (``beam=4``, ...: ``with_options``); ``device``:
        cpu, cuda or cuda:N."""
        ct2 = ctranslate2_module()
        export_dir = Path(export_dir)
        if not (export_dir / "model.bin").exists():
            raise FileNotFoundError(
                f"{export_dir} is not a CTranslate2 export (run `rosetta export` first)"
            )
        verify_checksums(export_dir)
        self.config = load_config(export_dir / CONFIG)
        options = options if options is not None else self.config.decode
        tokenizer = Tokenizer.load(export_dir)
        super().__init__(tokenizer, options, self.config.model.max_positions - 1, **given)
        # CTranslate2's sampling generators are seeded when its worker threads start
        ct2.set_random_seed(self.search.seed or 0)
        kind, _, index = device.partition(":")
        self.engine = ct2.Translator(
            str(export_dir),
            device=kind,
            device_index=int(index or 0),
            inter_threads=1,
            intra_threads=threads or torch.get_num_threads(),
        )

    @classmethod
    def from_export(
        cls, export_dir: str | Path, device: str | None = None, **search: Any
    ) -> CTranslate2Translator:
        """An export with its own ``decode`` settings, overridden by ``search``, on
        ``device`` (None: the export's ``decode.device``)."""
        config = load_config(Path(export_dir) / CONFIG)
        place = resolve_device(device or config.decode.device)
        name = place.type if place.index is None else f"{place.type}:{place.index}"
        return cls(export_dir, config.decode, name, **search)

    @property
    def searches(self) -> list[type[Search]]:
        return [search for search in SEARCHES if search.in_ctranslate2]

    def describe(self) -> str:
        return "CTranslate2"

    def engine_search(
        self,
        sources: list[list[int]],
        trace: bool = False,
        constraints: list[tuple[Constraint, ...]] | None = None,
    ) -> list[Found]:
        if trace:
            raise ValueError("CTranslate2 does not show what its search did: use engine torch")
        if constraints is not None:
            # its API can force a target prefix, not a phrase anywhere in the output
            raise ValueError(
                "CTranslate2 cannot decode with lexical constraints (it can only force "
                "a target prefix): use engine torch"
            )
        opts = self.options
        search = self.search.ctranslate2(self.tokenizer.tgt_vocab_size)
        limit = self.max_source_len
        pieces = [self.tokenizer.source_pieces(ids) for ids in sources]
        # rosetta's budget counts the <eos>; CTranslate2's limit counts tokens before it
        groups: dict[int, list[int]] = {}
        for k, p in enumerate(pieces):
            budget = min(int(len(p) * opts.max_len_a + opts.max_len_b), limit) - 1
            groups.setdefault(max(budget, 1), []).append(k)
        found: list = [None] * len(pieces)
        for budget, members in groups.items():
            outputs = self.engine.translate_batch(
                [pieces[k] for k in members],
                max_decoding_length=budget,
                min_decoding_length=0,  # <eos> first is allowed, as in rosetta's searches
                max_input_length=0,  # sources are within the limit already; never cut
                max_batch_size=opts.batch_size,
                batch_type="examples",
                return_scores=True,
                suppress_sequences=[[SPECIAL_PIECES[BOS_ID]], [SPECIAL_PIECES[PAD_ID]]],
                **search,
            )
            for k, output in zip(members, outputs):
                found[k] = output
        target = self.tokenizer.target
        results = [
            [
                Hypothesis([target.piece_to_id(p) for p in tokens], float(score), float("nan"))
                for tokens, score in zip(output.hypotheses, output.scores)
            ]
            for output in found
        ]
        if opts.scores:
            self._score(pieces, results, [output.hypotheses for output in found])
        return [Found(hyps) for hyps in results]

    def _score(
        self, pieces: list[list[str]], results: list[list[Hypothesis]], outputs: list
    ) -> None:
        """Sets each hypothesis's ``log_prob`` to its total log-probability with <eos>.

        CTranslate2's search score leaves out the <eos> of an output cut at the
        length limit and is divided by length ** length_penalty in beam search;
        scoring the output again gives exactly rosetta's quantity.
        """
        sources = [p for p, hyps in zip(pieces, outputs) for _ in hyps]
        targets = [tokens for hyps in outputs for tokens in hyps]
        scored = iter(self.engine.score_batch(sources, targets, max_input_length=0))
        for hyps in results:
            for hypothesis in hyps:
                hypothesis.log_prob = float(sum(next(scored).log_probs))
