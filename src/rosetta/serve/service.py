"""The translation service without HTTP: requests in, JSON-ready results out.

``TranslationService`` owns a ``Translator`` (either engine) and a ``Batcher``
whose one worker thread is the only user of the model. ``submit`` checks a
request against the limits (``ServeConfig``), tokenises it and queues it;
requests with the same search settings are decoded together, through the same
``Translator.translate_encoded`` as offline translation, so an answer does not
depend on what it was batched with. Requests that want to see inside the model
(attention, candidates, the beam tree: ``rosetta.decode.explain``) get it from
the worker too, after their search.

What a request asks to see is bounded before it is queued: its attention
weights and search items, counted at the longest output its sources allow
(``rosetta.serve.budget``), against ``max_attention_weights`` and
``max_search_items``. Weights and probabilities are rounded to ``WEIGHT_DIGITS``
decimals as float64, so the JSON holds ``0.0524``, not the float32 value's
``0.052400000393390656``.

Errors a client can cause are ``RequestError`` with the HTTP status and the
name of the limit; anything else would be a bug.

A model directory may hold ``heads.json``, the analysis of every attention head
(``rosetta heads``): the service checks it when it loads (``load_heads``; a file
that does not fit is a ``ValueError``, a one-line error at start-up) and serves
it as it is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from rosetta.config import ConfigError, ModelConfig, ServeConfig, load_config
from rosetta.decode.explain import Pieces, attention_weights, candidates, tree
from rosetta.decode.glossary import Glossary
from rosetta.decode.search import option_fields
from rosetta.decode.translator import Source, TorchTranslator, Translation, Translator
from rosetta.memory import release_memory
from rosetta.modeldir import CONFIG, read_metadata
from rosetta.serve.batcher import Batcher, Job, ModelThread, QueueFull
from rosetta.serve.budget import attention_size, maps_per_kind, search_size
from rosetta.serve.schemas import HeadsFile, TranslateRequest
from rosetta.serve.stream import EngineStream

LANGUAGE_NAMES = {
    "ar": "Arabic", "cs": "Czech", "de": "German", "en": "English", "es": "Spanish",
    "fr": "French", "it": "Italian", "ja": "Japanese", "nl": "Dutch", "pl": "Polish",
    "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "tr": "Turkish", "uk": "Ukrainian",
    "zh": "Chinese",
}  # fmt: skip
WEIGHT_DIGITS = 4  # attention weights, probabilities and tree scores in responses
HEADS = "heads.json"  # in the model directory: the analysis of its attention heads
HEADS_MISSING = (
    f"this model has no {HEADS}: make one with rosetta heads MODEL_DIR --src FILE --ref FILE "
    "-o MODEL_DIR (MODEL_DIR: the directory served), then restart the server"
)


def rounded(values: np.ndarray | list[float]) -> list:
    """``values`` rounded to ``WEIGHT_DIGITS`` decimals as nested lists of float64:
    rounding float32 leaves the nearest float32 (``0.052400000393390656`` in JSON)."""
    return np.round(np.asarray(values, dtype=np.float64), WEIGHT_DIGITS).tolist()


class RequestError(ValueError):
    """A request the service refuses: HTTP ``status``, and the ``limit`` it broke."""

    def __init__(
        self, status: int, message: str, limit: str | None = None, value: Any = None
    ) -> None:
        super().__init__(message)
        self.status, self.limit, self.value = status, limit, value


@dataclass
class Work:
    """One request as the worker sees it."""

    translator: Translator
    sources: list[Source]
    attention: tuple[str, ...]  # kinds to return; empty: none
    candidates: int  # top-k per position; 0: no search view
    tree: bool  # record the beam search's tree


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _shown_node(node: dict[str, Any]) -> dict[str, Any]:
    """A beam-tree node as returned: without its token id, its scores rounded."""
    shown = {key: value for key, value in node.items() if key != "token"}
    for key in ("log_prob", "score"):
        if shown.get(key) is not None:
            shown[key] = _finite(round(float(shown[key]), WEIGHT_DIGITS))
    return shown


class TranslationService:
    """A model behind a queue: ``submit`` requests, await their jobs' futures."""

    def __init__(
        self,
        translator: Translator,
        model_dir: str | Path,
        engine: str,
        config: ServeConfig,
        thread: ModelThread | None = None,
    ) -> None:
        """``thread``: the ``ModelThread`` ``translator`` was loaded on, which then
        runs it; by default the batcher's own."""
        self.translator = translator
        self.engine = engine
        self.config = config
        self.model_dir = Path(model_dir)
        self.experiment = load_config(self.model_dir / CONFIG)
        self.metadata = read_metadata(self.model_dir)
        # layers x heads of each attention kind the model has (what one row costs)
        self.attention_maps = maps_per_kind(self.experiment.model)
        self.glossaries = load_glossaries(config.glossaries)
        self.heads = load_heads(self.model_dir, self.experiment.model)  # None: no heads.json
        stream = EngineStream(self._answer, config.max_sentences, config.batch_tokens)
        self.batcher = Batcher(
            self._process, config.batch_tokens, config.max_wait_ms / 1000, config.max_queue,
            thread, stream if config.continuous else None,
        )  # fmt: skip

    @classmethod
    def load(
        cls, model_dir: str | Path, engine: str = "torch", device: str | None = None,
        config: ServeConfig | None = None,
    ) -> TranslationService:  # fmt: skip
        """Loads a model directory (or a CTranslate2 export with ``engine="ctranslate2"``)
        on the thread that will run it."""
        thread = ModelThread()
        translator = thread.submit(Translator.load, model_dir, engine, device).result()
        return cls(translator, model_dir, engine, config or ServeConfig(), thread)

    # ---- what is served --------------------------------------------------------------
    @property
    def languages(self) -> tuple[str, str]:
        return self.experiment.data.src_lang, self.experiment.data.tgt_lang

    @property
    def explains(self) -> bool:
        """Whether attention and the search can be shown (rosetta's own engine)."""
        return isinstance(self.translator, TorchTranslator)

    def info(self) -> dict[str, Any]:
        """``GET /v1/model``: what the model is, how it searches, what it may be asked."""
        model = self.experiment.model
        rnn = model.arch == "rnn"
        shape = {
            "encoder_layers": model.encoder_layers,
            "decoder_layers": model.decoder_layers,
            "heads": 1 if rnn else model.heads,
            "d_model": model.d_model,
        }
        kinds = list(self.attention_maps) if self.explains else []
        limits = self.config
        return {
            "name": self.model_dir.name,
            "engine": self.engine,
            "arch": model.arch,
            "source_language": self.languages[0],
            "target_language": self.languages[1],
            "parameters": self.metadata.get("parameters"),
            "shape": shape,
            "max_source_pieces": self.translator.max_source_len,
            "training": {key: self.metadata.get(key) for key in ("steps", "weights")},
            "validation": self.metadata.get("validation"),
            "search": self.translator.settings(),
            "searches": [search.kind() for search in self.translator.searches],
            "search_options": self.translator.search_options,  # the others are refused
            "glossaries": sorted(self.glossaries),
            "limits": self.config.model_dump(),
            "features": {
                "attention": self.explains and limits.max_attention_weights > 0,
                "search": self.explains and limits.max_search_items > 0,
                "attention_kinds": kinds,
                "heads": self.heads is not None,
            },
        }

    # ---- requests ----------------------------------------------------------------------
    def check_texts(self, texts: list[str]) -> None:
        """The per-request limits on texts (413), and text that is not Unicode (422)."""
        limits = self.config
        if len(texts) > limits.max_texts:
            raise RequestError(
                413, f"{len(texts)} texts in one request; at most {limits.max_texts}",
                "max_texts", limits.max_texts,
            )  # fmt: skip
        for index, text in enumerate(texts):
            if len(text) > limits.max_chars:
                raise RequestError(
                    413, f"text {index} has {len(text):,} characters; at most {limits.max_chars:,}",
                    "max_chars", limits.max_chars,
                )  # fmt: skip
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(
                    422, f"text {index} is not valid Unicode (it holds a lone surrogate)"
                ) from None

    def configured(self, request: TranslateRequest) -> Translator:
        """The translator with the request's search settings (422 when they conflict,
        or when an option that multiplies the work is over ``max_beam``)."""
        limit = self.config.max_beam
        fields = option_fields()
        for name, info in fields.items():
            value = getattr(request, name)
            work = isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("work")
            if work and value is not None and value > limit:
                raise RequestError(
                    422, f"{name} {value} is over max_beam {limit}", "max_beam", limit
                )
        search: dict[str, Any] = {name: getattr(request, name) for name in fields}
        search |= {"search": request.search, "scores": request.scores}
        if request.sampling is not None:  # the same as search: sampling, with its options
            search |= {"sampling": True, **request.sampling.model_dump()}
        try:
            return self.translator.with_options(**search)
        except ConfigError as error:
            raise RequestError(422, " ".join(str(error).split())) from None

    def submit(self, request: TranslateRequest) -> Job:
        """Checks and queues a request; its job's future gives ``list[dict]``, one
        ``Translation`` (``rosetta.serve.schemas``) per text."""
        texts = [request.text] if isinstance(request.text, str) else request.text
        self.check_texts(texts)
        translator = self.configured(request)
        explain = request.return_attention or request.return_search
        if explain and not self.explains:
            raise RequestError(
                422, "return_attention and return_search need rosetta's own engine "
                "(rosetta serve --engine torch)",
            )  # fmt: skip
        sources = self.encode(translator, texts, request)
        if request.return_search and any(source.constraints for source in sources):
            # a constrained beam considers more candidates than max_search_items counts
            raise RequestError(
                422, "the search view is not shown for constrained translations: "
                "leave out return_search, or the constraints",
            )  # fmt: skip
        if explain:
            limit = translator.max_source_len
            for index, source in enumerate(sources):
                if len(source.ids) > limit:
                    raise RequestError(
                        422, f"text {index} has {len(source.ids)} subwords; attention and the "
                        f"search are shown for at most {limit}", "max_source_pieces", limit,
                    )  # fmt: skip
        # return_search implies torch; only some searches have a tree (beam search)
        tree = request.return_search and translator.search.has_tree
        work = Work(
            translator,
            sources,
            tuple(dict.fromkeys(request.attention_kinds)) if request.return_attention else (),
            request.candidates if request.return_search else 0,
            tree,
        )
        if explain:
            self.check_explained(work)
        key = (translator.options.model_dump_json(), explain)
        size = max(1, sum(len(source.ids) for source in sources))
        try:
            return self.batcher.submit(key, size, work)
        except QueueFull as error:
            raise RequestError(
                503, f"the server is busy: {error}", "max_queue", self.config.max_queue
            ) from None
        except RuntimeError as error:
            raise RequestError(503, str(error)) from None

    def encode(
        self, translator: Translator, texts: list[str], request: TranslateRequest
    ) -> list[Source]:
        """The texts tokenised, with their lexical constraints (422 when they cannot
        be honoured: a search or engine without them, a phrase over its text's
        output limit; 413 for a glossary over ``max_glossary_terms``)."""
        glossary, given = None, request.glossary
        if isinstance(given, str):
            if given not in self.glossaries:
                known = ", ".join(sorted(self.glossaries)) or "none"
                raise RequestError(422, f"no glossary named {given!r} (loaded: {known})")
            glossary = self.glossaries[given]
        elif given is not None:
            limit = self.config.max_glossary_terms
            if len(given) > limit:
                raise RequestError(
                    413, f"a glossary of {len(given)} terms; at most {limit}",
                    "max_glossary_terms", limit,
                )  # fmt: skip
            try:
                glossary = Glossary.from_pairs((term.source, term.targets) for term in given)
            except ValueError as error:
                raise RequestError(422, f"glossary: {error}") from None
        if request.constraints is None and glossary is None:
            return translator.encode(texts)
        if request.constraints is not None and len(request.constraints) != len(texts):
            raise RequestError(
                422, f"{len(request.constraints)} constraint lists for {len(texts)} texts"
            )
        if not getattr(translator.search, "takes_constraints", False) or not isinstance(
            translator, TorchTranslator
        ):
            raise RequestError(
                422, "lexical constraints need beam search on rosetta's own engine "
                f"(this request's: {translator.search.describe()['kind']} on {self.engine})",
            )  # fmt: skip
        try:
            sources = translator.encode(texts, request.constraints, glossary)
            translator.check_constraints([s.ids for s in sources], [s.constraints for s in sources])
        except ValueError as error:
            raise RequestError(422, " ".join(str(error).split())) from None
        return sources

    def check_explained(self, work: Work) -> None:
        """Refuses (413) a request whose attention or search view could be larger than
        ``max_attention_weights`` or ``max_search_items``: counted before decoding,
        at the longest output each source allows (``rosetta.serve.budget``)."""
        translator, limits = work.translator, self.config
        lengths = [len(source.ids) for source in work.sources]
        bound = (translator.options, translator.max_source_len)
        texts = f"{len(lengths)} text{'s' if len(lengths) != 1 else ''}"
        weights = attention_size(lengths, work.attention, self.attention_maps, *bound)
        if weights > limits.max_attention_weights:
            limit = limits.max_attention_weights
            raise RequestError(
                413, f"the attention asked for ({', '.join(work.attention)}, {texts}) could "
                f"hold {weights:,} weights (layers x heads x rows x columns); at most "
                f"max_attention_weights ({limit:,}): ask for fewer texts or kinds, or "
                "shorter texts", "max_attention_weights", limit,
            )  # fmt: skip
        width = translator.search.tree_width() if work.tree else 0
        items = search_size(lengths, work.candidates, width, *bound)
        if items > limits.max_search_items:
            limit = limits.max_search_items
            raise RequestError(
                413, f"the search view asked for ({texts}, {work.candidates} candidates"
                f"{f', a tree of {width} nodes a step' if width else ''}) could hold "
                f"{items:,} candidates and tree nodes; at most max_search_items ({limit:,}): "
                "ask for fewer texts or candidates, a smaller beam, or shorter texts",
                "max_search_items", limit,
            )  # fmt: skip

    # ---- the worker ---------------------------------------------------------------------
    def _process(self, group: list[Work]) -> list[list[dict[str, Any]]]:
        """Decodes one group (same search settings) together; runs on the worker. A
        group that explains keeps each search's trace (attention and the search
        view are read from it, nothing is searched again)."""
        translator = group[0].translator
        sources = [source for work in group for source in work.sources]
        explain = any(work.attention or work.candidates for work in group)
        translations = translator.translate_encoded(sources, trace=explain)
        release_memory()
        results, start = [], 0
        for work in group:
            span = range(start, start + len(work.sources))
            start = span.stop
            results.append([self._result(work, translations[i], sources[i]) for i in span])
        return results

    def _answer(self, work: Work, translations: list[Translation]) -> list[dict[str, Any]]:
        """A streamed request's result from its translations (no view inside)."""
        return [self._result(work, t, s) for t, s in zip(translations, work.sources)]

    def _result(self, work: Work, translation: Translation, source: Source) -> dict[str, Any]:
        result: dict[str, Any] = {
            "source": translation.source,
            "text": translation.text,
            "hypotheses": [
                {"text": text, "score": _finite(h.score), "log_prob": _finite(h.log_prob)}
                for text, h in translation.hypotheses
            ],
            "attention": None,
            "search": None,
            "constraints": translation.constraints,
        }
        if not source.ids or not (work.attention or work.candidates):
            return result
        translator = work.translator
        assert isinstance(translator, TorchTranslator)
        trace = translation.trace
        assert trace is not None  # an explaining group is traced
        pieces = Pieces.of(translator, source.ids, trace)
        if work.attention:
            weights = attention_weights(translator, source.ids, trace, work.attention)
            result["attention"] = {
                "source_pieces": pieces.source,
                "target_pieces": pieces.produced,
                "decoder_inputs": pieces.decoder_inputs,
                **{kind: [rounded(layer) for layer in w] for kind, w in weights.items()},
            }
        if work.candidates:
            top = candidates(translator, source.ids, trace, work.candidates)
            pieces_of = translator.tokenizer.target_pieces
            shown = [
                [{"piece": p, "prob": prob} for p, prob in zip(names, rounded([q for _, q in row]))]
                for names, row in ((pieces_of([token for token, _ in row]), row) for row in top)
            ]
            shown_tree = tree(translator, trace) if work.tree else None
            if shown_tree is not None:
                shown_tree["nodes"] = [_shown_node(node) for node in shown_tree["nodes"]]
            result["search"] = {"candidates": shown, "beam": shown_tree}
        return result


