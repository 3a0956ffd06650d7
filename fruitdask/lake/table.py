"""The features table: a Delta Lake table at ``OUTPUT/features``, through ``deltalake``.

delta-rs needs no JVM and commits to S3 with conditional writes (no DynamoDB): a commit is
one ``PutObject`` of ``_delta_log/<version>.json`` that succeeds only if that version does
not exist yet. A run reads the table at one version and commits **once**, with
``max_commit_retries=0``: if another writer committed in between, this run's commit fails
(:class:`fruitdask.errors.ConcurrentRunError`) instead of being rebased blindly, so two runs
started together never both add an image. Data files are written by the workers before the
commit; a file no commit names is invisible to readers and removed by :func:`vacuum`.

Each fruitdask commit carries, in its commit info under ``fruitdask``, the run id, the input,
the feature settings and their fingerprint, the PCA fit, and the run's counts (``fruitdask
table history``). What the table *is* (its format and the feature settings of every row) lives
in the table's own metadata, the ``description`` of its ``metaData`` action (:class:`Description`):
every checkpoint carries it, so vacuums, compactions, other writers and log cleanup never push
it out. A table from before it (settings in commit info only) is described once, in place
(:func:`describe`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fruitdask import storage
from fruitdask.errors import ConcurrentRunError, DuplicateKeyError, OutputError
from fruitdask.lake.actions import FileAction, now_ms
from fruitdask.output import layout
from fruitdask.schema import TABLE_SCHEMA, complete_table, table_columns
from fruitdask.storage import stores

logger = logging.getLogger(__name__)

META_KEY = "fruitdask"
#: The run's record (its ``run.json`` as of the commit), inside a run commit's description:
#: what the last run did is part of its commit, whether or not its publishing finished.
RECORD_KEY = "record"
#: Commits searched back for the last fruitdask one (compactions carry it forward too); what
#: must not be lost (format, settings) is in the table's :class:`Description`, not here.
HISTORY_DEPTH = 50
#: Target size of a data file after compaction (``fruitdask table compact``).
TARGET_FILE_BYTES = 128 << 20
#: A data file under this size is "small" (a run merges small files: lake.update.merge_small_files).
SMALL_FILE_BYTES = TARGET_FILE_BYTES // 4


def table_url(output_url: str) -> str:
    return storage.join(output_url, layout.FEATURES)


def delta_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, str] | None:
    """deltalake's (object_store) options for ``url`` from fruitdask's fsspec options: its
    store's (:meth:`fruitdask.storage.base.Store.delta_options`; on S3 credentials resolved
    now by botocore's chain and the bucket's region).

    Credentials are a frozen copy (IRSA and STS session credentials last about an hour), so
    every commit re-opens the table with options resolved right then (:func:`_reopened`): a
    run longer than its first credentials' life still commits.
    """
    return stores.delta_options(url, storage_options)


def _uri(url: str) -> str:
    """The URI delta-rs opens (its store's: ``s3://`` for ``s3a://``, absolute local paths)."""
    return stores.delta_uri(url)


@dataclass(frozen=True)
class Description:
    """What the table is: its format (:data:`fruitdask.lake.keys.TABLE_FORMAT`) and the
    settings every row was made with (their fingerprint and readable fields), kept as JSON in
    the ``description`` of the table's ``metaData`` action."""

    format: int
    settings: str  # the fingerprint (lake.keys.settings_fingerprint): what the rows' settings column holds
    feature_settings: Mapping[str, Any] = field(default_factory=dict)  # readable: image_size, pooling...

    def same_as(self, other: Description | None) -> bool:
        """Whether rows of the two tables are interchangeable (same format, same settings)."""
        return other is not None and (self.format, self.settings) == (other.format, other.settings)

    def text(self) -> str:
        return json.dumps({META_KEY: {"format": self.format, "settings": self.settings,
                                      "feature_settings": dict(self.feature_settings)}}, sort_keys=True)

    @classmethod
    def parse(cls, text: str | None) -> Description | None:
        """The description a fruitdask table holds (None for any other text, or none)."""
        try:
            doc = json.loads(text or "")[META_KEY]
            return cls(int(doc["format"]), str(doc["settings"]), dict(doc.get("feature_settings") or {}))
        except (ValueError, TypeError, KeyError):
            return None

    @classmethod
    def of_meta(cls, meta: Mapping[str, Any]) -> Description | None:
        """From a fruitdask commit's description (how tables before :class:`Description` kept it)."""
        if not meta.get("settings"):
            return None
        return cls(int(meta.get("format") or 1), str(meta["settings"]), dict(meta.get("feature_settings") or {}))


@dataclass
class TableState:
    """The table as one run read it: the version it will commit on top of, its files, its
    :class:`Description` and the last fruitdask commit's description (``meta``).

    ``described`` is False for a table whose description was recovered from its history
    (written before :class:`Description`): :func:`describe` writes it into the table."""

    url: str
    storage_options: Mapping[str, Any]
    table: Any = None  # the deltalake.DeltaTable at the version read (None: no table yet)
    meta: dict = field(default_factory=dict)
    description: Description | None = None
    described: bool = True

    @property
    def exists(self) -> bool:
        return self.table is not None

    @property
    def version(self) -> int | None:
        return self.table.version() if self.table is not None else None

    def files(self) -> list[str]:
        """Data files of this version, relative to the table root."""
        return list(self.table.file_uris()) if self.table is not None else []

    def dataset(self):
        """The pyarrow dataset of this version (read column by column, file by file)."""
        return self.table.to_pyarrow_dataset()


def open_table(output_url: str, storage_options: Mapping[str, Any] | None) -> TableState:
    """The features table under ``output_url`` at its latest version (or an empty state)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    url = table_url(output_url)
    state = TableState(url, dict(storage_options or {}))
    try:
        state.table = DeltaTable(_uri(url), storage_options=delta_options(url, storage_options))
    except TableNotFoundError:
        return state
    except OSError as e:
        raise storage.translate(e, url) from e
    state.meta = last_meta(state.table)
    state.description = Description.parse(state.table.metadata().description)
    if state.description is None:
        state.described = False
        state.description = _recovered(state.table, state.meta, state.storage_options)
    return state


def _recovered(table, meta: Mapping[str, Any], storage_options: Mapping[str, Any] | None) -> Description | None:
    """An undescribed table's description: from its newest fruitdask commit (the whole history
    left is searched, once), else from the settings its rows name (fingerprint only)."""
    found = Description.of_meta(meta)
    if found is None:
        for entry in table.history():
            raw = entry.get(META_KEY)
            found = Description.of_meta(json.loads(raw) if isinstance(raw, str) else dict(raw)) if raw else None
            if found is not None:
                break
    if found is None:
        fps = read_columns(table, storage_options, ["settings"]).column("settings").unique().to_pylist()
        if fps:  # rows of several settings (mixed before their check held): a run refuses them all
            found = Description(1, ",".join(sorted(str(f) for f in fps)))
    return found


def describe(state: TableState) -> bool:
    """Write the description of a table from before :class:`Description` into the table, in
    place, as one metadata-only commit (its rows untouched); True when it did. The commit
    carries the last fruitdask commit's description forward, as a compaction does."""
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import CommitProperties

    if not state.exists or state.described or state.description is None:
        return False
    custom = {META_KEY: json.dumps({**state.meta, "operation": "describe"}, sort_keys=True)} if state.meta else {}
    state.table = _reopened(state)
    try:
        state.table.alter.set_table_description(
            state.description.text(), commit_properties=CommitProperties(custom_metadata=custom, max_commit_retries=0))
    except (CommitFailedError, DeltaError) as e:
        raise _commit_error(state, e) from e
    state.table.update_incremental()
    state.described = True
    logger.info("the table at %s kept its feature settings in its commit history only: moved them into the table's "
                "description (version %d; once)", state.url, state.version)
    return True


