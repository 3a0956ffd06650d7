"""The fsspec ``storage_options`` a :class:`~fruitdask.config.StorageSettings` stands for.

The configuration holds plain values (endpoint, region, profile, timeout); only this module
knows how s3fs wants them, so another storage (GCS, Azure) would add its options here and
touch nothing above the storage package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fruitdask.config import StorageSettings


def storage_options(settings: StorageSettings) -> dict[str, Any]:
    """fsspec ``storage_options`` for ``s3://`` URLs, identical on the client, workers and
    executors. Never holds secrets: credentials come from the AWS chain (env, profile, IRSA
    web identity) in each process."""
    opts: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = {}
    if settings.endpoint_url:
        client_kwargs["endpoint_url"] = settings.endpoint_url
    if settings.region:
        client_kwargs["region_name"] = settings.region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    if settings.profile:
        opts["profile"] = settings.profile
    opts["config_kwargs"] = {
        "connect_timeout": settings.connect_timeout,
        "read_timeout": max(settings.connect_timeout, 30.0),
        "retries": {"max_attempts": 3, "mode": "standard"},
    }
    return opts
