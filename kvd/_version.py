"""The installed kvd version, for ``kvd --version``, ``kvctl --version`` and ``kvd_info``.

A leaf module (standard library only), so the daemon, its metrics and the CLI all ask here
instead of importing each other: ``metrics`` used to import ``main``, which imports ``server``,
which imports ``metrics``.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version as _dist_version

__all__ = ["SOURCE_VERSION", "version"]

# pyproject.toml's version, for a source tree that was never installed.
SOURCE_VERSION = "0.1.0"


@functools.cache
def version(fallback: str = SOURCE_VERSION) -> str:
    """The installed package version, or ``fallback`` when kvd is not installed."""
    try:
        return _dist_version("kvd")
    except PackageNotFoundError:
        return fallback