def last_meta(table, up_to: int | None = None) -> dict:
    """The ``fruitdask`` description of the newest fruitdask commit (empty if none); with
    ``up_to``, of the newest at or before that version.

    ``table`` must be the table at its latest version: delta-rs (1.6) lists the commits of a
    table loaded at an older version newest first all the same, numbered down from the
    loaded version, so each would get another commit's number and description."""
    for entry in table.history(HISTORY_DEPTH if up_to is None else None):
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


def commit(state: TableState, adds: list[FileAction], removes: list[FileAction], meta: dict,
           description: Description | None = None, *, row_keys: np.ndarray) -> int:
    """Commit ``adds`` and ``removes`` as one new version on top of the version ``state``
    read; return that version.

    ``adds``: files already written under the table root (with their statistics);
    ``removes``: files of the version read (path and size suffice); both become delta-rs'
    actions here only (:meth:`~fruitdask.lake.actions.FileAction.add_action`); ``row_keys``: the key hashes
    of every row the new version may hold, checked first (:func:`check_unique_keys`). ``description``: what the
    table is after this commit (default: as it was); a new table gets it in its first commit,
    and a replaced one (``--rebuild`` with other settings: every file removed) in the same
    commit, which replaces the table's metadata (Delta's ``CREATE OR REPLACE``).

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
    from deltalake.transaction import CommitProperties, create_table_with_add_actions

    check_unique_keys(row_keys, state.url)
    now = now_ms()
    add_actions = [a.add_action() for a in adds]
    props = CommitProperties(custom_metadata={META_KEY: json.dumps(meta, sort_keys=True, default=str)},
                             max_commit_retries=0)
    description = description or state.description
    replace = state.exists and description is not None and not description.same_as(state.description)
    if replace:
        _check_replaces(state, removes)
    try:
        if not state.exists or replace:
            create_table_with_add_actions(
                _uri(state.url), Schema.from_arrow(TABLE_SCHEMA), add_actions, mode="overwrite" if replace else "error",
                description=description.text() if description else None,
                storage_options=delta_options(state.url, state.storage_options), commit_properties=props,
            )
            return 0 if not state.exists or state.version is None else state.version + 1
        removes_ = [r.remove_action(now) for r in removes]
        read_version = state.version
        assert read_version is not None  # an existing table was read at a version
        _reopened(state).create_write_transaction([*add_actions, *removes_], mode="append", schema=TABLE_SCHEMA,
                                          commit_properties=props)
    except (CommitFailedError, DeltaError) as e:
        raise _commit_error(state, e) from e
    # No retries: the commit is exactly the version after the one read.
    return read_version + 1


def _reopened(state: TableState):
    """``state.table`` (the version read) opened again with credentials resolved now, for a
    commit: those the table was opened with may have expired during the run."""
    from deltalake import DeltaTable

    if not storage.is_remote(state.url):
        return state.table
    try:
        return DeltaTable(_uri(state.url), version=state.version,
                          storage_options=delta_options(state.url, state.storage_options))
    except OSError as e:
        raise storage.translate(e, state.url) from e


def _check_replaces(state: TableState, removes: list[FileAction]) -> None:
    """A commit that replaces the table's metadata removes every file of the latest version:
    refuse it unless that is the version read and the run removes all of its files."""
    from deltalake import DeltaTable

    latest = DeltaTable(_uri(state.url), storage_options=delta_options(state.url, state.storage_options)).version()
    if latest != state.version:
        raise _commit_error(state, None)
    if {r.path for r in removes} != {relative(state, u) for u in state.files()}:
        raise OutputError(f"a commit that changes what the table {state.url} is must replace every file of version "
                          f"{state.version}: nothing was committed (a fruitdask bug: please report it)")


def _commit_error(state: TableState, e: Exception | None) -> OutputError:
    """``e`` None: another writer committed (seen before trying)."""
    from deltalake.exceptions import CommitFailedError

    if e is None or isinstance(e, CommitFailedError) or "already exists" in str(e):
        return ConcurrentRunError(
            f"another run committed to {state.url} while this run worked (this run read version "
            f"{state.version}): nothing of this run was committed; run the same command again, it "
            f"featurizes only what is still missing"
        )
    return OutputError(f"could not commit the features table {state.url}: {e}")


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
        out.append({**row, **what_it_did(entry, meta, before, known_before=bool(older) or complete), META_KEY: _shown(meta)})
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
    elif meta and meta.get("operation") in ("rekey", "describe", "add_columns"):
        # Featurize nothing: a re-key rewrites keys (dropping rows held twice), a describe
        # writes the table's description, an add_columns fills new columns (lake.migrate);
        # the rest of ``meta`` is the last run's, carried on.
        counts = (meta.get("counts") or {}) if meta["operation"] == "rekey" else {}
        dropped = int(counts.get("duplicates_dropped") or 0)
        rows = meta.get("rows")
        did.update(action=meta["operation"], run_id=meta.get("run_id") if meta["operation"] == "rekey" else None,
                   added=0, updated=0, removed=dropped, unchanged=rows, rows=rows, pca_fit=meta.get("pca_fit"), new_fit=False)
    elif meta:
        counts = meta.get("counts") or {}
        rows, changed = meta.get("rows"), [counts.get(k) for k in ("added", "updated")]
        # Tables written before the count was recorded: the rows the run did not featurize.
        known = [int(c) for c in changed if c is not None]
        unchanged = counts.get("unchanged", rows - sum(known) if rows is not None and len(known) == len(changed) else None)
        did.update(action="rebuild" if meta.get("rebuild") else "run", run_id=meta.get("run_id"), added=changed[0],
                   updated=changed[1], removed=counts.get("removed"), unchanged=unchanged, rows=rows,
                   pca_fit=meta.get("pca_fit"), new_fit=meta.get("pca_fit") != fit_before if known_before else None)
    else:
        did["action"] = op.lower() or None
    return did


def vacuum(output_url: str, storage_options: Mapping[str, Any] | None, retention_hours: int, dry_run: bool) -> list[str]:
    """Delete the data files that no version newer than ``retention_hours`` needs, and the
    files older than that which no commit ever named (those of killed or failed runs):
    delta-rs' *full* vacuum (its default, "lite", only deletes files a commit removed). Time
    travel to older versions ends there. Call it under the output's lease: the files of a
    live run are named by no commit yet."""
    table = load(output_url, storage_options)
    return list(table.vacuum(retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=False, full=True))


def compact(output_url: str, storage_options: Mapping[str, Any] | None, target_bytes: int = TARGET_FILE_BYTES) -> dict:
    """Rewrite small data files into files of about ``target_bytes`` (a data-preserving
    commit: readers of any version see the same rows); the fruitdask description of the
    newest version is carried. Call it under the output's lease, so that no run commits
    between the read of that description and the compaction's commit."""
    from deltalake.transaction import CommitProperties

    table = load(output_url, storage_options)
    meta = last_meta(table)
    props = CommitProperties(custom_metadata={META_KEY: json.dumps({**meta, "operation": "compact"}, sort_keys=True)})
    return dict(table.optimize.compact(target_size=target_bytes, commit_properties=props))


