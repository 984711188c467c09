"""Handing freed memory back to the operating system.

glibc keeps the pages of freed small allocations in the process: after
SentencePiece's trainer (millions of small allocations) or a decoding step's
temporaries they would stay resident. ``release_memory`` asks for them back
(glibc's ``malloc_trim``); with another C library it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _glibc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _glibc_trim()


def release_memory() -> None:
    """Hands the allocator's free pages back to the system (a no-op without glibc)."""
    if _TRIM is not None:
        _TRIM(0)
