"""JSON response bodies that do not stop the rest of the server while they are built.

``json.dumps`` is one call into C that holds the GIL until the whole body is
written: run on a worker thread, a body of millions of numbers still stops the
event loop (a 3-million-float body held it 1.5 s here). ``encode`` gives the
same bytes as Starlette's ``JSONResponse`` (UTF-8, compact, no NaN), but
writes a container holding containers part by part, in Python, so each call
into C writes one leaf (an attention row, a search node) and the interpreter
can switch threads between them. Run it on a worker thread
(``asyncio.to_thread``): the event loop then keeps answering (``/health``)
while a large body is built.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

_dumps = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=False
).encode
_CONTAINERS = (dict, list, tuple)


def encode(content: Any) -> bytes:
    """``content`` as a JSON body, byte for byte what ``JSONResponse`` renders."""
    parts: list[str] = []
    _write(content, parts.append)
    return "".join(parts).encode("utf-8")


def _write(value: Any, out: Callable[[str], Any]) -> None:
    if (
        isinstance(value, dict)
        and _holds_containers(value.values())
        and all(isinstance(key, str) for key in value)
    ):
        out("{")
        for index, (key, item) in enumerate(value.items()):
            out(("," if index else "") + _dumps(key) + ":")
            _write(item, out)
        out("}")
    elif isinstance(value, (list, tuple)) and _holds_containers(value[:1]):
        out("[")
        for index, item in enumerate(value):
            if index:
                out(",")
            _write(item, out)
        out("]")
    else:  # a leaf: one call into C
        out(_dumps(value))


def _holds_containers(values: Any) -> bool:
    return any(isinstance(value, _CONTAINERS) for value in values)
