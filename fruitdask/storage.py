"""The one place that talks to storage (fsspec: local paths and ``s3://``).

Everything takes ``storage_options`` explicitly so that worker processes and Spark executors
reach the same endpoint as the driver. Image bytes are only read where the work runs
(:func:`read_bytes` is called inside tasks), never while listing.
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
import pandas as pd

from .errors import InputError, OutputError, StorageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SUCCESS_MARKER = "_SUCCESS"


def is_remote(url: str) -> bool:
    """True for URLs with a protocol other than the local file system."""
    protocol = fsspec.core.split_protocol(url)[0]
    return protocol not in (None, "file", "local")


def get_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``url``; options only apply to remote URLs."""
    opts = dict(storage_options or {}) if is_remote(url) else {}
    try:
        return fsspec.core.url_to_fs(url, **opts)
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open {url!r}: {e}") from e


def list_images(url: str, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """List images under ``url``, recursively, with their label.

    The label is the name of the folder that holds the image (``Cherry 1/r_0_100.jpg`` has
    label ``Cherry 1``). Extensions ``.jpg``, ``.jpeg`` and ``.png`` match in any letter case.

    Returns
    -------
    pandas.DataFrame
        Columns ``path`` (full path or URL, sorted) and ``label``.
    """
    fs, root = get_fs(url, storage_options)
    try:
        if not fs.exists(root):
            raise InputError(f"input {url!r} does not exist: check the path, or pass --input DIR_OR_URI")
        if not fs.isdir(root):
            raise InputError(f"input {url!r} is a file, not a folder: pass the folder that holds <Label>/<image>.jpg")
        found = fs.find(root, withdirs=False)
    except (PermissionError, OSError) as e:
        raise translate(e, url) from e
    remote = is_remote(url)
    rows = []
    for path in sorted(found):
        name = posixpath.basename(path)
        if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        label = posixpath.basename(posixpath.dirname(path))
        # Full URLs for remote files so any process can open them without the root.
        rows.append((fs.unstrip_protocol(path) if remote else path, label))
    if not rows:
        raise InputError(
            f"no images found under {url!r}: expected <Label>/<image>.jpg|.jpeg|.png files (any letter case)"
        )
    return pd.DataFrame(rows, columns=["path", "label"])


def read_bytes(path: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """Read one whole file. Called inside tasks, on the worker that featurizes it."""
    fs, p = get_fs(path, storage_options)
    with fs.open(p, "rb") as f:
        return f.read()


def translate(e: BaseException, url: str) -> StorageError | InputError:
    """Map a storage exception to a fruitdask error that says what to do."""
    if isinstance(e, FileNotFoundError):
        return InputError(f"{url!r} does not exist: check the path or bucket name")
    if isinstance(e, PermissionError):
        return StorageError(f"access denied to {url!r}: check the credentials (AWS profile, IRSA role) and bucket policy")
    return StorageError(f"storage error on {url!r}: {e}")


def join(url: str, *parts: str) -> str:
    """Join URL parts with ``/`` whatever the protocol."""
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


@dataclass
class OutputTarget:
    """A run's output location, written through a temporary prefix and committed last.

    Everything is written under :attr:`staging` (a sibling of the target). :meth:`commit`
    moves it to the target and writes ``_SUCCESS`` last, so a reader that waits for the
    marker never sees a half-written dataset. :meth:`abort` removes the staging prefix.
    """

    url: str
    storage_options: Mapping[str, Any]
    run_id: str

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any] | None, overwrite: bool, run_id: str | None = None) -> OutputTarget:
        """Check the target and prepare a staging prefix beside it."""
        target = cls(url.rstrip("/"), dict(storage_options or {}), run_id or uuid.uuid4().hex[:12])
        fs, path = target.fs_path
        try:
            exists = fs.exists(path) and (not fs.isdir(path) or bool(fs.ls(path)))
        except (PermissionError, OSError) as e:
            raise translate(e, url) from e
        if exists and not overwrite:
            raise OutputError(f"output {url!r} already exists: pass --overwrite to replace it, or choose another --output")
        return target

    @property
    def fs_path(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return get_fs(self.url, self.storage_options)

    @property
    def staging(self) -> str:
        parent, name = self.url.rsplit("/", 1) if "/" in self.url else (".", self.url)
        return f"{parent}/.{name}.fruitdask-tmp-{self.run_id}"

    def staging_path(self, *parts: str) -> str:
        return join(self.staging, *parts)

    def final_path(self, *parts: str) -> str:
        return join(self.url, *parts)

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write one small file into the staging prefix; return its staging URL."""
        dest = self.staging_path(relpath)
        fs, p = get_fs(dest, self.storage_options)
        fs.makedirs(posixpath.dirname(p), exist_ok=True)
        with fs.open(p, "wb") as f:
            f.write(data)
        return dest

    def write_json(self, relpath: str, obj: Any) -> str:
        return self.write_bytes(relpath, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def commit(self) -> None:
        """Move staging to the target (replacing an old target), then write ``_SUCCESS``."""
        fs, target = self.fs_path
        _, staging = get_fs(self.staging, self.storage_options)
        try:
            if fs.exists(target):
                # Remove the old dataset first so old and new files never mix; the marker
                # is absent until the new one is complete.
                fs.rm(target, recursive=True)
            if is_remote(self.url):
                fs.copy(staging + "/", target + "/", recursive=True)
                fs.rm(staging, recursive=True)
            else:
                fs.mv(staging, target, recursive=True)
            with fs.open(posixpath.join(target, SUCCESS_MARKER), "wb") as f:
                f.write(b"")
        except (PermissionError, OSError) as e:
            raise OutputError(f"could not commit the output to {self.url!r}: {e}") from e
        logger.info("committed output to %s", self.url)

    def abort(self) -> None:
        """Remove the staging prefix; errors are logged, the original failure matters more."""
        fs, staging = get_fs(self.staging, self.storage_options)
        try:
            if fs.exists(staging):
                fs.rm(staging, recursive=True)
        except OSError as e:
            logger.warning("could not remove temporary output %s: %s", self.staging, e)


@contextmanager
def committed(target: OutputTarget) -> Iterator[OutputTarget]:
    """Yield ``target``; commit on success, abort on any failure (including Ctrl-C)."""
    try:
        yield target
    except BaseException:
        target.abort()
        raise
    target.commit()


def write_parquet_part(df: pd.DataFrame, url: str, schema, storage_options: Mapping[str, Any] | None) -> int:
    """Write one partition as one Parquet file with an explicit Arrow schema; return rows.

    The pandas metadata is dropped on purpose: it would name pandas' Arrow extension dtype
    (``list<item: float>[pyarrow]``), which pandas cannot parse back, while plain Arrow
    ``list<float>`` columns read as arrays in pandas, pyarrow, Spark and Athena alike.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False).replace_schema_metadata(None)
    fs, p = get_fs(url, storage_options)
    fs.makedirs(posixpath.dirname(p), exist_ok=True)
    with fs.open(p, "wb") as f:
        pq.write_table(table, f, compression="snappy")
    return table.num_rows