def read_columns(table, storage_options: Mapping[str, Any] | None, columns: list[str] | None = None):
    """``columns`` (all when ``None``) of every data file of ``table``'s version, as one Arrow table, read file by
    file through fruitdask's storage. Not through ``table.to_pyarrow_dataset()``: its scanners'
    threads (over delta-rs' filesystem) outlive Arrow at the end of the process often enough
    (21 short processes in 50 here) to abort it after its work ("terminate called without an
    active exception", exit 134; apache/arrow#34314)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = table_columns(columns)
    parts = []
    for uri in table.file_uris():
        fs, path = storage.get_fs(uri, storage_options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if set(schema.names) <= set(pf.schema_arrow.names):
                parts.append(pf.read(columns=schema.names).cast(schema))
            else:  # a file from before a declared column: filled as the next run fills it (lake.migrate)
                parts.append(complete_table(pf.read()).select(schema.names).cast(schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def summary(output_url: str, storage_options: Mapping[str, Any] | None, version: int | None = None) -> dict:
    """A version's rows, files, labels and PCA fits (reads two small columns)."""
    latest = load(output_url, storage_options)
    table = latest if version is None or version == latest.version() else load(output_url, storage_options, version)
    try:
        rows = read_columns(table, storage_options, ["label", "pca_fit"])
    except OSError as e:  # FileNotFoundError among them: a vacuum deleted the version's files
        raise OutputError(f"version {table.version()} of {table_url(output_url)} can no longer be read (a vacuum deleted "
                          f"files it needs: {str(e).splitlines()[0]}); `fruitdask table history` lists the versions, read a newer one") from e
    labels = rows.column("label").value_counts().to_pylist()
    return {
        "version": table.version(), "rows": rows.num_rows, "files": len(table.file_uris()),
        "labels": {d["values"]: d["counts"] for d in sorted(labels, key=lambda d: str(d["values"]))},
        "pca_fits": sorted({str(v) for v in rows.column("pca_fit").unique().to_pylist()}),
        "fruitdask": _shown(last_meta(latest, up_to=table.version())),
        "table": _described(table),
    }


