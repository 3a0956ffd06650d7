"""The fsspec ``storage_options`` a :class:`~fruitdask.config.StorageSettings` stands for.

The configuration holds plain values (endpoint, region, profile, timeout); each store knows
how its fsspec file system wants them (:meth:`~fruitdask.storage.base.Store.fsspec_options`:
s3fs's in :mod:`fruitdask.storage.s3`). This module merges them into the one options value
that travels to every process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fruitdask.storage import stores

if TYPE_CHECKING:
    from fruitdask.config import StorageSettings


def storage_options(settings: StorageSettings) -> dict[str, Any]:
    """fsspec ``storage_options`` for remote URLs, identical on the client, workers and
    executors: every remote store's options (today S3's alone). Never holds secrets:
    credentials come from each store's own chain (AWS: env, profile, IRSA web identity) in
    each process."""
    out: dict[str, Any] = {}
    for store in stores.remote_stores():
        out.update(store.fsspec_options(settings))
    return out
