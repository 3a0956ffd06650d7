"""Which file system a URL lives on: the leaf that the rest of :mod:`fruitdask.storage` builds on.

A URL is parsed once, for its protocol; the rest is a plain path on that file system. Never
through ``fsspec.core.url_to_fs``: it reads ``::`` anywhere in the string as a chain of
file systems, so an image named ``big::a.jpg`` would be read as ``big`` (docs/s3.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import fsspec

from fruitdask.errors import StorageError, UntrustedReferenceError
from fruitdask.storage import stores

#: Substrings of an S3 key that s3fs parses instead of reading (``k?versionId=v`` opens ``k``).
UNSAFE_KEY_PARTS = ("?versionId=",)


def is_remote(url: str) -> bool:
    """True for URLs of any store but the local file system (served or not)."""
    return stores.lookup(url) is not stores.LOCAL


def get_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``url``; options only apply to remote URLs.

    Only the protocol prefix is parsed (``s3://``, ``file://`` or none); ``::``, ``?`` and
    ``#`` are characters of the path like any other.
    """
    protocol = fsspec.core.split_protocol(url)[0]
    opts = dict(storage_options or {}) if is_remote(url) else {}
    try:
        cls = fsspec.get_filesystem_class(protocol or "file")
        return cls(**opts), cls._strip_protocol(url)
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open {url!r}: {e}") from e


def unsafe_name(url: str) -> str | None:
    """Why the object at ``url`` cannot be read as itself, or ``None`` when it can."""
    if not is_remote(url):
        return None
    for part in UNSAFE_KEY_PARTS:
        if part in url:
            return (f"its name contains {part!r}, which s3fs reads as another object: it cannot be read safely; "
                    "rename the object")
    return None


def check_protocols(urls: Sequence[str | None], what: str = "location", fix: str = "copy it to a local path or an s3:// bucket in an allowed region") -> None:
    """Refuse locations that no store serves (a store's region the guard can check): for
    locations read from stored data (weights references, thumbnail paths), which must never
    become a way to reach http(s) or any other fsspec protocol."""
    for url in urls:
        if url and stores.lookup(url) is None:
            raise UntrustedReferenceError(
                f"{what} {url!r} uses {fsspec.core.split_protocol(url)[0]}://, which fruitdask does not read: {fix}"
            )