def _shown(meta: dict | None) -> dict | None:
    """A commit's description as ``table history``/``show`` print it: the run's record is in
    ``runs/<run_id>/run.json`` (or ``fruitdask report``), not repeated here."""
    return None if meta is None else {k: v for k, v in meta.items() if k != RECORD_KEY}


def current_fit(table, storage_options: Mapping[str, Any] | None) -> str | None:
    """The PCA fit the rows of ``table``'s version name (``pca_fit``): from the files' statistics
    (the log), else from the column; None for a table without rows.

    Raises
    ------
    OutputError
        The rows name more than one fit (a fruitdask table never does: every commit
        re-projects all rows when it refits).
    """
    import pyarrow as pa

    actions = pa.table(table.get_add_actions(flatten=True))
    fits: set[str] = set()
    if {"min.pca_fit", "max.pca_fit"} <= set(actions.column_names):
        lo, hi = actions.column("min.pca_fit").to_pylist(), actions.column("max.pca_fit").to_pylist()
        if None not in lo and None not in hi:
            fits = set(lo) | set(hi)
    if not fits and actions.num_rows:
        column = read_columns(table, storage_options, ["pca_fit"]).column("pca_fit")
        fits = {str(v) for v in column.unique().to_pylist() if v is not None}
    if len(fits) > 1:
        raise OutputError(f"the rows of {table.table_uri} (version {table.version()}) name {len(fits)} PCA fits "
                          f"({', '.join(sorted(fits)[:3])}): run `fruitdask run --refit` to project them all with one")
    return next(iter(fits), None)


