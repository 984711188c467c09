"""rosetta's version: the package's own, and the installed distribution's."""

from __future__ import annotations

from importlib import metadata

__version__ = "0.1.0"


def version() -> str:
    """The installed distribution's version, else the package's own."""
    try:
        return metadata.version("rosetta-nmt")
    except metadata.PackageNotFoundError:
        return __version__
