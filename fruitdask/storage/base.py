"""The storage seam: what one store (S3, the local disk, ...) does for the rest of fruitdask.

A store owns one family of URL schemes (``s3://`` and ``s3a://``; plain paths and
``file://``). Everything that depends on which store holds a URL is a method of
:class:`Store`: the fsspec options, the table's (delta-rs) URI and options, where its data
lives (the region guard), the translation of its errors into messages that say what to do,
the conditional writes of the output lock, its listing pages, its command-line flags and the
environment its pods need. :mod:`fruitdask.storage.stores` maps a URL's scheme to its store;
no other module compares a scheme with ``"s3"``.

A new store is one module implementing :class:`Store` plus one line registering it in
:mod:`fruitdask.storage.stores` (and its tests).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fruitdask.errors import FruitdaskError, InputError, StorageError

if TYPE_CHECKING:
    import fsspec

    from fruitdask.config import StorageSettings

#: A listed file: ``(path, size, version tag, why it is refused)``: the tag is the S3 ETag or
#: the local mtime in ns.
Entry = tuple[str, int | None, str | None, str | None]


@dataclass(frozen=True)
class Snapshot:
    """An object as read for a conditional write: its bytes, its version (what a later
    conditional write names), when the storage last wrote it and the storage's clock when it
    was read (seconds since the epoch, both by the storage's clock)."""

    data: bytes
    version: str
    modified: float
    now: float


@dataclass(frozen=True)
class Written:
    """The result of a conditional write that succeeded: the object's new version and the
    storage's clock at the write."""

    version: str
    at: float


class Store(Protocol):
    """One storage: every store-specific step fruitdask takes, typed."""

    #: A short name for messages (``"S3"``, ``"local"``).
    name: str
    #: The URL schemes it serves; the first is the one it writes (``s3a`` is read as ``s3``).
    schemes: tuple[str, ...]

    def fsspec_options(self, settings: StorageSettings) -> dict[str, Any]:
        """fsspec ``storage_options`` for this store's URLs (never secrets)."""
        ...

    def delta_uri(self, url: str) -> str:
        """The URI delta-rs opens for the table at ``url``."""
        ...

    def delta_options(self, url: str, storage_options: Mapping[str, Any]) -> dict[str, str] | None:
        """delta-rs (object_store) options for ``url``, resolved now (credentials included)."""
        ...

    def region(self, url: str, storage_options: Mapping[str, Any]) -> str | None:
        """Where the data at ``url`` lives (a region name), ``None`` when it needs no check
        (the local disk); raise :class:`~fruitdask.errors.StorageError` when unknown."""
        ...

    def exceptions(self) -> tuple[type[BaseException], ...]:
        """The exception types its calls raise (``OSError`` and its client's own)."""
        ...

    def explain(self, e: BaseException, url: str, *, bucket_level: bool = False) -> FruitdaskError:
        """A fruitdask error whose message names ``url`` and the fix (raise it ``from e``)."""
        ...

    def read_object(self, fs: fsspec.AbstractFileSystem, path: str) -> Snapshot | None:
        """``path`` as :class:`Snapshot`, its version read *before* its bytes; ``None`` when absent."""
        ...

    def put_if_absent(self, fs: fsspec.AbstractFileSystem, path: str, body: bytes) -> Written | None:
        """Create ``path`` with ``body`` unless it exists; ``None`` when it does."""
        ...

    def put_if_match(self, fs: fsspec.AbstractFileSystem, path: str, body: bytes, version: str) -> Written | None:
        """Replace ``path`` with ``body`` only if it is still at ``version``; ``None`` otherwise."""
        ...

    def delete_if_match(self, fs: fsspec.AbstractFileSystem, path: str, version: str) -> bool:
        """Delete ``path`` only if it is still at ``version``; False otherwise."""
        ...

    def delete_many(self, fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[str]:
        """Delete ``paths``; those it did not delete, each with why (``"path (AccessDenied)"``)."""
        ...

    #: What to grant when :meth:`delete_many` is refused (for the commit's error message).
    delete_permission: str

    def list_pages(self, fs: fsspec.AbstractFileSystem, folder: str) -> Iterator[list[Entry]]:
        """Every file under ``folder``, a batch at a time, as :data:`Entry` rows."""
        ...

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        """Add its command-line flags (their ``dest`` are ``storage_*`` fields)."""
        ...

    def pod_env(self, region: str) -> dict[str, str]:
        """Environment every Kubernetes pod of a run in ``region`` needs to reach it."""
        ...


def find_pages(fs: fsspec.AbstractFileSystem, folder: str) -> Iterator[list[Entry]]:
    """The listing any fsspec store can do: one recursive ``find``, uncached."""
    found = fs.find(folder, withdirs=False, detail=True)
    fs.invalidate_cache(folder)  # keep no listing cache
    yield [(p, info.get("size"), info.get("ETag"), None) for p, info in found.items()]


def explain_os_error(e: BaseException, url: str) -> FruitdaskError:
    """The error of a plain ``OSError`` on ``url``, for stores without their own table."""
    if isinstance(e, FruitdaskError):
        return e
    if isinstance(e, FileNotFoundError):
        return InputError(f"{url!r} does not exist: check the path or bucket name")
    if isinstance(e, PermissionError):
        return StorageError(f"access denied to {url!r}: check the permissions of the location")
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return StorageError(f"storage error on {url!r}: {text}")