def latest_record(output_url: str, storage_options: Mapping[str, Any] | None) -> dict | None:
    """The run record in the table's newest fruitdask commit (a compaction carries it on);
    None without a table, or for commits of fruitdask versions before the record."""
    from deltalake.exceptions import TableNotFoundError

    url = table_url(output_url)
    from deltalake import DeltaTable

    try:
        version = DeltaTable(_uri(url), storage_options=delta_options(url, storage_options)).version()
    except TableNotFoundError:
        return None
    except OSError as e:
        raise storage.translate(e, url) from e
    # The commit files are read as files (newest first, one GET each, usually one): what the
    # reader needs is one commit's info, not the log's history.
    for v in range(version, max(-1, version - HISTORY_DEPTH), -1):
        try:
            lines = storage.read_bytes(storage.join(url, "_delta_log", f"{v:020d}.json"), storage_options).splitlines()
        except FileNotFoundError:
            return None  # cleaned up: older commits are gone too
        info: dict[str, Any] = next((json.loads(line)["commitInfo"] for line in lines if line.startswith(b'{"commitInfo"')), {})
        raw = info.get(META_KEY)
        if raw:
            record = (json.loads(raw) if isinstance(raw, str) else dict(raw)).get(RECORD_KEY)
            return dict(record) if record else None
    return None


def _described(table) -> dict | None:
    """What the table is (format, feature settings), as its description says (None: undescribed)."""
    d = Description.parse(table.metadata().description)
    return None if d is None else {"format": d.format, "settings": d.settings, "feature_settings": dict(d.feature_settings)}
