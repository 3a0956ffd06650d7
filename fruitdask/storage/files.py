"""Reading and writing whole files and prefixes, on any storage (fsspec: local paths and
``s3://``).

Everything takes ``storage_options`` explicitly so that worker processes and Spark executors
reach the same endpoint as the driver; image bytes are only read where the work runs
(:func:`read_bytes` is called inside tasks). Storage failures become fruitdask errors that
say what to do (each store's, :func:`fruitdask.storage.stores.translate`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import uuid
from collections.abc import Mapping
from typing import Any

import pandas as pd

from fruitdask.storage import stores
from fruitdask.storage.safety import forget_listings
from fruitdask.storage.stores import translate
from fruitdask.storage.urls import get_fs, is_remote, unsafe_name

logger = logging.getLogger(__name__)


def read_bytes(path: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """Read one whole file. Called inside tasks, on the worker that featurizes it.

    An ``OSError`` (missing file, access denied to one object) propagates as is, for the
    caller to record against that image; failures that doom every read of the run (no
    credentials, endpoint unreachable) become a :class:`StorageError` that fails the run.
    ``path`` is read as itself: a name the file system would parse into another object's
    (``k?versionId=v`` on S3) is an ``OSError``, never that object's bytes.
    """
    problem = unsafe_name(path)
    if problem is not None:
        raise OSError(f"{path}: {problem}")
    fs, p = get_fs(path, storage_options)
    try:
        with fs.open(p, "rb") as f:
            return f.read()
    except OSError:
        raise
    except stores.storage_exceptions() as e:
        raise translate(e, path) from e


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
    try:
        fs.makedirs(posixpath.dirname(p), exist_ok=True)
        with fs.open(p, "wb") as f:
            pq.write_table(table, f, compression="snappy")
    except stores.storage_exceptions() as e:
        # A fruitdask error travels back from the worker and reaches the CLI as one line.
        raise translate(e, url) from e
    return table.num_rows


def read_parquet(url: str, storage_options: Mapping[str, Any] | None = None, columns: list[str] | None = None) -> pd.DataFrame:
    """Read one Parquet file or a folder of part files (a run's ``features/``).

    List columns come back as Arrow-backed series (``pd.ArrowDtype``), ready for
    :func:`fruitdask.features.frames.matrix`.
    """
    import pyarrow.parquet as pq

    fs, p = get_fs(url, storage_options)
    try:
        table = pq.read_table(p, filesystem=fs, columns=columns)
    except (PermissionError, OSError) as e:
        raise translate(e, url) from e
    return table.to_pandas(types_mapper=pd.ArrowDtype)


def list_files(url: str, storage_options: Mapping[str, Any] | None = None, suffix: str = "") -> list[str]:
    """Files directly under folder ``url`` whose name ends with ``suffix``, sorted, as URLs
    (``[]`` when the folder does not exist)."""
    fs, p = get_fs(url, storage_options)
    try:
        forget_listings(fs, p)  # other processes (workers) may have written there
        if not fs.isdir(p):
            return []
        names = sorted(f for f in fs.ls(p, detail=False) if f.endswith(suffix) and not posixpath.basename(f).startswith("."))
    except (PermissionError, OSError) as e:
        raise translate(e, url) from e
    return [fs.unstrip_protocol(f) if is_remote(url) else f for f in names]


def write_file(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write one file in place, whole or not at all: one ``PutObject`` on S3, a temporary
    file renamed over the target locally (a reader never sees half of it)."""
    fs, p = get_fs(url, storage_options)
    try:
        fs.makedirs(posixpath.dirname(p), exist_ok=True)
        if is_remote(url):
            fs.pipe_file(p, data)
        else:
            tmp = f"{p}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
    except (PermissionError, OSError) as e:
        raise translate(e, url) from e
    return url


def remove_prefix(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove a folder/prefix and everything under it, if it exists; errors are logged
    (used to drop checkpoints after a commit, when failing would help nobody)."""
    fs, p = get_fs(url, storage_options)
    try:
        forget_listings(fs, p)  # workers wrote it: a listing cached here would hide it
        if fs.exists(p):
            fs.rm(p, recursive=True)
    except stores.storage_exceptions() as e:
        logger.warning("could not remove %s: %s", url, e)



def file_sha256(path: str) -> str:
    """sha256 of a local file's bytes (a downloaded weights file, before it is loaded)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def url_sha256(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """sha256 of a file's bytes, local or remote, streamed (nothing kept, nothing parsed)."""
    fs, p = get_fs(url, storage_options)
    h = hashlib.sha256()
    try:
        with fs.open(p, "rb", block_size=1 << 22) as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    except stores.storage_exceptions() as e:
        raise translate(e, url) from e
    return h.hexdigest()


def download_to_local(url: str, local_path: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Copy one file (e.g. a weights file on S3) to a local path and return that path."""
    fs, p = get_fs(url, storage_options)
    try:
        fs.get(p, local_path)
    except stores.storage_exceptions() as e:
        raise translate(e, url) from e
    return local_path
