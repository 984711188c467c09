"""The service's JSON shapes (pydantic): what a request may hold, what comes back.

FastAPI validates every body against these and publishes them in the OpenAPI
schema (``/openapi.json``, browsable at ``/docs``). Types are strict (``"3"``,
``3.0`` or ``true`` is not an integer, ``"1"`` or ``1`` not a boolean; an integer
is a number), numbers are finite, unknown keys are errors (a misspelt option
must not be ignored silently), and bounds
that depend on the server's settings (``max_beam``, ``max_texts``, ...) are
checked by the service, which names the setting in its error.

``HeadsFile`` is the shape of a model directory's ``heads.json`` (``rosetta
heads``), which the service checks when it loads and serves at ``GET /v1/heads``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic.fields import FieldInfo

from rosetta.decode.sampling import SamplingOptions
from rosetta.decode.search import KINDS, option_fields

AttentionKind = Literal["cross", "encoder_self", "decoder_self"]


class Strict(BaseModel):
    """A request body: strict types, finite numbers, no unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def _optional(info: FieldInfo) -> tuple[Any, FieldInfo]:
    """A search option as a request field: its type and bounds, None by default
    (the model's setting)."""
    return info.annotation | None, FieldInfo.merge_field_infos(info, default=None)


# The search options are the searches' own (``rosetta.decode.search``), not listed here
Sampling = create_model(
    "Sampling",
    __base__=Strict,
    __doc__="Draw the output instead of searching (the same as ``search: sampling``).",
    **{
        name: (info.annotation, info)
        for name, info in SamplingOptions.model_fields.items()
        if name not in ("kind", "nbest")
    },
)


class GlossaryTerm(Strict):
    source: str = Field(description="a source term")
    targets: list[str] = Field(min_length=1, description="its translations; one must appear")


class ConstraintMet(BaseModel):
    text: str = Field(description="a constraint, its phrases joined by ' | '")
    met: bool = Field(description="whether the translation contains it")


class Request(Strict):
    """What ``POST /v1/translate`` takes besides the search options."""

    text: str | list[str] = Field(description="one text, or a list (one translation each)")
    search: Literal[tuple(KINDS)] | None = Field(  # type: ignore[valid-type]
        None, description="the search; left out: the model's, or the one the options given need"
    )
    sampling: Sampling | None = None  # type: ignore[valid-type]
    scores: bool = Field(True, description="each hypothesis's log-probability")
    return_attention: bool = False
    attention_kinds: list[AttentionKind] = Field(default_factory=lambda: ["cross"], max_length=3)
    return_search: bool = Field(
        False, description="top-k candidates per position and, for beam search, the tree"
    )
    candidates: int = Field(5, ge=1, le=20, description="k of the top-k candidates")
    constraints: list[list[str | list[str]]] | None = Field(
        None,
        description="lexical constraints, one list per text: target phrases the translation "
        "must contain (an item that is a list: one of its phrases); beam search only",
    )
    glossary: str | list[GlossaryTerm] | None = Field(
        None,
        description="the name of a glossary the server loaded (GET /v1/model lists them), "
        "or terms: a term found in a text (whole words, case-folded, leftmost-longest) makes "
        "one of its targets a constraint",
    )


TranslateRequest = create_model(
    "TranslateRequest",
    __base__=Request,
    __doc__="``POST /v1/translate``. Search settings left out keep the model's defaults "
    "(``GET /v1/model`` lists them); the options are those of rosetta's searches.",
    **{name: _optional(info) for name, info in option_fields().items()},
)


class Hypothesis(BaseModel):
    text: str
    score: float | None = Field(description="length-normalised, what the search ranks by")
    log_prob: float | None = Field(description="total log-probability, <eos> included")


class Attention(BaseModel):
    """Weights (layers, heads, rows, columns); rows and columns are pieces."""

    source_pieces: list[str]
    target_pieces: list[str] = Field(description="the piece each step produced; ends in </s>")
    decoder_inputs: list[str] = Field(description="what each step read; starts with <s>")
    cross: list[list[list[list[float]]]] | None = None
    encoder_self: list[list[list[list[float]]]] | None = None
    decoder_self: list[list[list[list[float]]]] | None = None


class Candidate(BaseModel):
    piece: str
    prob: float


class SearchNode(BaseModel):
    id: int
    parent: int | None
    step: int
    piece: str
    log_prob: float
    status: Literal["root", "alive", "pruned", "finished", "finished_dropped"]
    score: float | None = None


class BeamTree(BaseModel):
    size: int
    length_penalty: float
    nodes: list[SearchNode]
    chosen: list[int] = Field(description="the finished node of each returned hypothesis")


