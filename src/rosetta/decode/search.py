"""The searches rosetta has, and the one place that chooses among them.

``SEARCHES`` lists every search class (``rosetta.decode.common.Search``), in
order of preference: a model's default search is the first one it can run
(beam search for a left-to-right model, mask-predict for one that fills in).
Everything that names a search or one of its options asks this module:

- ``configure`` turns a ``decode.search`` section and a caller's choices (the
  Python API's keyword arguments, the CLI's flags, an HTTP request's fields)
  into a ``Search``, or a ``ConfigError`` naming what does not fit;
- ``option_fields`` gives every option's name, type, bounds and help, from
  which the CLI flags and the HTTP schema are made.

Adding a search: its module (the algorithm, its ``SearchOptions`` subclass and
its ``Search`` subclass) and one entry in ``SEARCHES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from rosetta.config import LEGACY_SEARCH_KEYS, ConfigError, format_error
from rosetta.decode.beam import BeamSearch
from rosetta.decode.common import Search
from rosetta.decode.greedy import GreedySearch
from rosetta.decode.mask_predict import MaskPredictSearch
from rosetta.decode.sampling import SamplingSearch

SEARCHES: tuple[type[Search], ...] = (BeamSearch, GreedySearch, SamplingSearch, MaskPredictSearch)
KINDS = {search.kind(): search for search in SEARCHES}


def runnable(model: Any) -> list[type[Search]]:
    """The searches ``model`` has the capability for, in order of preference."""
    return [search for search in SEARCHES if search.runs_on(model)]


def option_fields(searches: Sequence[type[Search]] = SEARCHES) -> dict[str, FieldInfo]:
    """Every option some of ``searches`` reads, by name, with its pydantic field
    (type, bounds, description); an option several read (``nbest``) is one entry."""
    fields: dict[str, FieldInfo] = {}
    for search in searches:
        for name, info in search.Options.model_fields.items():
            if name != "kind":
                fields.setdefault(name, info)
    return fields


def _kind_named(kind: str, available: Sequence[type[Search]], what: str) -> type[Search]:
    if kind not in KINDS:
        raise ConfigError(f"unknown search {kind!r}: expected one of {', '.join(KINDS)}")
    if KINDS[kind] not in available:
        runs = ", ".join(search.kind() for search in available) or "none"
        needs = KINDS[kind].needs.__name__
        raise ConfigError(f"{kind} search needs an {needs}; {what} cannot run it (it runs: {runs})")
    return KINDS[kind]


def _validated(search: type[Search], values: dict[str, Any]) -> Search:
    try:
        return search(search.Options.model_validate({**values, "kind": search.kind()}))
    except ValidationError as error:
        raise ConfigError(
            f"invalid {search.kind()} search options:\n{format_error(error)}"
        ) from None


def _section(section: dict[str, Any], available: Sequence[type[Search]], what: str) -> Search:
    """The search a ``decode.search`` section states. With ``kind``, every key must
    be an option of that search. Without it, the section is read as the flat
    ``decode`` keys of configurations written before the search section existed
    were: sampling if ``sampling`` is true, else the model's first search, each
    reading its own keys among ``LEGACY_SEARCH_KEYS`` and ignoring the others."""
    values = dict(section)
    kind = values.pop("kind", None)
    if kind is not None:
        return _validated(_kind_named(kind, available, what), values)
    unknown = sorted(set(values) - LEGACY_SEARCH_KEYS)
    if unknown:
        raise ConfigError(
            f"decode.search: {', '.join(unknown)} is not a search option; "
            "give kind: (one of " + ", ".join(KINDS) + ") and its options"
        )
    if values.pop("sampling", False):
        search = _kind_named(SamplingSearch.kind(), available, what)
    else:
        search = available[0]
    return _validated(search, {k: v for k, v in values.items() if k in search.reads()})


def configure(
    section: dict[str, Any],
    given: dict[str, Any] | None = None,
    available: Sequence[type[Search]] = SEARCHES,
    what: str = "this model",
) -> Search:
    """The search of a ``decode.search`` ``section`` with a caller's choices
    ``given`` (None, and ``sampling=False``, mean "not given"), among the
    ``available`` searches of a model or engine (``what`` names it in errors).

    ``given`` may hold ``search`` (a kind), ``sampling=True`` (the same as
    ``search="sampling"``) and options. Without a kind, the section's search is
    kept if it reads every option given, else the first available search that
    does and does not draw at random (a random search is only ever asked for by
    name: ``--temperature`` alone does not make beam search sample); a search
    keeps its own settings for options not given, a search switched to starts
    from its defaults. An option no available search reads,
    or one the chosen search does not read, is a ``ConfigError`` naming it.
    """
    if not available:
        raise ConfigError(f"{what} can run none of rosetta's searches")
    current = _section(section, available, what)
    given = {k: v for k, v in (given or {}).items() if v is not None}
    kind = given.pop("search", None)
    if given.pop("sampling", False):
        kind = kind or SamplingSearch.kind()
    if not given and kind is None:
        return current
    if kind is not None:
        search = _kind_named(kind, available, what)
    elif set(given) <= type(current).reads():
        search = type(current)
    else:
        readers = (s for s in available if set(given) <= s.reads() and not s.random)
        search = next(readers, type(current))
    ignored = sorted(set(given) - search.reads())
    if ignored:
        raise ConfigError(
            f"{search.kind()} search does not use {', '.join(ignored)} (it reads "
            f"{', '.join(sorted(search.reads())) or 'no options'})"
        )
    start = current.options.model_dump() if search is type(current) else {}
    return _validated(search, {**start, **given})


def validation_search(section: dict[str, Any], model: Any) -> Search:
    """The search validation BLEU runs during training, cheap and deterministic:
    greedy search where the model can run it, else its ``section``'s search with
    one hypothesis (mask-predict keeps its passes and length beam)."""
    available = runnable(model)
    if GreedySearch in available:
        return GreedySearch(GreedySearch.Options())
    search = configure(section, None, available)
    return configure(search.describe(), search.for_hypotheses(1) | {"nbest": 1}, available)