def load_glossaries(spec: str) -> dict[str, Glossary]:
    """``NAME=FILE[,NAME=FILE]`` (``ServeConfig.glossaries``) loaded, by name."""
    glossaries: dict[str, Glossary] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, path = item.partition("=")
        if not name or not path:
            raise ValueError(f"glossaries: expected NAME=FILE, got {item!r}")
        glossaries[name] = Glossary.load(path)
    return glossaries


def load_heads(model_dir: Path, model: ModelConfig) -> dict[str, Any] | None:
    """``model_dir/heads.json`` as written, or None when there is none. It must be a
    ``HeadsFile`` about this model (its kinds, layers and heads); one that is not is
    a ``ValueError`` naming the file and the first problem."""
    path = model_dir / HEADS
    if not path.exists():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    try:
        report = HeadsFile.model_validate(content)
    except ValidationError as error:
        first, *others = error.errors()
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        more = f" (and {len(others)} more problems)" if others else ""
        raise ValueError(
            f"invalid {path}: {where + ': ' if where else ''}{message}{more}"
        ) from None
    rnn = model.arch == "rnn"
    if (report.arch == "rnn") != rnn:
        raise ValueError(
            f"invalid {path}: it describes an {report.arch} model; this one is {model.arch}"
        )
    for number, head in enumerate(report.heads):
        where = f"invalid {path}: heads.{number}: {head.kind} layer {head.layer} head {head.head}"
        layers, heads, current = _attention_shape(model, head.kind, head.layer)
        if head.layer >= layers:
            raise ValueError(f"{where}: this model has {layers} {head.kind} layers")
        if head.head >= heads:
            raise ValueError(f"{where}: this model has {heads} heads a layer")
        if head.index is not None and head.index >= current:
            raise ValueError(f"{where}: index {head.index}, but the layer has {current} heads")
    return content


def _attention_shape(model: ModelConfig, kind: str, layer: int) -> tuple[int, int, int]:
    """For an attention ``kind`` of ``model``: its layers, the heads a layer had before
    any pruning, and the heads ``layer`` has now (0s for a kind the model lacks)."""
    if model.arch == "rnn":  # one Bahdanau alignment, as cross-attention
        return (1, 1, 1) if kind == "cross" else (0, 0, 0)
    part = "encoder" if kind == "encoder_self" else "decoder"
    name = "cross" if kind == "cross" else "self"
    layers = model.encoder_layers if part == "encoder" else model.decoder_layers
    return layers, model.heads, model.heads_at(f"{part}.{layer}.{name}")
