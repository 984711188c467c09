"""Text in, text out: clean, tokenise, split what is too long, search, detokenise.

``Translator`` is the Python API and what every engine shares: rosetta's own
search (``TorchTranslator`` below) and CTranslate2 (``rosetta.export.ctranslate2``)
differ only in ``engine_search``, which turns id sequences of at most
``max_source_len`` subwords into hypotheses. Around it, and the same for both:

- every line goes through ``rosetta.data.text.clean_line``; a blank line gives
  one empty hypothesis of log-probability 0, so N lines in give N results out;
- a source longer than ``max_source_len`` subwords is split into sentences,
  and a sentence still too long into chunks at word boundaries; the pieces are
  translated on their own and joined back into one output (``split_source``),
  so nothing is cut off;
- long streams are translated ``chunk`` lines at a time (``translate_stream``).

Inside an engine, sentences are sorted by length and batched by a token budget,
and results come back in input order. Each sentence's result does not depend on
the batch it landed in (padding is masked everywhere).
"""

from __future__ import annotations

import copy
import re
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rosetta.config import ConfigError, DecodeConfig
from rosetta.data.batching import make_batches
from rosetta.data.text import clean_line, one_line
from rosetta.data.tokenizer import PAD_ID, Tokenizer
from rosetta.decode.beam import beam_search
from rosetta.decode.common import Hypothesis, Lengths
from rosetta.decode.greedy import greedy_search
from rosetta.decode.mask_predict import mask_predict
from rosetta.decode.sampling import sample
from rosetta.model.interface import IncrementalDecoder, Seq2Seq
from rosetta.model.linear import as_plain_linear


@dataclass(frozen=True)
class Source:
    """One input ready for search: its cleaned text and its source subword ids."""

    text: str
    ids: list[int]


