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

from fruitdask import storage
from fruitdask.errors import ConcurrentRunError, OutputError
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


def last_meta(dt, up_to: int | None = None) -> dict:
    """The ``fruitdask`` description of the newest fruitdask commit (empty if none); with
    ``up_to``, of the newest at or before that version.

    ``dt`` must be the table at its latest version: delta-rs (1.6) lists the commits of a
    table loaded at an older version newest first all the same, numbered down from the
    loaded version, so each would get another commit's number and description."""
    for entry in dt.history(HISTORY_DEPTH if up_to is None else None):
        raw = entry.get(META_KEY)
        if raw and (up_to is None or entry["version"] <= up_to):
            return _decode(raw)
    return {}


def _decode(raw: str | dict) -> dict:
    return json.loads(raw) if isinstance(raw, str) else dict(raw)


def relative(state: TableState, uri: str) -> str:
    """A data file's path relative to the table root, as Delta's actions name it."""
    root = _uri(state.url).rstrip("/") + "/"
    for prefix in (root, "file://" + root):
        if uri.startswith(prefix):
            return uri[len(prefix) :]
    return uri


def commit(state: TableState, adds: list[dict], removes: list[dict], meta: dict) -> int:
    """Commit ``adds`` and ``removes`` as one new version on top of the version ``state``
    read; return that version.

    ``adds``: ``{path, size, rows, stats}`` of files already written under the table root;
    ``removes``: ``{path, size}`` of files of the version read.

    Raises
    ------
    ConcurrentRunError
        Another writer committed since ``state`` was read (or created the table): nothing
        of this run is committed; its files stay unreferenced until a vacuum.
    """
    from deltalake import Schema
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import AddAction, CommitProperties, RemoveAction, create_table_with_add_actions

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


#: What :func:`history` says of each commit besides Delta's version, timestamp and operation.
DID_KEYS = ("action", "run_id", "added", "updated", "removed", "unchanged", "rows", "pca_fit", "new_fit",
            "files_added", "files_removed")


def history(output_url: str, storage_options: Mapping[str, Any] | None, limit: int | None = None) -> list[dict]:
    """The table's commits, newest first: what each did (:data:`DID_KEYS`, see
    :func:`what_it_did`) and fruitdask's description of it (``None`` for Delta's own
    commits, such as a vacuum's)."""
    # One commit more than shown: a run's fit is new when it differs from the one before.
    entries = list(load(output_url, storage_options).history(None if limit is None else limit + 1))
    metas = [_decode(e[META_KEY]) if e.get(META_KEY) else None for e in entries]
    complete = not entries or entries[-1].get("version") == 0
    out = []
    for i, (entry, meta) in enumerate(zip(entries[:limit], metas, strict=False)):
        older = [m for m in metas[i + 1 :] if m]
        before = older[0].get("pca_fit") if older else None
        row = {k: entry.get(k) for k in ("version", "timestamp", "operation")}
        out.append({**row, **what_it_did(entry, meta, before, known_before=bool(older) or complete), META_KEY: meta})
    return out


def what_it_did(entry: Mapping[str, Any], meta: dict | None, fit_before: str | None, known_before: bool = True) -> dict:
    """One commit in :data:`DID_KEYS` terms. A run: its id, rows added, updated (featurized
    again), removed and left unchanged, rows after, its PCA fit and whether the fit is new.
    A compaction (``OPTIMIZE``) moves rows between files and changes none of them; a vacuum
    (``VACUUM START``/``END``, Delta's own commits) deletes files and no row. ``None`` where
    the commit does not say."""
    op = str(entry.get("operation") or "")
    metrics = entry.get("operationMetrics") or {}
    did = dict.fromkeys(DID_KEYS)
    if op == "OPTIMIZE" or (meta or {}).get("operation") == "compact":
        rows = (meta or {}).get("rows")
        did.update(action="compact", added=0, updated=0, removed=0, unchanged=rows, rows=rows,
                   pca_fit=(meta or {}).get("pca_fit"), new_fit=False,
                   files_added=metrics.get("numFilesAdded"), files_removed=metrics.get("numFilesRemoved"))
    elif op.startswith("VACUUM"):
        did.update(action=op.lower(), files_removed=metrics.get("numDeletedFiles"))  # END's: START's are to come
    elif meta:
        counts = meta.get("counts") or {}
        rows, changed = meta.get("rows"), [counts.get(k) for k in ("added", "updated")]
        # Tables written before the count was recorded: the rows the run did not featurize.
        unchanged = counts.get("unchanged", rows - sum(changed) if rows is not None and None not in changed else None)
        did.update(action="rebuild" if meta.get("rebuild") else "run", run_id=meta.get("run_id"), added=changed[0],
                   updated=changed[1], removed=counts.get("removed"), unchanged=unchanged, rows=rows,
                   pca_fit=meta.get("pca_fit"), new_fit=meta.get("pca_fit") != fit_before if known_before else None)
    else:
        did["action"] = op.lower() or None
    return did


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


def read_columns(dt, storage_options: Mapping[str, Any] | None, columns: list[str] | None = None):
    """``columns`` (all when ``None``) of every data file of ``dt``'s version, as one Arrow table, read file by
    file through fruitdask's storage. Not through ``dt.to_pyarrow_dataset()``: its scanners'
    threads (over delta-rs' filesystem) outlive Arrow at the end of the process often enough
    (21 short processes in 50 here) to abort it after its work ("terminate called without an
    active exception", exit 134; apache/arrow#34314)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([TABLE_SCHEMA.field(c) for c in columns or TABLE_SCHEMA.names])
    parts = []
    for uri in dt.file_uris():
        fs, path = storage.get_fs(uri, storage_options)
        with fs.open(path, "rb") as f:
            parts.append(pq.ParquetFile(f).read(columns=schema.names).cast(schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def summary(output_url: str, storage_options: Mapping[str, Any] | None, version: int | None = None) -> dict:
    """A version's rows, files, labels and PCA fits (reads two small columns)."""
    latest = load(output_url, storage_options)
    dt = latest if version is None or version == latest.version() else load(output_url, storage_options, version)
    try:
        t = read_columns(dt, storage_options, ["label", "pca_fit"])
    except OSError as e:  # FileNotFoundError among them: a vacuum deleted the version's files
        raise OutputError(f"version {dt.version()} of {table_url(output_url)} can no longer be read (a vacuum deleted "
                          f"files it needs: {str(e).splitlines()[0]}); `fruitdask table history` lists the versions, read a newer one") from e
    labels = t.column("label").value_counts().to_pylist()
    return {
        "version": dt.version(), "rows": t.num_rows, "files": len(dt.file_uris()),
        "labels": {d["values"]: d["counts"] for d in sorted(labels, key=lambda d: str(d["values"]))},
        "pca_fits": sorted({str(v) for v in t.column("pca_fit").unique().to_pylist()}),
        "fruitdask": last_meta(latest, up_to=dt.version()),
    }
