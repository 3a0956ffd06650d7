"""S3 as a store: everything fruitdask does that is specific to ``s3://`` (and ``s3a://``).

- its fsspec (s3fs) options, and delta-rs's: the endpoint, and credentials resolved by
  botocore's chain (environment, ``--aws-profile``, IRSA web identity);
- where a bucket lives (:func:`bucket_region`), for the EU region guard;
- its failures mapped to fruitdask errors that say what to do (after ``s3fs/errors.py``);
- the conditional ``PutObject`` (``If-None-Match: *``, ``If-Match: <ETag>``) of the output lock;
- its listing pages (``ListObjectsV2``), its flags (``--s3-endpoint``, ``--aws-*``) and the
  environment of its pods (``AWS_REGION``).

s3fs and botocore are imported only inside the functions that call them.

s3fs turns S3 error codes into ``OSError`` subclasses and keeps the botocore ``ClientError``
as ``__cause__``; credential, profile and network failures arrive as botocore exceptions
that are not ``OSError`` at all. :func:`explain` looks at both and returns one
:class:`~fruitdask.errors.FruitdaskError` whose message names the location and the fix.
"""

from __future__ import annotations

import argparse
import email.utils
import logging
import posixpath
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import fsspec

from fruitdask.errors import FruitdaskError, InputError, StorageError
from fruitdask.storage.base import Entry, Snapshot, Written

if TYPE_CHECKING:
    from fruitdask.config import StorageSettings

logger = logging.getLogger(__name__)

#: S3 error codes (and bare HTTP statuses, which HEAD requests carry instead of a code)
#: grouped by what the user has to do about them.
ERROR_CODES: dict[str, str] = {
    "NoSuchBucket": "no_bucket",
    "NoSuchKey": "not_found",
    "404": "not_found",
    "AccessDenied": "denied",
    "AllAccessDisabled": "denied",
    "AccountProblem": "denied",
    "403": "denied",
    "InvalidAccessKeyId": "bad_credentials",
    "SignatureDoesNotMatch": "bad_credentials",
    "InvalidToken": "bad_credentials",
    "ExpiredToken": "expired",
    "TokenRefreshRequired": "expired",
    "InvalidBucketName": "bad_name",
    "PermanentRedirect": "redirect",
    "301": "redirect",
}

#: botocore exception class names (matched along the MRO, so botocore stays a lazy import).
EXCEPTION_NAMES: dict[str, str] = {
    "NoCredentialsError": "no_credentials",
    "PartialCredentialsError": "no_credentials",
    "CredentialRetrievalError": "no_credentials",
    "ProfileNotFound": "no_profile",
    "EndpointConnectionError": "unreachable",
    "ConnectTimeoutError": "unreachable",
    "ReadTimeoutError": "unreachable",
    "ConnectionClosedError": "unreachable",
    "ProxyConnectionError": "unreachable",
    "HTTPClientError": "unreachable",
    "ParamValidationError": "bad_name",
}

CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, pass --aws-profile NAME, "
    "or run on EKS with an IRSA service account (see docs/s3.md)"
)


def storage_exceptions() -> tuple[type[BaseException], ...]:
    """Exception types a storage call may raise: ``OSError`` and botocore's."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # fsspec without s3fs: local files only
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


def client_error(e: BaseException) -> Any | None:
    """The botocore ``ClientError`` behind ``e`` (``e`` itself, or the cause s3fs kept): any
    exception with a ``response`` dict holding ``Error``."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 5:
        response = getattr(cur, "response", None)
        if isinstance(response, dict) and "Error" in response:
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def response_header(e: BaseException, name: str) -> str | None:
    """A header of the S3 error response behind ``e`` (e.g. ``x-amz-bucket-region``)."""
    err = client_error(e)
    if err is None:
        return None
    return err.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(name)


def classify(e: BaseException) -> str:
    """What kind of failure ``e`` is: a key of the tables above, or ``other``."""
    for cls in type(e).__mro__:
        if cls.__name__ in EXCEPTION_NAMES:
            return EXCEPTION_NAMES[cls.__name__]
    err = client_error(e)
    if err is not None:
        code = str(err.response["Error"].get("Code", ""))
        if code in ERROR_CODES:
            return ERROR_CODES[code]
    if isinstance(e, FileNotFoundError):
        return "not_found"
    if isinstance(e, PermissionError):
        return "denied"
    if isinstance(e, TimeoutError):
        return "unreachable"
    return "other"


