"""The features table: a Delta Lake table at ``OUTPUT/features``, through ``deltalake``.

delta-rs needs no JVM and commits to S3 with conditional writes (no DynamoDB): a commit is
one ``PutObject`` of ``_delta_log/<version>.json`` that succeeds only if that version does
not exist yet. A run reads the table at one version and commits **once**, with
``max_commit_retries=0``: if another writer committed in between, this run's commit fails
(:class:`fruitdask.errors.ConcurrentRunError`) instead of being rebased blindly, so two runs
started together never both add an image. Data files are written by the workers before the
commit; a file no commit names is invisible to readers and removed by :func:`vacuum`.

Each fruitdask commit carries, in its commit info under ``fruitdask``, the run id, the input,
the feature settings and their fingerprint, the PCA fit, and the run's counts: the table
describes itself (``fruitdask table history``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fruitdask import storage
from fruitdask.errors import ConcurrentRunError, DuplicateKeyError, OutputError
from fruitdask.schema import TABLE_SCHEMA

logger = logging.getLogger(__name__)

TABLE_DIR = storage.paths.FEATURES
META_KEY = "fruitdask"
#: Commits searched back for the last fruitdask one (compactions carry it forward too).
HISTORY_DEPTH = 50
#: Target size of a data file after compaction (``fruitdask table compact``).
TARGET_FILE_BYTES = 128 << 20
#: A data file under this size is "small" (a run merges small files: lake.update.merge_small_files).
SMALL_FILE_BYTES = TARGET_FILE_BYTES // 4


def table_url(output_url: str) -> str:
    return storage.join(output_url, TABLE_DIR)


def delta_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, str] | None:
    """deltalake's (object_store) options for ``url`` from fruitdask's fsspec options.

    The credentials are resolved here by botocore's chain, the one s3fs uses in every
    process (environment keys, ``--aws-profile``, IRSA web identity), and handed to delta-rs
    in memory only: object_store does not read AWS profiles itself. The region is the
    bucket's own (looked up once, as the region guard does), unless ``--aws-region`` says.
    """
    if not storage.is_remote(url):
        return None
    opts = dict(storage_options or {})
    client = dict(opts.get("client_kwargs") or {})
    out: dict[str, str] = {}
    if client.get("endpoint_url"):
        out["AWS_ENDPOINT_URL"] = str(client["endpoint_url"])
        if str(client["endpoint_url"]).startswith("http://"):
            out["AWS_ALLOW_HTTP"] = "true"
    out.update(_credentials(opts.get("profile")))
    region = client.get("region_name") or _bucket_region(url, opts)
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


def _bucket_region(url: str, storage_options: Mapping[str, Any]) -> str | None:
    from fruitdask.storage.regions import bucket_region, split_bucket

    bucket = split_bucket(url)[0]
    if bucket not in _REGIONS:
        _REGIONS[bucket] = bucket_region(bucket, storage_options)
    return _REGIONS[bucket]


def _uri(url: str) -> str:
    """delta-rs wants ``s3://`` (not ``s3a://``) and absolute local paths."""
    import os

    if storage.is_remote(url):
        return "s3://" + url.split("://", 1)[1] if url.startswith("s3a://") else url
    return os.path.abspath(url)


@dataclass
class TableState:
    """The table as one run read it: the version it will commit on top of, its files and
    the last fruitdask commit's description (``None`` for a table that does not exist)."""

    url: str
    storage_options: Mapping[str, Any]
    dt: Any = None
    meta: dict = field(default_factory=dict)

    @property
    def exists(self) -> bool:
        return self.dt is not None

    @property
    def version(self) -> int | None:
        return self.dt.version() if self.dt is not None else None

    def files(self) -> list[str]:
        """Data files of this version, relative to the table root."""
        return list(self.dt.file_uris()) if self.dt is not None else []

    def dataset(self):
        """The pyarrow dataset of this version (read column by column, file by file)."""
        return self.dt.to_pyarrow_dataset()


