"""What a location is, from its URL alone (imported by :mod:`fruitdask.storage` and its
submodules, so that none of them imports the package back)."""

from __future__ import annotations

import fsspec


def is_remote(url: str) -> bool:
    """True for URLs with a protocol other than the local file system."""
    protocol = fsspec.core.split_protocol(url)[0]
    return protocol not in (None, "file", "local")