def download_to_local(url: str, local_path: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Copy one file (e.g. a weights file on S3) to a local path and return that path."""
    fs, p = get_fs(url, storage_options)
    try:
        fs.get(p, local_path)
    except (PermissionError, OSError) as e:
        raise translate(e, url) from e
    return local_path


def bucket_region(bucket: str, storage_options: Mapping[str, Any] | None) -> str:
    """The AWS region of ``bucket``, from ``HeadBucket``'s ``x-amz-bucket-region`` header,
    falling back to ``GetBucketLocation`` (``EU`` means eu-west-1, empty means us-east-1)."""
    import s3fs

    fs = s3fs.S3FileSystem(**dict(storage_options or {}))
    try:
        head = fs.call_s3("head_bucket", Bucket=bucket)
        region = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
        if region:
            return region
        loc = fs.call_s3("get_bucket_location", Bucket=bucket).get("LocationConstraint")
    except (PermissionError, OSError) as e:
        raise translate(e, f"s3://{bucket}") from e
    return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(loc, loc)


def guard_regions(urls: list[str | None], settings) -> None:
    """Refuse any ``s3://`` location whose bucket is outside ``settings.allowed_regions``.

    Runs before any image is read or any byte written. Local paths need no check.
    """
    from .errors import RegionError

    seen: set[str] = set()
    for url in urls:
        if not url or not url.startswith("s3://"):
            continue
        bucket = url[len("s3://"):].split("/", 1)[0]
        if bucket in seen:
            continue
        seen.add(bucket)
        region = bucket_region(bucket, settings.storage_options())
        if region not in settings.allowed_regions:
            raise RegionError(
                f"bucket {bucket!r} is in {region}, outside the allowed regions "
                f"({', '.join(settings.allowed_regions)}): fruitdask keeps data in the EU; "
                f"pass --allowed-regions {','.join((*settings.allowed_regions, region))} to override"
            )