#: What to tell the user, per kind of failure: the error class and its message. Fields:
#: ``url``, ``bucket``, ``short`` (the cause's first line), ``endpoint``, ``error_type``, ``hint``.
MESSAGES: dict[str, tuple[type[FruitdaskError], str]] = {
    "no_bucket": (StorageError, "bucket {bucket!r} does not exist ({url}): check the bucket name, and --s3-endpoint if you use one"),
    "not_found": (InputError, "{url!r} does not exist: check the path or bucket name"),
    "denied": (StorageError, "access denied to {url!r}: the AWS credentials in use (environment, --aws-profile or IRSA role) "
                             "lack permission, or a bucket policy forbids it: check the IAM policy and --aws-profile"),
    "bad_credentials": (StorageError, "the AWS credentials were rejected on {url!r} ({short}): {hint}"),
    "expired": (StorageError, "the AWS credentials have expired ({url!r}): refresh them (aws sso login, a new session token) "
                              "and run again"),
    "no_credentials": (StorageError, "no AWS credentials found to access {url!r}: {hint}"),
    "no_profile": (StorageError, "{short} (needed for {url!r}): check --aws-profile and ~/.aws/config or AWS_CONFIG_FILE"),
    "unreachable": (StorageError, "cannot reach {endpoint} for {url!r} ({error_type}): check --s3-endpoint, the network "
                                  "and proxies (FRUITDASK_STORAGE_CONNECT_TIMEOUT sets the timeout)"),
    "bad_name": (StorageError, "{url!r} is not a valid S3 location ({short}): use s3://bucket/prefix"),
    "redirect": (StorageError, "{url!r} answered with a redirect: the bucket lives on another endpoint or region; "
                               "pass --aws-region with the bucket's region, or fix --s3-endpoint"),
    "other": (StorageError, "storage error on {url!r}: {short}"),
}


def explain(e: BaseException, url: str, *, bucket_level: bool = False) -> FruitdaskError:
    """A fruitdask error for storage failure ``e`` on ``url`` (:data:`MESSAGES`); raise it ``from e``.

    Parameters
    ----------
    bucket_level
        The failed call addressed the bucket itself (``HeadBucket``), so "not found" means
        the bucket does not exist rather than the key.
    """
    if isinstance(e, FruitdaskError):
        return e
    kind = classify(e)
    if kind == "not_found" and bucket_level:
        kind = "no_bucket"
    error_class, message = MESSAGES[kind]
    call = getattr(e, "kwargs", None)  # botocore keeps the failed call's endpoint there
    return error_class(message.format(
        url=url, bucket=url[len("s3://"):].split("/", 1)[0] if url.startswith("s3://") else None, short=_short(e),
        endpoint=(call.get("endpoint_url") if isinstance(call, dict) else None) or "the S3 endpoint",
        error_type=type(e).__name__, hint=CREDENTIALS_HINT,
    ))


def translate(e: BaseException, url: str) -> FruitdaskError:
    """:func:`explain` for a call on an object or prefix (what the storage modules raise ``from e``)."""
    return explain(e, url)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


# --- options: s3fs's and delta-rs's --------------------------------------------------------


def fsspec_options(settings: StorageSettings) -> dict[str, Any]:
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


def delta_options(url: str, storage_options: Mapping[str, Any]) -> dict[str, str]:
    """deltalake's (object_store) options for ``url`` from fruitdask's fsspec options.

    The credentials are resolved here by botocore's chain, the one s3fs uses in every
    process (environment keys, ``--aws-profile``, IRSA web identity), and handed to delta-rs
    in memory only: object_store does not read AWS profiles itself. They are a frozen copy
    (IRSA and STS session credentials last about an hour), so the table re-opens with options
    resolved right then at every commit. The region is the bucket's own (looked up once, as
    the region guard does), unless ``--aws-region`` says.
    """
    opts = dict(storage_options or {})
    client = dict(opts.get("client_kwargs") or {})
    out: dict[str, str] = {}
    if client.get("endpoint_url"):
        out["AWS_ENDPOINT_URL"] = str(client["endpoint_url"])
        if str(client["endpoint_url"]).startswith("http://"):
            out["AWS_ALLOW_HTTP"] = "true"
    out.update(_credentials(opts.get("profile")))
    region = client.get("region_name") or _cached_region(url, opts)
    if region:
        out["AWS_REGION"] = str(region)
    return out


