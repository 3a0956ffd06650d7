"""Which file system a URL lives on: the leaf that the rest of :mod:`fruitdask.storage` builds on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import fsspec

from fruitdask.errors import StorageError


def is_remote(url: str) -> bool:
    """True for URLs with a protocol other than the local file system."""
    protocol = fsspec.core.split_protocol(url)[0]
    return protocol not in (None, "file", "local")


def get_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``url``; options only apply to remote URLs."""
    opts = dict(storage_options or {}) if is_remote(url) else {}
    try:
        return fsspec.core.url_to_fs(url, **opts)
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open {url!r}: {e}") from e
