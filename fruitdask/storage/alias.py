"""A small JSON document moved by compare-and-swap: the model registry's ``champion.json``.

Of two writers that read the same version of the document, only one can replace it:

- an object store: its conditional writes (:class:`~fruitdask.storage.base.Store`'s
  ``put_if_match``, or ``put_if_absent`` when there was none; on S3 ``PutObject`` with
  ``If-Match: <ETag read>`` or ``If-None-Match: *``); the version is read *before* the body,
  so a write in between fails the condition.
- local: an exclusive ``fcntl.flock`` on a hidden ``.<name>.lock`` beside the document is
  held while the document is read again, compared with the version the caller read (its
  sha256) and, if unchanged, replaced by a complete temporary file with ``os.replace``
  (atomic). The kernel drops the lock when its holder dies, even by SIGKILL, so a killed
  promotion never blocks the next one (a claim *file* would stay behind).

The version a caller holds is an opaque string (:class:`Versioned`); ``None`` means "there
was no document".
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fruitdask.storage import stores
from fruitdask.storage.stores import translate
from fruitdask.storage.urls import get_fs, is_remote


@dataclass(frozen=True)
class Versioned:
    """A document as read, and its version (S3 ETag, or the sha256 of the local bytes)."""

    doc: dict[str, Any] | None
    version: str | None


def read(url: str, storage_options: Mapping[str, Any] | None) -> Versioned:
    """The document at ``url`` and its version (``Versioned(None, None)`` when absent)."""
    fs, path = get_fs(url, storage_options)
    try:
        store = stores.lookup(url)
        if is_remote(url) and store is not None:
            snap = store.read_object(fs, path)  # the version first: a write after it fails our condition
            return Versioned(None, None) if snap is None else Versioned(json.loads(snap.data), snap.version)
        with open(path, "rb") as f:
            data = f.read()
        return Versioned(json.loads(data), hashlib.sha256(data).hexdigest())
    except FileNotFoundError:
        return Versioned(None, None)
    except stores.storage_exceptions() as e:
        raise translate(e, url) from e


def replace(url: str, storage_options: Mapping[str, Any] | None, doc: dict[str, Any], expected: str | None) -> bool:
    """Write ``doc`` at ``url`` only if its version is still ``expected`` (``None``: only if
    there is no document); False when another writer got there first."""
    body = json.dumps(doc, indent=2, sort_keys=True).encode()
    fs, path = get_fs(url, storage_options)
    try:
        store = stores.lookup(url)
        if is_remote(url) and store is not None:
            put = store.put_if_absent(fs, path, body) if expected is None else store.put_if_match(fs, path, body, expected)
            return put is not None
        return _replace_local(path, body, expected)
    except stores.storage_exceptions() as e:
        raise translate(e, url) from e


def _replace_local(path: str, body: bytes, expected: str | None) -> bool:
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    with open(os.path.join(folder, f".{name}.lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released on close, or by the kernel when we die
        try:
            with open(path, "rb") as f:
                current: str | None = hashlib.sha256(f.read()).hexdigest()
        except FileNotFoundError:
            current = None
        if current != expected:
            return False
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True


def folders(url: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    """Names of the folders (prefixes) directly under ``url``, hidden ones left out, sorted."""
    fs, path = get_fs(url, storage_options)
    try:
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return []
        entries = fs.ls(path, detail=True)
    except stores.storage_exceptions() as e:
        raise translate(e, url) from e
    names = {posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"}
    return sorted(n for n in names if not n.startswith("."))