def open_table(output_url: str, storage_options: Mapping[str, Any] | None) -> TableState:
    """The features table under ``output_url`` at its latest version (or an empty state)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    url = table_url(output_url)
    state = TableState(url, dict(storage_options or {}))
    try:
        state.dt = DeltaTable(_uri(url), storage_options=delta_options(url, storage_options))
    except TableNotFoundError:
        return state
    except OSError as e:
        raise storage.translate(e, url) from e
    state.meta = last_meta(state.dt)
    return state


def last_meta(dt) -> dict:
    """The ``fruitdask`` description of the newest fruitdask commit (empty if none)."""
    for entry in dt.history(HISTORY_DEPTH):
        raw = entry.get(META_KEY)
        if raw:
            return json.loads(raw) if isinstance(raw, str) else dict(raw)
    return {}


def relative(state: TableState, uri: str) -> str:
    """A data file's path relative to the table root, as Delta's actions name it."""
    root = _uri(state.url).rstrip("/") + "/"
    for prefix in (root, "file://" + root):
        if uri.startswith(prefix):
            return uri[len(prefix) :]
    return uri


def check_unique_keys(row_keys: np.ndarray, url: str) -> None:
    """Refuse a version whose rows would hold an image key twice (``row_keys``: the 16-byte
    key hashes of every row it may hold, :func:`fruitdask.lake.keys.hash_keys`)."""
    from fruitdask.lake.keys import duplicated

    dup = duplicated(row_keys)
    if len(dup):
        raise DuplicateKeyError(
            f"refusing to commit to {url}: {len(dup)} image key(s) would be held by two rows of the new version "
            f"(one row per image is the table's contract): nothing was committed; run the same command again (a "
            f"table written before keys were relative to the input root is re-keyed first), and report it if it "
            f"repeats"
        )


def commit(state: TableState, adds: list[dict], removes: list[dict], meta: dict, *, row_keys: np.ndarray) -> int:
    """Commit ``adds`` and ``removes`` as one new version on top of the version ``state``
    read; return that version.

    ``adds``: ``{path, size, rows, stats}`` of files already written under the table root;
    ``removes``: ``{path, size}`` of files of the version read; ``row_keys``: the key hashes
    of every row the new version may hold, checked first (:func:`check_unique_keys`).

    Raises
    ------
    DuplicateKeyError
        A key would be held twice: nothing is committed.
    ConcurrentRunError
        Another writer committed since ``state`` was read (or created the table): nothing
        of this run is committed; its files stay unreferenced until a vacuum.
    """
    from deltalake import Schema
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import AddAction, CommitProperties, RemoveAction, create_table_with_add_actions

    check_unique_keys(row_keys, state.url)
    now = int(time.time() * 1000)
    add_actions = [AddAction(a["path"], int(a["size"]), {}, now, True, a["stats"]) for a in adds]
    props = CommitProperties(custom_metadata={META_KEY: json.dumps(meta, sort_keys=True)}, max_commit_retries=0)
    try:
        if not state.exists:
            create_table_with_add_actions(
                _uri(state.url), Schema.from_arrow(TABLE_SCHEMA), add_actions, mode="error",
                storage_options=delta_options(state.url, state.storage_options), commit_properties=props,
            )
            return 0
        removes_ = [RemoveAction(r["path"], True, now, int(r["size"]) if r.get("size") else None) for r in removes]
        read_version = state.version
        state.dt.create_write_transaction([*add_actions, *removes_], mode="append", schema=TABLE_SCHEMA,
                                          commit_properties=props)
    except (CommitFailedError, DeltaError) as e:
        if isinstance(e, CommitFailedError) or "already exists" in str(e):
            raise ConcurrentRunError(
                f"another run committed to {state.url} while this run worked (this run read version "
                f"{state.version}): nothing of this run was committed; run the same command again, it "
                f"featurizes only what is still missing"
            ) from e
        raise OutputError(f"could not commit the features table {state.url}: {e}") from e
    # No retries: the commit is exactly the version after the one read.
    return read_version + 1


def load(output_url: str, storage_options: Mapping[str, Any] | None, version: int | None = None):
    """The ``deltalake.DeltaTable`` of an output (at ``version`` for time travel)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    url = table_url(output_url)
    try:
        return DeltaTable(_uri(url), version=version, storage_options=delta_options(url, storage_options))
    except TableNotFoundError as e:
        raise OutputError(f"{output_url!r} has no features table ({url}): pass the --output of a `fruitdask run`") from e


def history(output_url: str, storage_options: Mapping[str, Any] | None, limit: int | None = None) -> list[dict]:
    """The table's commits, newest first, with fruitdask's description decoded."""
    out = []
    for entry in load(output_url, storage_options).history(limit):
        row = {k: entry.get(k) for k in ("version", "timestamp", "operation")}
        raw = entry.get(META_KEY)
        row[META_KEY] = (json.loads(raw) if isinstance(raw, str) else raw) if raw else None
        out.append(row)
    return out


def vacuum(output_url: str, storage_options: Mapping[str, Any] | None, retention_hours: int, dry_run: bool) -> list[str]:
    """Delete data files that no version newer than ``retention_hours`` needs (and files no
    commit ever named: those of failed runs). Time travel to older versions ends there."""
    dt = load(output_url, storage_options)
    return list(dt.vacuum(retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=False))


def compact(output_url: str, storage_options: Mapping[str, Any] | None, target_bytes: int = TARGET_FILE_BYTES) -> dict:
    """Rewrite small data files into files of about ``target_bytes`` (a data-preserving
    commit: readers of any version see the same rows); the fruitdask description is carried."""
    from deltalake.transaction import CommitProperties

    dt = load(output_url, storage_options)
    meta = last_meta(dt)
    props = CommitProperties(custom_metadata={META_KEY: json.dumps({**meta, "operation": "compact"}, sort_keys=True)})
    return dict(dt.optimize.compact(target_size=target_bytes, commit_properties=props))


def summary(output_url: str, storage_options: Mapping[str, Any] | None, version: int | None = None) -> dict:
    """A version's rows, files, labels and PCA fits (reads two small columns)."""
    dt = load(output_url, storage_options, version)
    t = dt.to_pyarrow_dataset().to_table(columns=["label", "pca_fit"])
    labels = t.column("label").value_counts().to_pylist()
    return {
        "version": dt.version(), "rows": t.num_rows, "files": len(dt.file_uris()),
        "labels": {d["values"]: d["counts"] for d in sorted(labels, key=lambda d: str(d["values"]))},
        "pca_fits": sorted({str(v) for v in t.column("pca_fit").unique().to_pylist()}),
        "fruitdask": last_meta(dt),
    }