def _credentials(profile: str | None) -> dict[str, str]:
    import botocore.session

    creds = botocore.session.Session(profile=profile).get_credentials()
    if creds is None:
        return {}
    frozen = creds.get_frozen_credentials()
    out = {"AWS_ACCESS_KEY_ID": frozen.access_key, "AWS_SECRET_ACCESS_KEY": frozen.secret_key}
    if frozen.token:
        out["AWS_SESSION_TOKEN"] = frozen.token
    return out


_REGIONS: dict[str, str] = {}


def _cached_region(url: str, storage_options: Mapping[str, Any]) -> str | None:
    bucket = split_bucket(url)[0]
    if bucket not in _REGIONS:
        _REGIONS[bucket] = bucket_region(bucket, storage_options)
    return _REGIONS[bucket]


# --- where buckets live ------------------------------------------------------------------

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
        except storage_exceptions() as e:
            region = response_header(e, "x-amz-bucket-region")
            if region:
                return normalize_region(region)
            if classify(e) != "denied":
                raise
            # A bare 403 (a HEAD answer has no body to say why): GetBucketLocation may be
            # allowed, and if not, its error names the cause (AccessDenied, InvalidAccessKeyId).
            head = {}
        region = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region") or head.get("BucketRegion")
        if not region:
            region = fs.call_s3("get_bucket_location", Bucket=bucket).get("LocationConstraint")
    except storage_exceptions() as e:
        raise explain(e, url, bucket_level=True) from e
    return normalize_region(region)


def split_bucket(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of an ``s3://bucket/key`` URL."""
    rest = fsspec.core.split_protocol(url)[1].lstrip("/")
    bucket, _, key = rest.partition("/")
    return bucket, key


# --- conditional writes (the output lock) -------------------------------------------------

#: S3 answers to a conditional write whose condition failed (or whose object is gone).
CONFLICT_CODES = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404")


def error_code(e: BaseException) -> str:
    """The S3 error code behind ``e`` (``""`` when there is none)."""
    err = client_error(e)
    return str(err.response.get("Error", {}).get("Code", "")) if err is not None else ""


def _date(response: dict[str, Any], fallback: float) -> float:
    """The storage's clock: the ``Date`` header of an S3 answer; ``fallback`` (this machine's
    clock) from a store that sends none (AWS S3, MinIO and moto do)."""
    raw = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return email.utils.parsedate_to_datetime(raw).timestamp() if raw else fallback
    except (TypeError, ValueError):
        return fallback


def read_object(fs, path: str) -> Snapshot | None:
    bucket, _, key = path.partition("/")
    try:
        fs.invalidate_cache(path)
        # The ETag first: a write after it fails our If-Match. The same answer carries the
        # object's Last-Modified and the storage's Date: its clock, not ours.
        head = fs.call_s3("head_object", Bucket=bucket, Key=key)
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    return Snapshot(data, str(head.get("ETag", "")), head["LastModified"].timestamp(), _date(head, time.time()))


def put(fs, path: str, body: bytes, **condition: str) -> Written | None:
    """Conditional ``PutObject``; the new ETag and the storage's time of the write (its
    ``Date``), or ``None`` when the condition failed."""
    bucket, _, key = path.partition("/")
    try:
        out = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)
    except storage_exceptions() as e:
        if error_code(e) in CONFLICT_CODES or isinstance(e, FileNotFoundError):
            return None
        raise
    fs.invalidate_cache(path)
    fs.invalidate_cache(posixpath.dirname(path))
    return Written(str(out.get("ETag", "")), _date(out, time.time()))


def delete_if_match(fs, path: str, version: str) -> bool:
    bucket, _, key = path.partition("/")
    try:
        fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
    except storage_exceptions() as e:
        if error_code(e) in CONFLICT_CODES:
            return False
        raise
    fs.invalidate_cache(path)
    fs.invalidate_cache(posixpath.dirname(path))
    return True