@dataclass
class Translation:
    """The n-best translations of one input, best first."""

    source: str
    hypotheses: list[tuple[str, Hypothesis]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.hypotheses[0][0] if self.hypotheses else ""

    def nbest_lines(self, sentence_id: int) -> list[str]:
        """``sentence_id ||| hypothesis ||| log_prob`` per hypothesis (the Moses and
        fairseq n-best form; ids count input lines from 0). The score is the total
        log-probability of the output tokens and <eos> under the model."""
        return [f"{sentence_id} ||| {text} ||| {h.log_prob:.4f}" for text, h in self.hypotheses]


def pad_batch(
    sequences: list[list[int]], device: torch.device | str = "cpu", value: int = PAD_ID
) -> torch.Tensor:
    """Right-pads id lists into (batch, max_len) with ``value`` (<pad> by default)."""
    out = torch.full((len(sequences), max(map(len, sequences))), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out.to(device)


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


# The options each search reads; the batching, length and device options of
# ``DecodeConfig`` are read by all. An option given for a search that does not read it
# is an error (``check_search_options``), never silently ignored.
SEARCH_OPTIONS = {
    "greedy": {"beam", "nbest", "length_penalty"},  # beam search of size 1
    "beam": {"beam", "nbest", "length_penalty"},
    "sampling": {"sampling", "nbest", "temperature", "top_k", "top_p", "seed"},
    "mask-predict": {"iterations", "length_beam", "nbest"},
}
_EVERY_SEARCH = {"max_len_a", "max_len_b", "max_tokens", "batch_size", "scores", "device"}


def search_kind(options: DecodeConfig, autoregressive: bool) -> str:
    """The search ``options`` select for a model (mask-predict for a model that fills
    in every position at once)."""
    if not autoregressive:
        return "mask-predict"
    if options.sampling:
        return "sampling"
    return "greedy" if options.beam == 1 and options.nbest == 1 else "beam"


def check_search_options(
    options: DecodeConfig, given: dict[str, Any], autoregressive: bool
) -> None:
    """Raises ``ConfigError`` naming every option in ``given`` (a caller's explicit
    choices; None and ``sampling=False`` mean "not given") that the selected search
    would ignore, and an n-best the search cannot return."""
    kind = search_kind(options, autoregressive)
    if not autoregressive and options.sampling:
        raise ConfigError("a non-autoregressive model searches by mask-predict: it cannot sample")
    ignored = [
        name
        for name, value in given.items()
        if value is not None
        and not (name == "sampling" and value is False)
        and name not in SEARCH_OPTIONS[kind] | _EVERY_SEARCH
    ]
    if ignored:
        raise ConfigError(
            f"{kind} search does not use {', '.join(ignored)} (it reads "
            f"{', '.join(sorted(SEARCH_OPTIONS[kind]))})"
        )
    if kind in ("greedy", "beam") and options.nbest > options.beam:
        raise ConfigError(
            f"nbest ({options.nbest}) cannot exceed the beam size ({options.beam}) unless sampling"
        )
    if kind == "mask-predict" and options.nbest > options.length_beam:
        raise ConfigError(
            f"nbest ({options.nbest}) cannot exceed length_beam ({options.length_beam}): "
            "mask-predict returns one hypothesis per target length tried"
        )


class Translator(ABC):
    """Raw sentences to translations: the Python API, the same for every engine.

    ``Translator.load(model_dir, engine=...)`` gives rosetta's own PyTorch search
    (``TorchTranslator``) or CTranslate2 on an exported model
    (``rosetta.export.ctranslate2.CTranslate2Translator``); an engine implements
    only ``engine_search``. A translator may be shared by threads: its calls run
    one at a time (a lock), each using the whole machine.
    """

    def __init__(self, tokenizer: Tokenizer, options: DecodeConfig, max_source_len: int) -> None:
        """``max_source_len``: the longest source, in subwords, the engine accepts."""
        self.tokenizer = tokenizer
        self.options = options
        self.max_source_len = max_source_len
        self._lock = threading.Lock()

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
            from rosetta.export.ctranslate2 import CTranslate2Translator

            if quantize not in (None, "none"):
                raise ValueError(
                    "CTranslate2 models are quantized when exported: "
                    "rosetta export MODEL_DIR OUT --quantization int8"
                )
            return CTranslate2Translator.from_export(model_dir, device, **search)
        raise ValueError(f"unknown engine {engine!r}: expected torch or ctranslate2")

    @abstractmethod
    def engine_search(self, sources: list[list[int]]) -> list[list[Hypothesis]]:
        """The engine's search on non-empty sources of at most ``max_source_len`` ids:
        ``options.nbest`` hypotheses per source, best first, in input order."""

    def search_ids(self, sources: list[list[int]]) -> list[list[Hypothesis]]:
        """Runs the configured search on id sequences of any length, in input order.

        An empty source gives one empty hypothesis of log-probability 0; a source
        over ``max_source_len`` is split (``split_source``) and its parts'
        hypotheses joined (``join_hypotheses``).
        """
        results: list[list[Hypothesis]] = [[Hypothesis([], 0.0, 0.0)] for _ in sources]
        segments: list[list[int]] = []
        spans: dict[int, range] = {}  # source index -> its segments
        for index, ids in enumerate(sources):
            if not ids:
                continue
            pieces = self.tokenizer.source_pieces(ids) if len(ids) > self.max_source_len else []
            parts = split_source(list(ids), pieces, self.max_source_len)
            spans[index] = range(len(segments), len(segments) + len(parts))
            segments += parts
        found = self.engine_search(segments) if segments else []
        for index, span in spans.items():
            results[index] = join_hypotheses(found[span.start : span.stop])
        return results

    autoregressive = True  # whether the engine's model writes left to right

    @property
    def search_options(self) -> list[str]:
        """The options some search of this model reads (what a caller may set)."""
        kinds = ["greedy", "beam", "sampling"] if self.autoregressive else ["mask-predict"]
        return sorted(set().union(*(SEARCH_OPTIONS[kind] for kind in kinds)))

    def with_options(self, **search: Any) -> Translator:
        """The same engine and model with other search settings (``beam=4``, ...; None
        keeps one): a shallow copy, sharing the model, its memory and the lock. An
        option the selected search would ignore is a ``ConfigError`` naming it."""
        configured = copy.copy(self)
        configured.options = self.options.with_overrides(**search)
        check_search_options(configured.options, search, self.autoregressive)
        return configured

    def encode(self, sentences: list[str]) -> list[Source]:
        """Cleans and tokenises raw sentences (cheap, and needs no lock): what
        ``translate_encoded`` takes, and what a caller can measure first."""
        cleaned = [clean_line(s) for s in sentences]
        return [
            Source(text, ids) for text, ids in zip(cleaned, self.tokenizer.encode_source(cleaned))
        ]

    def translate_encoded(self, sources: list[Source]) -> list[Translation]:
        """Translates encoded sentences: one ``Translation`` per source, each text one line."""
        with self._lock:
            found = self.search_ids([source.ids for source in sources])
        return [self.translation(source, hyps) for source, hyps in zip(sources, found)]

    def translation(self, source: Source, hypotheses: list[Hypothesis]) -> Translation:
        """The ``Translation`` of ``source`` from its hypotheses (detokenised, one line each)."""
        detokenise = self.tokenizer.decode_target
        return Translation(source.text, [(one_line(detokenise(h.tokens)), h) for h in hypotheses])

    def translate(self, sentences: list[str]) -> list[Translation]:
        """Translates raw sentences: one ``Translation`` per sentence, each text one line."""
        return self.translate_encoded(self.encode(sentences))

    def translate_stream(self, lines: Iterable[str], chunk: int = 1000) -> Iterator[Translation]:
        """Translates a long stream ``chunk`` lines at a time (each chunk is
        length-sorted inside the engine), keeping memory bounded."""
        buffer: list[str] = []
        for line in lines:
            buffer.append(line)
            if len(buffer) >= chunk:
                yield from self.translate(buffer)
                buffer = []
        if buffer:
            yield from self.translate(buffer)


class TorchTranslator(Translator):
    """rosetta's own search (greedy, beam or sampling) on a PyTorch model."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, options: DecodeConfig) -> None:
        # eval mode with the CPU inference layouts made once (a dynamically quantized
        # model has no rosetta ``Linear`` left to prepare: it is put in eval mode)
        if isinstance(model, Seq2Seq):
            model.prepare_for_inference()
        self.model = model.eval()
        self.device = next(model.parameters()).device
        max_positions = getattr(getattr(model, "cfg", None), "max_positions", 1024)
        super().__init__(tokenizer, options, max_positions - 1)
        self.autoregressive = isinstance(model, IncrementalDecoder)

    @classmethod
    def from_model_dir(
        cls, directory: str | Path, device: str | None = None, quantize: str | None = None, **search
    ) -> TorchTranslator:
        """Loads a model directory; ``quantize="int8"`` applies PyTorch's dynamic int8
        quantization to every linear layer (CPU only; weights int8, activations
        quantized on the fly)."""
        from rosetta.modeldir import load_model_dir

        config, tokenizer, model = load_model_dir(directory, device)
        if quantize == "int8":
            if next(model.parameters()).device.type != "cpu":
                raise ValueError("dynamic int8 quantization runs on the CPU only")
            with warnings.catch_warnings():
                # PyTorch 2.13 announces the removal of quantized tensors (torchao takes
                # over); the API still works, so keep the user's terminal clean
                warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
                model = torch.ao.quantization.quantize_dynamic(
                    as_plain_linear(model), {torch.nn.Linear}, dtype=torch.qint8
                )
        elif quantize not in (None, "none"):
            raise ValueError(f"unknown quantization {quantize!r}: expected int8")
        return cls(model, tokenizer, config.decode).with_options(**search)

    def engine_search(self, sources: list[list[int]]) -> list[list[Hypothesis]]:
        opts = self.options
        results: list[list[Hypothesis]] = [[] for _ in sources]
        sizes = np.array([len(s) for s in sources])
        generator = torch.Generator(device=self.device).manual_seed(opts.seed)
        lengths = Lengths.of(opts, self.max_source_len)
        for rows in make_batches(sizes, sizes, opts.max_tokens, max_sentences=opts.batch_size):
            src = pad_batch([sources[i] for i in rows], self.device)
            if not self.autoregressive:  # fills in all at once
                found = mask_predict(
                    self.model, src, opts.iterations, opts.length_beam, opts.nbest, lengths
                )
            elif opts.sampling:  # nbest samples per source: its row repeated nbest times
                drawn = sample(
                    self.model,
                    src.repeat_interleave(opts.nbest, dim=0),
                    generator,
                    opts.temperature,
                    opts.top_k,
                    opts.top_p,
                    lengths,
                )
                found = [drawn[k : k + opts.nbest] for k in range(0, len(drawn), opts.nbest)]
            elif opts.beam == 1 and opts.nbest == 1:
                hyps = greedy_search(self.model, src, lengths, with_scores=opts.scores)
                found = [[h] for h in hyps]
            else:
                found = beam_search(
                    self.model, src, opts.beam, opts.length_penalty, opts.nbest, lengths
                )
            for row, hyps in zip(rows, found):
                results[row] = hyps
        return results
