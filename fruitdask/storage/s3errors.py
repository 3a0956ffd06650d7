"""Storage failures mapped to fruitdask errors that say what to do (after ``s3fs/errors.py``).

s3fs turns S3 error codes into ``OSError`` subclasses and keeps the botocore ``ClientError``
as ``__cause__``; credential, profile and network failures arrive as botocore exceptions
that are not ``OSError`` at all. :func:`explain` looks at both and returns one
:class:`~fruitdask.errors.FruitdaskError` whose message names the location and the fix.
"""

from __future__ import annotations

from typing import Any

from fruitdask.errors import FruitdaskError, InputError, StorageError

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
