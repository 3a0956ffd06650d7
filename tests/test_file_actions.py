"""A data file travels as one typed :class:`FileAction` from the task that writes it to the
commit, and becomes delta-rs' own action only there; receipts are typed rows that cross a
Dask DataFrame and come back unchanged.

These tests fail on the code before the typed carriers: ``write_file`` returned a dict
(``{"file": ...}``), ``FileAction`` and ``Receipt`` did not exist."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from deltalake.transaction import AddAction, RemoveAction

from fruitdask.lake import table as delta
from fruitdask.lake import tasks
from fruitdask.lake.actions import FileAction
from fruitdask.lake.keys import hash_keys
from fruitdask.schema import TABLE_SCHEMA


def _rows(keys: list[str]) -> pa.Table:
    n = len(keys)
    return pa.table({"image_key": keys, "path": [f"/in/{k}" for k in keys], "label": [k.split("/")[0] for k in keys],
                     "source_version": ["1:1"] * n, "settings": ["s"] * n, "run_id": ["r"] * n,
                     "featurized_at": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
                     "features": tasks._list_array(np.ones((n, 4), np.float32)),
                     "pca": tasks._list_array(np.ones((n, 2), np.float32)), "pca_fit": ["f"] * n}, schema=TABLE_SCHEMA)


def test_a_written_file_round_trips_to_delta_rs_actions_and_into_the_log(tmp_path):
    out = tmp_path / "out"
    sink = tasks.Sink(delta.table_url(str(out)), "r", "s", {})
    written = tasks.write_file(_rows(["A/1.jpg", "B/2.jpg"]), sink, "part-r-n00000.parquet")
    assert isinstance(written, FileAction)
    assert written.path == "part-r-n00000.parquet" and written.rows == 2 and written.data_change
    assert written.size == (out / "features" / written.path).stat().st_size
    stats = json.loads(written.stats or "")
    assert stats["numRecords"] == 2 and stats["minValues"]["image_key"] == "A/1.jpg"

    add = written.add_action()
    assert isinstance(add, AddAction)
    assert (add.path, add.size, dict(add.partition_values), add.modification_time, add.data_change, add.stats) == (
        written.path, written.size, {}, written.modification_time, True, written.stats)
    removed = FileAction("part-old.parquet", 123).remove_action(deletion_timestamp=42)
    assert isinstance(removed, RemoveAction)
    assert (removed.path, removed.data_change, removed.deletion_timestamp, removed.size) == ("part-old.parquet", True, 42, 123)
    with pytest.raises(ValueError, match="statistics"):
        FileAction("part-x.parquet", 1).add_action()  # a file is never added without its stats

    # Committed, the log holds the action as the task described it.
    assert delta.commit(delta.open_table(str(out), {}), [written], [], {"run_id": "r"},
                        row_keys=hash_keys(["A/1.jpg", "B/2.jpg"])) == 0
    log = pa.table(delta.load(str(out), {}).get_add_actions(flatten=True)).to_pylist()
    assert [(a["path"], a["size_bytes"], a["num_records"], a["modification_time"]) for a in log] == [
        (written.path, written.size, 2, written.modification_time)]

    # The next commit removes it through the same type, with path and size only.
    second = tasks.write_file(_rows(["A/1.jpg"]), tasks.Sink(sink.table_url, "r2", "s", {}), "part-r2-n00000.parquet")
    state = delta.open_table(str(out), {})
    assert delta.commit(state, [second], [FileAction(written.path, written.size)], {"run_id": "r2"},
                        row_keys=hash_keys(["A/1.jpg"])) == 1
    assert [u.rsplit("/", 1)[-1] for u in delta.load(str(out), {}).file_uris()] == [second.path]


def test_receipts_cross_a_dataframe_and_come_back_as_the_same_typed_rows():
    written = FileAction("part-r-n00003.parquet", 2048, 5, '{"numRecords": 5}', 1_700_000_000_123)
    receipts = [
        tasks.Receipt(tasks.ReceiptKind.FILE, 3, file=written, rows=5, added=4, updated=1),
        tasks.Receipt(tasks.ReceiptKind.STAGED, 4, checkpoint="/ckpt/part-4.parquet", rows=7, added=7),
        tasks.Receipt(tasks.ReceiptKind.ERROR, failed={"path": "/in/A/x.jpg", "label": "A", "stage": "decode",
                                                       "reason": "not an image", "image_key": "A/x.jpg",
                                                       "source_version": "1:1"}),
    ]
    frame = tasks.receipts_frame(receipts)
    assert list(frame.columns) == tasks.RECEIPT_COLUMNS and list(frame["kind"]) == ["file", "staged", "error"]
    assert tasks.receipts_of(frame) == receipts
    assert tasks.receipts_of(tasks.receipt_meta()) == []
    failed = tasks.failed_images(receipts)
    assert list(failed.columns) == tasks.FAILED_COLUMNS and failed["image_key"].tolist() == ["A/x.jpg"]