class Search(BaseModel):
    candidates: list[list[Candidate]] = Field(description="one list per target piece")
    beam: BeamTree | None = Field(description="null for greedy search and sampling")


class Translation(BaseModel):
    source: str = Field(description="the text as translated (cleaned)")
    text: str
    hypotheses: list[Hypothesis]
    attention: Attention | None = None
    search: Search | None = None
    constraints: list[ConstraintMet] = Field(
        default_factory=list, description="the text's constraints, and which the best one met"
    )


class TranslateResponse(BaseModel):
    translations: list[Translation]
    engine: str
    search: dict = Field(description="the search settings used")


class Error(BaseModel):
    """Every error: a one-line message; ``limit`` and ``value`` name a limit broken."""

    error: str
    status: int
    limit: str | None = None
    value: int | float | None = None


class LibreTranslateRequest(BaseModel):
    """``POST /translate``, as LibreTranslate takes it (JSON or a form). Not strict:
    a form's values are all strings, and LibreTranslate reads ``alternatives`` with
    ``int()``."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    q: str | list[str]
    source: str = "auto"
    target: str
    format: Literal["text", "html"] = "text"
    alternatives: int = Field(0, ge=0)
    api_key: str | None = None


# ---- heads.json: the analysis of every attention head (``rosetta heads``) ----------------
class HeadsFileModel(BaseModel):
    """A part of ``heads.json``: unknown keys are errors, numbers finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class HeadImportance(HeadsFileModel):
    """How much the model needs a head; null where it was not measured."""

    masking_bleu: float | None = Field(None, description="BLEU lost when the head is masked")
    masking_nll: float | None = Field(None, description="NLL gained when the head is masked")
    gradient: float | None = Field(None, description="gradient-based importance")


class HeadReport(HeadsFileModel):
    """One attention head: where it is, what it does, how much it matters."""

    kind: AttentionKind
    layer: int = Field(ge=0)
    head: int = Field(ge=0, description="the head's number in the original model (stable)")
    index: int | None = Field(
        None, ge=0, description="its position among the layer's current heads, in the "
        "attention maps; null for a pruned head",
    )  # fmt: skip
    module: str | None = Field(None, description="its attention module (model.head_counts)")
    role: str
    detail: str = ""
    confidence: float | None = None
    entropy: float | None = None
    distance: float | None = None
    figures: dict[str, float] = Field(
        default_factory=dict, description="the other figures (rosetta.evaluate.heads)"
    )
    importance: HeadImportance = HeadImportance()
    pruned: bool = False

    @model_validator(mode="after")
    def _index_unless_pruned(self) -> HeadReport:
        if self.pruned != (self.index is None):
            raise ValueError(
                "a pruned head has index null, and every other head an index "
                f"(got pruned {str(self.pruned).lower()}, index {self.index})"
            )
        return self


class HeadsFile(HeadsFileModel):
    """``heads.json`` (version 1), written by ``rosetta heads`` and served at ``GET /v1/heads``."""

    version: Literal[1]
    model: str = Field(description="the model directory's name")
    arch: Literal["transformer", "rnn"]
    sentences: int = Field(ge=0, description="sentences the heads were analysed on")
    thresholds: dict[str, float] = Field(description="the numbers the role rules compare with")
    roles: dict[str, str] = Field(description="each role, described in one line")
    heads: list[HeadReport]
    search: dict[str, Any] | None = Field(None, description="the search BLEU was measured with")
    base: dict[str, Any] | None = Field(None, description="the whole model's BLEU and NLL")
    agreement: dict[str, float] | None = Field(
        None, description="Spearman correlations between the importance measures"
    )
    curve: dict[str, Any] | None = Field(None, description="the pruning curve")
    importance_note: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> HeadsFile:
        seen: set[tuple[str, int, int]] = set()
        positions: set[tuple[str, int, int]] = set()
        for number, head in enumerate(self.heads):
            where = f"heads.{number}"
            if head.role not in self.roles:
                raise ValueError(f"{where}: role {head.role!r} is not one of roles")
            if (head.kind, head.layer, head.head) in seen:
                raise ValueError(f"{where}: {head.kind} layer {head.layer} head {head.head} twice")
            seen.add((head.kind, head.layer, head.head))
            if head.index is not None:
                if (head.kind, head.layer, head.index) in positions:
                    raise ValueError(
                        f"{where}: index {head.index} of {head.kind} layer {head.layer} twice"
                    )
                positions.add((head.kind, head.layer, head.index))
        return self
