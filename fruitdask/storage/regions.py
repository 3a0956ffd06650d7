"""Where data lives: the EU region guard that runs before anything is read or written.

Where a location lives is its store's answer (:meth:`~fruitdask.storage.base.Store.region`:
the bucket's region on S3); the allow-list is the same for every store.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import fsspec

from fruitdask.errors import RegionError
from fruitdask.storage import stores
from fruitdask.storage.options import storage_options
from fruitdask.storage.urls import is_remote

if TYPE_CHECKING:
    from fruitdask.config import StorageSettings

logger = logging.getLogger(__name__)


def guard_regions(urls: Sequence[str | None], settings: StorageSettings) -> None:
    """Refuse any remote location whose bucket is outside ``settings.allowed_regions``.

    Runs before any image is read or any byte written (the pipeline calls it first, for the
    input, the output and the weights). Local paths and weight names (``auto``,
    ``random``) need no check. Remote locations that no store serves are refused: their
    region cannot be known. Each location is checked once.

    Parameters
    ----------
    settings
        Endpoint, profile, timeouts and the allow-list (``--allowed-regions``).

    Raises
    ------
    RegionError
        A bucket is outside the allow-list, or a location's region cannot be checked.
    StorageError
        A bucket's region could not be read (on S3 see :func:`fruitdask.storage.s3.bucket_region`).
    """
    allowed = tuple(r.strip().lower() for r in settings.allowed_regions)
    options = storage_options(settings)
    checked: dict[tuple[str, str], str | None] = {}  # (store, bucket): its region, asked once
    for url in urls:
        if not url or not is_remote(url):
            continue
        store = stores.lookup(url)
        if store is None:
            raise RegionError(
                f"cannot check the region of {url!r}: fruitdask only reads and writes s3:// buckets it can "
                "locate (data stays in the EU); copy it to an S3 bucket in an allowed region, or to a local path"
            )
        bucket = fsspec.core.split_protocol(url)[1].lstrip("/").partition("/")[0]
        if (store.name, bucket) not in checked:
            checked[store.name, bucket] = store.region(url, options)
        region = checked[store.name, bucket]
        if region is None:
            continue
        if region not in allowed:
            raise RegionError(
                f"bucket {bucket!r} ({url}) is in {region}, outside the allowed regions "
                f"({', '.join(allowed) or 'none'}): fruitdask keeps data in the EU; use a bucket in an allowed "
                f"region, or pass --allowed-regions {','.join((*allowed, region))} if {region} is acceptable for this data"
            )
        logger.info("bucket %s is in %s: allowed", bucket, region)