def delete_many(fs, paths: list[str]) -> list[str]:
    """Delete ``paths`` (``bucket/key``) with S3's bulk delete; the keys it did not delete.

    ``DeleteObjects`` answers 200 and lists per-key failures (``AccessDenied`` from a bucket
    policy, an object lock) in ``Errors``; s3fs's ``rm`` drops that list, which let a commit
    write ``_SUCCESS`` over a mix of old and new parts (issue 23, item 8).
    """
    by_bucket: dict[str, list[str]] = {}
    for p in paths:
        bucket, _, key = p.partition("/")
        by_bucket.setdefault(bucket, []).append(key)
    failed: list[str] = []
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
            out = fs.call_s3("delete_objects", Bucket=bucket, Delete=batch)
            failed += [f"{bucket}/{e.get('Key')} ({e.get('Code')})" for e in out.get("Errors") or []]
    return failed


# --- listing ---------------------------------------------------------------------------------

#: Keys per ListObjectsV2 page (S3's maximum).
PAGE = 1000


def list_pages(fs, folder: str) -> Iterator[list[Entry]]:
    """ListObjectsV2 under ``folder/``, one request per page, as each page arrives (through
    s3fs's ``_call_s3``, so its retries and credentials apply; nothing is cached)."""
    from fsspec.asyn import sync

    bucket, _, prefix = folder.partition("/")
    kwargs = {"Bucket": bucket, "Prefix": prefix.rstrip("/") + "/" if prefix else "", "MaxKeys": PAGE, **fs.req_kw}
    while True:
        out = sync(fs.loop, fs._call_s3, "list_objects_v2", **kwargs)
        yield [(f"{bucket}/{c['Key']}", c.get("Size"), c.get("ETag"), None)
               for c in out.get("Contents", []) if not c["Key"].endswith("/")]
        if not out.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = out["NextContinuationToken"]


# --- the store ---------------------------------------------------------------------------------


class S3Store:
    """``s3://`` and ``s3a://`` (the same objects), through s3fs and botocore."""

    name = "S3"
    schemes: tuple[str, ...] = ("s3", "s3a")

    def fsspec_options(self, settings: StorageSettings) -> dict[str, Any]:
        return fsspec_options(settings)

    def delta_uri(self, url: str) -> str:
        return "s3://" + url.split("://", 1)[1]  # delta-rs wants s3://, not s3a://

    def delta_options(self, url: str, storage_options: Mapping[str, Any]) -> dict[str, str] | None:
        return delta_options(url, storage_options)

    def region(self, url: str, storage_options: Mapping[str, Any]) -> str | None:
        bucket, _ = split_bucket(url)
        if not bucket:
            raise StorageError(f"{url!r} names no bucket: use s3://bucket/prefix")
        return bucket_region(bucket, storage_options)

    def exceptions(self) -> tuple[type[BaseException], ...]:
        return storage_exceptions()

    def explain(self, e: BaseException, url: str, *, bucket_level: bool = False) -> FruitdaskError:
        return explain(e, url, bucket_level=bucket_level)

    def read_object(self, fs: fsspec.AbstractFileSystem, path: str) -> Snapshot | None:
        return read_object(fs, path)

    def put_if_absent(self, fs: fsspec.AbstractFileSystem, path: str, body: bytes) -> Written | None:
        return put(fs, path, body, IfNoneMatch="*")

    def put_if_match(self, fs: fsspec.AbstractFileSystem, path: str, body: bytes, version: str) -> Written | None:
        return put(fs, path, body, IfMatch=version)

    def delete_if_match(self, fs: fsspec.AbstractFileSystem, path: str, version: str) -> bool:
        return delete_if_match(fs, path, version)

    delete_permission = "s3:DeleteObject on the output prefix (check bucket policies and object locks)"

    def delete_many(self, fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[str]:
        return delete_many(fs, paths)

    def list_pages(self, fs: fsspec.AbstractFileSystem, folder: str) -> Iterator[list[Entry]]:
        return list_pages(fs, folder)

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--s3-endpoint", dest="storage_endpoint_url", help="S3 endpoint URL (default: AWS, or $AWS_ENDPOINT_URL)")
        group.add_argument("--aws-profile", dest="storage_profile", help="AWS profile name (default: the usual AWS credential chain)")
        group.add_argument("--aws-region", dest="storage_region", help="AWS region for the S3 client (default: from the AWS config)")

    def pod_env(self, region: str) -> dict[str, str]:
        return {"AWS_REGION": region, "AWS_DEFAULT_REGION": region}
