"""The local file system as a store: plain paths and ``file://``.

Its conditional writes, for the output lock: ``O_EXCL`` creates; to replace or delete, a
claim file named after the exact content read is created with ``O_EXCL``, the object is read
again under that claim and, if unchanged, replaced with ``os.replace`` (atomic) or unlinked.
A second writer cannot hold the same claim, and once the first is done the content has
changed. Its clock is the file system's: the mtime of a probe file created beside the object
(on a network file system the server sets it, not this machine).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import posixpath
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from fruitdask.errors import FruitdaskError
from fruitdask.storage.base import Entry, Snapshot, Written, explain_os_error, find_pages

if TYPE_CHECKING:
    import fsspec

    from fruitdask.config import StorageSettings


class LocalStore:
    """Plain paths and ``file://`` URLs (see the module's docstring)."""

    name = "local"
    schemes: tuple[str, ...] = ("file", "local")

    def fsspec_options(self, settings: StorageSettings) -> dict[str, Any]:
        return {}

    def delta_uri(self, url: str) -> str:
        if url.startswith("file://"):
            url = url[len("file://"):]
        return os.path.abspath(url)

    def delta_options(self, url: str, storage_options: Mapping[str, Any]) -> dict[str, str] | None:
        return None

    def region(self, url: str, storage_options: Mapping[str, Any]) -> str | None:
        return None  # the machine's own disk: nothing leaves it

    def exceptions(self) -> tuple[type[BaseException], ...]:
        return (OSError,)

    def explain(self, e: BaseException, url: str, *, bucket_level: bool = False) -> FruitdaskError:
        return explain_os_error(e, url)

    def read_object(self, fs: fsspec.AbstractFileSystem, path: str) -> Snapshot | None:
        return _read(path)

    def put_if_absent(self, fs: fsspec.AbstractFileSystem, path: str, body: bytes) -> Written | None:
        os.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            written = os.fstat(f.fileno()).st_mtime
        return Written(body.decode(), written)

    def put_if_match(self, fs: fsspec.AbstractFileSystem, path: str, body: bytes, version: str) -> Written | None:
        written: list[float] = []

        def write() -> None:
            tmp = f"{path}.new-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                written.append(os.fstat(f.fileno()).st_mtime)
            os.replace(tmp, path)

        return Written(body.decode(), written[0]) if self._under_claim(path, version, write) else None

    def delete_if_match(self, fs: fsspec.AbstractFileSystem, path: str, version: str) -> bool:
        return self._under_claim(path, version, lambda: os.unlink(path))

    def _under_claim(self, path: str, version: str, action: Callable[[], None]) -> bool:
        """Run ``action()`` only if ``path`` is still exactly ``version``, holding the
        ``O_EXCL`` claim on that content meanwhile; False when the claim or the check fails."""
        claim = f"{path}.claim-{hashlib.sha256(version.encode()).hexdigest()[:16]}"
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        try:
            current = _read(path)
            if current is None or current.version != version:
                return False
            action()
            return True
        finally:
            os.unlink(claim)

    delete_permission = "write permission on the output folder"

    def delete_many(self, fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[str]:
        failed = []
        for p in paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                continue
            except OSError as e:
                failed.append(f"{p} ({type(e).__name__})")
        return failed

    def list_pages(self, fs: fsspec.AbstractFileSystem, folder: str) -> Iterator[list[Entry]]:
        return find_pages(fs, folder)

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        return None  # a path needs no flag

    def pod_env(self, region: str) -> dict[str, str]:
        return {}


def _read(path: str) -> Snapshot | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
            modified = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    return Snapshot(data, data.decode("utf-8", "replace"), modified, _local_now(path))


def _local_now(path: str) -> float:
    """The clock of the file system that holds ``path``: the mtime of a probe file created
    (and removed) beside it."""
    probe = f"{path}.clock-{uuid.uuid4().hex[:8]}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(probe)
