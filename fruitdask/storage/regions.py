"""Where buckets live: the EU region guard that runs before anything is read or written."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import fsspec

import fruitdask.storage.s3errors as s3errors
from fruitdask.errors import RegionError, StorageError
from fruitdask.storage.options import storage_options
from fruitdask.storage.urls import is_remote

if TYPE_CHECKING:
    from fruitdask.config import StorageSettings

logger = logging.getLogger(__name__)

#: Protocols whose bucket region :func:`guard_regions` can check.
S3_PROTOCOLS = ("s3", "s3a")
#: Attempts of the region probe: it runs first, so an unreachable endpoint fails it fast.
PROBE_ATTEMPTS = 2


def normalize_region(answer: str | None) -> str:
    """An AWS region name from a bucket-location answer.

    ``GetBucketLocation`` answers nothing for us-east-1 and ``EU`` for buckets created in
    eu-west-1 under the old name (some S3 implementations echo ``EU`` in ``HeadBucket`` too).
    """
    region = (answer or "").strip().lower()
    return {"": "us-east-1", "eu": "eu-west-1"}.get(region, region)


def _probe_fs(storage_options: Mapping[str, Any] | None):
    """A fresh S3 client for the region probe, with the run's options but a short fuse.

    The read timeout equals the connect timeout (a ``HEAD`` answers at once) and retries are
    few: s3fs' own retry loop on top of botocore's would turn an unreachable endpoint into
    minutes of silence before the first line of output.
    """
    import s3fs

    opts = dict(storage_options or {})
    config = dict(opts.get("config_kwargs") or {})
    timeout = float(config.get("connect_timeout", 10.0))
    config.update(read_timeout=timeout, retries={"max_attempts": PROBE_ATTEMPTS, "mode": "standard"})
    opts["config_kwargs"] = config
    # Cached by s3fs like any instance (its options differ from the run's, so it is the
    # probe's own): the guard of three locations builds one client, not three.
    fs = s3fs.S3FileSystem(**opts)
    fs.retries = 1
    return fs


def bucket_region(bucket: str, storage_options: Mapping[str, Any] | None) -> str:
    """The AWS region of ``bucket``.

    From ``HeadBucket``'s ``x-amz-bucket-region`` header, which S3 also sends with a 301 or
    403 answer; else from ``GetBucketLocation``. Both answers are normalized
    (:func:`normalize_region`).

    Raises
    ------
    StorageError
        The bucket does not exist, access is denied, there are no credentials, or the
        endpoint cannot be reached (fast: see :func:`_probe_fs`).
    """
    url = f"s3://{bucket}"
    try:
        fs = _probe_fs(storage_options)
        try:
            head = fs.call_s3("head_bucket", Bucket=bucket)
        except s3errors.storage_exceptions() as e:
            region = s3errors.response_header(e, "x-amz-bucket-region")
            if region:
                return normalize_region(region)
            if s3errors.classify(e) != "denied":
                raise
            # A bare 403 (a HEAD answer has no body to say why): GetBucketLocation may be
            # allowed, and if not, its error names the cause (AccessDenied, InvalidAccessKeyId).
            head = {}
        region = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region") or head.get("BucketRegion")
        if not region:
            region = fs.call_s3("get_bucket_location", Bucket=bucket).get("LocationConstraint")
    except s3errors.storage_exceptions() as e:
        raise s3errors.explain(e, url, bucket_level=True) from e
    return normalize_region(region)


def split_bucket(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of an ``s3://bucket/key`` URL."""
    rest = fsspec.core.split_protocol(url)[1].lstrip("/")
    bucket, _, key = rest.partition("/")
    return bucket, key


def guard_regions(urls: Sequence[str | None], settings: StorageSettings) -> None:
    """Refuse any remote location whose bucket is outside ``settings.allowed_regions``.

    Runs before any image is read or any byte written (the pipeline calls it first, for the
    input, the output and the weights). Local paths and weight names (``auto``,
    ``random``) need no check. Remote locations other than ``s3://`` are refused: their
    region cannot be known.

    Parameters
    ----------
    settings
        Endpoint, profile, timeouts and the allow-list (``--allowed-regions``).

    Raises
    ------
    RegionError
        A bucket is outside the allow-list, or a location's region cannot be checked.
    StorageError
        A bucket's region could not be read (see :func:`bucket_region`).
    """
    allowed = tuple(r.strip().lower() for r in settings.allowed_regions)
    options = storage_options(settings)
    checked: dict[str, str] = {}
    for url in urls:
        if not url or not is_remote(url):
            continue
        protocol = fsspec.core.split_protocol(url)[0]
        if protocol not in S3_PROTOCOLS:
            raise RegionError(
                f"cannot check the region of {url!r}: fruitdask only reads and writes s3:// buckets it can "
                "locate (data stays in the EU); copy it to an S3 bucket in an allowed region, or to a local path"
            )
        bucket, _ = split_bucket(url)
        if not bucket:
            raise StorageError(f"{url!r} names no bucket: use s3://bucket/prefix")
        if bucket not in checked:
            checked[bucket] = bucket_region(bucket, options)
        region = checked[bucket]
        if region not in allowed:
            raise RegionError(
                f"bucket {bucket!r} ({url}) is in {region}, outside the allowed regions "
                f"({', '.join(allowed) or 'none'}): fruitdask keeps data in the EU; use a bucket in an allowed "
                f"region, or pass --allowed-regions {','.join((*allowed, region))} if {region} is acceptable for this data"
            )
        logger.info("bucket %s is in %s: allowed", bucket, region)
