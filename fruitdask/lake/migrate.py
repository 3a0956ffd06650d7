"""Columns declared since a table was written: added in place, once, without featurizing.

A column of :data:`fruitdask.schema.TABLE` that an existing table lacks is added by the next
run, before it re-keys or lists, in **one** commit of its own: every data file is rewritten
on the client, a file at a time, with the missing columns filled as
:class:`fruitdask.schema.TableColumn` says (a backfill from the row's other columns, or a
default), and the table's schema evolves to :data:`fruitdask.schema.TABLE_SCHEMA` in the same
commit (Delta's ``metaData`` action: delta-rs writes it for an overwrite whose schema
differs). Keys, features, PCA values and fit, and each row's ``run_id`` and
``featurized_at`` stay as they were; the table's description, and the last run's commit
description (carried on, as a re-key does), too. The commit's ``operation`` is
``add_columns``, with the columns it added.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from fruitdask import schema, storage
from fruitdask.lake import keys, tasks
from fruitdask.lake import table as delta
from fruitdask.lake.actions import FileAction

logger = logging.getLogger(__name__)

OPERATION = "add_columns"


def missing_columns(state: delta.TableState) -> list[str]:
    """The columns of the features table's schema that the table at ``state`` lacks."""
    if not state.exists:
        return []
    have = {f.name for f in state.table.schema().fields}
    return [name for name in schema.TABLE_SCHEMA.names if name not in have]


def add_columns(state: delta.TableState, target: storage.OutputTarget) -> delta.TableState:
    """Add the missing declared columns to the table of ``target`` read at ``state`` (see the
    module's docstring), under the output's lock; return the table as it is now (``state``
    itself when nothing was missing)."""
    missing = missing_columns(state)
    if not missing:
        return state
    sink = tasks.Sink(state.url, f"columns-{target.run_id}", str(state.meta.get("settings", "")), dict(state.storage_options))
    adds: list[FileAction] = []
    hashes = []
    try:
        for i, uri in enumerate(state.files()):
            rows = tasks.read_file(sink, delta.relative(state, uri))  # filled: tasks.read_file completes the columns
            written = tasks.write_file(rows, sink, f"part-{sink.run_id}-c{i:05d}.parquet")
            adds.append(written)
            hashes.append(keys.hash_keys(rows.column("image_key").to_pylist()))
        target.ensure_held()
        version = _commit(state, adds, np.concatenate(hashes) if hashes else np.zeros(0, "S16"), missing, sink.run_id)
    except BaseException:
        for a in adds:  # written a moment ago, in no version
            storage.remove_prefix(sink.file_url(a.path), sink.storage_options)
        raise
    logger.info("the table at %s gained the column(s) %s (version %s -> %d): %d files rewritten with their rows' "
                "values filled; nothing featurized", state.url, ", ".join(missing), state.version, version, len(adds))
    return delta.open_table(target.url, state.storage_options)


def _commit(state: delta.TableState, adds: list[FileAction], row_keys: np.ndarray, missing: list[str], run_id: str) -> int:
    """One overwrite of the version read: ``adds`` replace every file, under the new schema
    (no retries: another writer's commit in between fails it, as a run's does)."""
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import CommitProperties

    delta.check_unique_keys(row_keys, state.url)
    meta = {**state.meta, "run_id": run_id, "operation": OPERATION, "columns": missing}
    props = CommitProperties(custom_metadata={delta.META_KEY: json.dumps(meta, sort_keys=True, default=str)},
                             max_commit_retries=0)
    actions = [a.add_action() for a in adds]
    try:
        delta._reopened(state).create_write_transaction(actions, mode="overwrite", schema=schema.TABLE_SCHEMA,
                                                       commit_properties=props)
    except (CommitFailedError, DeltaError) as e:
        raise delta._commit_error(state, e) from e
    assert state.version is not None  # an existing table was read at a version
    return state.version + 1
