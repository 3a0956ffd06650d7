"""The registry of stores: which :class:`~fruitdask.storage.base.Store` serves a URL.

A URL's scheme (``s3``, ``file``; none for a plain path) picks its store. The local file
system and S3 are registered here; a new store registers itself with :func:`register` (one
line below for a store that ships with fruitdask, or from a test). Every other module asks
this one, never compares a scheme with a string.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import fsspec

from fruitdask.errors import FruitdaskError
from fruitdask.storage.base import Store, explain_os_error
from fruitdask.storage.local import LocalStore
from fruitdask.storage.s3 import S3Store

_STORES: dict[str, Store] = {}


def register(store: Store) -> Store:
    """Make ``store`` serve the URLs of its schemes (replacing any store that served them)."""
    for scheme in store.schemes:
        _STORES[scheme] = store
    return store


def unregister(store: Store) -> None:
    """Forget ``store`` (tests that registered one for a while)."""
    for scheme in [s for s, st in _STORES.items() if st is store]:
        del _STORES[scheme]


LOCAL: Store = register(LocalStore())
S3: Store = register(S3Store())


def scheme(url: str) -> str:
    """The scheme of ``url``: ``file`` for a plain path."""
    return fsspec.core.split_protocol(url)[0] or "file"


def lookup(url: str) -> Store | None:
    """The store of ``url``, or ``None`` when no store serves its scheme (``https``...)."""
    return _STORES.get(scheme(url))


def for_fs(fs: fsspec.AbstractFileSystem) -> Store | None:
    """The store of an fsspec file system (by its protocols)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return next((_STORES[p] for p in protocols if p in _STORES), None)


def remote_stores() -> list[Store]:
    """The stores other than the local disk, each once, in registration order."""
    return [s for s in dict.fromkeys(_STORES.values()) if s is not LOCAL]


def storage_exceptions() -> tuple[type[BaseException], ...]:
    """Exception types a storage call may raise: ``OSError`` and every store client's own."""
    seen: dict[type[BaseException], None] = {OSError: None}
    for store in dict.fromkeys(_STORES.values()):
        seen.update(dict.fromkeys(store.exceptions()))
    return tuple(seen)


def translate(e: BaseException, url: str) -> FruitdaskError:
    """A fruitdask error for storage failure ``e`` on ``url``, worded by its store (what the
    storage modules raise ``from e``)."""
    store = lookup(url)
    if store is None:
        return explain_os_error(e, url)
    return store.explain(e, url)


def delta_uri(url: str) -> str:
    """The URI delta-rs opens for the table at ``url``."""
    store = lookup(url)
    return url if store is None else store.delta_uri(url)


def delta_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, str] | None:
    """delta-rs's options for ``url``, resolved now (credentials included)."""
    store = lookup(url)
    return None if store is None else store.delta_options(url, dict(storage_options or {}))


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """Every store's command-line flags."""
    for store in dict.fromkeys(_STORES.values()):
        store.add_arguments(group)


def pod_env(region: str) -> dict[str, str]:
    """The environment every store needs in a Kubernetes pod of ``region``."""
    out: dict[str, str] = {}
    for store in dict.fromkeys(_STORES.values()):
        out.update(store.pod_env(region))
    return out
