"""What runs on a worker (Dask) or an executor (Spark): each body reads and writes files
of bounded size, and returns a small receipt, never the features.

- :func:`featurize_part`: one manifest partition through VGG16 (checkpointed, see
  :mod:`fruitdask.checkpoint`), then, when the PCA fit is known, projected and written as
  a data file of the table; otherwise left in its checkpoint until the fit is made.
- :func:`moments_part`, :func:`moments_file`: the PCA moments of a checkpointed partition or
  of the rows a table file keeps (:mod:`fruitdask.pca_moments`).
- :func:`project_part`: a checkpointed partition projected and written into the table.
- :func:`rewrite_file`: a table file without the rows that leave it (removed or changed
  images), re-projected when the PCA was refitted.

Each file written is returned as a :class:`~fruitdask.lake.actions.FileAction` (what the
commit adds); a featurize task returns its partition's :class:`Receipt` rows.

Data files are named ``part-<run_id>-<n|p|r><index>.parquet`` under the table root: a run
killed before its commit leaves files that no version names (removed by a vacuum).
"""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fruitdask import checkpoint, storage
from fruitdask.features import frames
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsSource
from fruitdask.lake.actions import FileAction
from fruitdask.pca_moments import Moments
from fruitdask.reduce import Reduction
from fruitdask.schema import ERROR_COLUMNS, MANIFEST_SCHEMA, TABLE_SCHEMA, complete_table

#: A manifest partition's columns that name its checkpoint: the rows and their files' versions.
CHECKPOINT_KEY = ["path", "label", "source_version"]
#: The columns of a failed image's receipt: those of ``errors.parquet`` but the run id.
FAILED_COLUMNS = [c for c in ERROR_COLUMNS if c != "run_id"]


class ReceiptKind(Enum):
    """What a receipt row says of its partition."""

    FILE = "file"  # a data file written into the table
    STAGED = "staged"  # the good rows wait in their checkpoint for the PCA fit
    ERROR = "error"  # one image that could not be used


@dataclass(frozen=True)
class Receipt:
    """One row of a featurize task's receipt (small: never the features).

    ``file``: the data file written (``FILE``); ``checkpoint``: the checkpoint holding the
    partition's features (``STAGED``); ``rows``: good rows written or staged; ``added`` and
    ``updated``: of those, the new and the changed images; ``failed``: the failed image's
    fields (``ERROR``: :data:`FAILED_COLUMNS`).
    """

    kind: ReceiptKind
    part: int | None = None
    file: FileAction | None = None
    checkpoint: str | None = None
    rows: int = 0
    added: int = 0
    updated: int = 0
    failed: Mapping[str, Any] | None = None


#: The columns of :func:`receipts_frame` (the form receipts take through a Dask DataFrame).
RECEIPT_COLUMNS = ["kind", "part", "file", "size", "rows", "stats", "modification_time", "added", "updated",
                   *FAILED_COLUMNS]
_NUMBERS = ("part", "size", "rows", "modification_time", "added", "updated")


def receipts_frame(receipts: list[Receipt]) -> pd.DataFrame:
    """Receipts as a DataFrame, to cross a Dask DataFrame (``map_partitions``); the inverse of
    :func:`receipts_of`. ``file`` holds a data file's path or a checkpoint's URL."""
    rows = []
    for r in receipts:
        row: dict[str, Any] = {"kind": r.kind.value, "part": r.part, "rows": r.rows, "added": r.added,
                               "updated": r.updated, **dict(r.failed or {})}
        if r.file is not None:
            row.update(file=r.file.path, size=r.file.size, stats=r.file.stats, modification_time=r.file.modification_time)
        elif r.checkpoint is not None:
            row["file"] = r.checkpoint
        rows.append(row)
    frame = pd.DataFrame(rows, columns=RECEIPT_COLUMNS)
    return frame.astype({c: ("float64" if c in _NUMBERS else object) for c in RECEIPT_COLUMNS})


def receipts_of(frame: pd.DataFrame) -> list[Receipt]:
    """The receipts a :func:`receipts_frame` holds."""
    out = []
    for row in frame.to_dict("records"):
        kind = ReceiptKind(row["kind"])
        part = None if pd.isna(row["part"]) else int(row["part"])
        if kind is ReceiptKind.ERROR:
            out.append(Receipt(kind, part, failed={c: row[c] for c in FAILED_COLUMNS}))
            continue
        rows, added, updated = int(row["rows"]), int(row["added"]), int(row["updated"])
        if kind is ReceiptKind.FILE:
            action = FileAction(str(row["file"]), int(row["size"]), rows, row["stats"], int(row["modification_time"]))
            out.append(Receipt(kind, part, file=action, rows=rows, added=added, updated=updated))
        else:
            out.append(Receipt(kind, part, checkpoint=str(row["file"]), rows=rows, added=added, updated=updated))
    return out


def receipt_meta() -> pd.DataFrame:
    """:func:`receipts_frame` of no receipt: Dask's ``meta`` for the featurize tasks."""
    return receipts_frame([])


@dataclass(frozen=True)
class Fit:
    """A PCA fit the tasks project with: its id and where its ``.npz`` is."""

    fit_id: str
    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def load(self) -> Reduction:
        return _cached_fit(self.url, dict(self.storage_options))


_FITS: dict[str, Reduction] = {}


def _cached_fit(url: str, storage_options: dict) -> Reduction:
    """One read of a fit per process (a worker projects many partitions with it)."""
    if url not in _FITS:
        _FITS.clear()
        _FITS[url] = Reduction.from_npz(storage.read_bytes(url, storage_options))
    return _FITS[url]


@dataclass(frozen=True)
class Sink:
    """Where a run's tasks write: the table root, the run, the settings fingerprint."""

    table_url: str
    run_id: str
    settings_fp: str  # lake.keys.settings_fingerprint: what the rows' ``settings`` column holds
    storage_options: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def file_url(self, name: str) -> str:
        return storage.join(self.table_url, name)


def read_manifest_part(index: int, url: str, storage_options: Mapping[str, Any] | None) -> pd.DataFrame:
    """Row group ``index`` of the manifest (``path, label, image_key, source_version, change``,
    and ``part``: the partition's number, which names the files its task writes)."""
    fs, path = storage.get_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(index)
    except OSError as e:
        raise storage.translate(e, url) from e
    return table.cast(MANIFEST_SCHEMA).to_pandas().assign(part=index)


def manifest_meta() -> pd.DataFrame:
    """What :func:`read_manifest_part` returns, empty: Dask's ``meta``, so that no task runs on
    the cluster to infer it (one did, behind the workers' warm-up: 0.6 s of every run)."""
    return MANIFEST_SCHEMA.empty_table().to_pandas().assign(part=pd.Series(dtype="int64"))


@dataclass(frozen=True)
class FeaturizeJob:
    """What every featurize task of a run shares, handed to the engine as one value: the
    weights, the feature settings, the checkpoints, where files go, and the PCA fit to
    project with (None while a new fit waits for every partition)."""

    weights: WeightsSource
    settings: FeatureSettings
    ckpt: checkpoint.Checkpoints
    sink: Sink
    fit: Fit | None


def featurize_part(df: pd.DataFrame, job: FeaturizeJob, index: int, threads: int | None = None) -> list[Receipt]:
    """Featurize one manifest partition; write it into the table when ``job.fit`` is given.

    Returns the receipt: a ``FILE`` row (the data file written) or a ``STAGED`` row (the
    checkpoint holding the features until the fit), and an ``ERROR`` row per failed image.
    """
    if len(df) == 0:
        return []
    ckpt, sink, fit = job.ckpt, job.sink, job.fit
    out = checkpoint.featurize_checkpointed(df[CHECKPOINT_KEY], job.weights, job.settings, ckpt, threads=threads)
    ok = out["error_stage"].isna().to_numpy()
    rows = _error_rows(df, out, ok)
    n_ok = int(ok.sum())
    changes = df["change"].to_numpy()[ok]
    added, updated = int((changes == "added").sum()), int((changes == "updated").sum())
    if fit is not None and n_ok:
        written = write_rows(df[ok], out[ok], sink, fit, f"n{index:05d}")
        rows.append(Receipt(ReceiptKind.FILE, index, file=written, rows=n_ok, added=added, updated=updated))
    elif n_ok:
        rows.append(Receipt(ReceiptKind.STAGED, index, checkpoint=ckpt.part_url(df[CHECKPOINT_KEY]), rows=n_ok,
                            added=added, updated=updated))
    return rows


def _error_rows(df: pd.DataFrame, out: pd.DataFrame, ok: np.ndarray) -> list[Receipt]:
    bad = np.flatnonzero(~ok)
    return [
        Receipt(ReceiptKind.ERROR, failed={
            "path": df["path"].iloc[i], "label": df["label"].iloc[i], "stage": out["error_stage"].iloc[i],
            "reason": out["error_reason"].iloc[i], "image_key": df["image_key"].iloc[i],
            "source_version": df["source_version"].iloc[i]})
        for i in bad
    ]


def failed_images(receipts: list[Receipt]) -> pd.DataFrame:
    """The failed images of ``receipts``, one row each (:data:`FAILED_COLUMNS`)."""
    return pd.DataFrame([dict(r.failed or {}) for r in receipts if r.kind is ReceiptKind.ERROR], columns=FAILED_COLUMNS)


def write_rows(manifest: pd.DataFrame, feats: pd.DataFrame, sink: Sink, fit: Fit, suffix: str) -> FileAction:
    """The good rows of a partition as a table data file, with their ``pca``."""
    reduction = fit.load()
    x = frames.matrix(feats["features"])
    n = len(manifest)
    now = pd.Timestamp(dt.datetime.now(dt.timezone.utc))
    # Columns a writer does not set (schema.TABLE's later ones) are filled as for older rows.
    table = complete_table(pa.table(
        {
            "image_key": pa.array(manifest["image_key"].tolist(), pa.string()),
            "path": pa.array(manifest["path"].tolist(), pa.string()),
            "label": pa.array(manifest["label"].tolist(), pa.string()),
            "source_version": pa.array(manifest["source_version"].tolist(), pa.string()),
            "settings": pa.array([sink.settings_fp] * n, pa.string()),
            "run_id": pa.array([sink.run_id] * n, pa.string()),
            "featurized_at": pa.array([now] * n, TABLE_SCHEMA.field("featurized_at").type),
            "features": _list_array(x),
            "pca": _list_array(reduction.transform(x)),
            "pca_fit": pa.array([fit.fit_id] * n, pa.string()),
        },
    ))
    return write_file(table, sink, f"part-{sink.run_id}-{suffix}.parquet")


def _list_array(x: np.ndarray) -> pa.Array:
    x = np.ascontiguousarray(x, dtype=np.float32)
    d = x.shape[1] if x.ndim == 2 else 0
    offsets = pa.array(np.arange(0, (len(x) + 1) * d, d, dtype=np.int32) if d else np.zeros(len(x) + 1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(x.ravel()), type=pa.list_(pa.float32()))


def write_file(table: pa.Table, sink: Sink, name: str) -> FileAction:
    """Write one data file under the table root; return what the commit adds."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    data = buf.getvalue()
    storage.write_file(sink.file_url(name), data, sink.storage_options)
    return FileAction(name, len(data), table.num_rows, file_stats(table))


def file_stats(table: pa.Table) -> str:
    """Delta's per-file statistics: row count, min/max and null counts of the key columns."""
    import pyarrow.compute as pc

    cols = ("image_key", "label", "run_id", "pca_fit")
    mins, maxs, nulls = {}, {}, {}
    for c in cols:
        col = table.column(c)
        nulls[c] = col.null_count
        if table.num_rows and col.null_count < table.num_rows:
            mm = pc.min_max(col)
            mins[c], maxs[c] = mm["min"].as_py(), mm["max"].as_py()
    return json.dumps({"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})


def _checkpointed(index: int, manifest_url: str, ckpt: checkpoint.Checkpoints) -> tuple[pd.DataFrame, pd.DataFrame]:
    df = read_manifest_part(index, manifest_url, ckpt.storage_options)
    out = ckpt.load(df[CHECKPOINT_KEY])
    if out is None:
        raise FileNotFoundError(f"the featurized partition {index} ({ckpt.part_url(df[CHECKPOINT_KEY])}) is gone: run again")
    ok = out["error_stage"].isna().to_numpy()
    return df[ok], out[ok]


def moments_part(index: int, manifest_url: str, ckpt: checkpoint.Checkpoints) -> Moments | None:
    """PCA moments of a checkpointed partition's good rows."""
    return Moments.of(features_part(index, manifest_url, ckpt))


def project_part(index: int, manifest_url: str, ckpt: checkpoint.Checkpoints, sink: Sink, fit: Fit) -> FileAction | None:
    """A checkpointed partition projected with ``fit`` and written into the table."""
    df, feats = _checkpointed(index, manifest_url, ckpt)
    return write_rows(df, feats, sink, fit, f"p{index:05d}") if len(df) else None


def _kept(sink: Sink, rel: str, drop_rows: np.ndarray | None) -> pa.Table:
    fs, path = storage.get_fs(sink.file_url(rel), sink.storage_options)
    try:
        with fs.open(path, "rb") as f:
            table = complete_table(pq.read_table(f))  # a file older than a column gets it filled
    except OSError as e:
        raise storage.translate(e, sink.file_url(rel)) from e
    if drop_rows is not None and len(drop_rows):
        keep = np.ones(table.num_rows, bool)
        keep[drop_rows] = False
        table = table.filter(pa.array(keep))
    return table


def read_file(sink: Sink, rel: str) -> pa.Table:
    """A table data file, whole (the re-keying of :mod:`fruitdask.lake.rekey` rewrites it)."""
    return _kept(sink, rel, None)


def moments_file(sink: Sink, rel: str, drop_rows: np.ndarray | None) -> Moments | None:
    """PCA moments of the rows a table file keeps."""
    return Moments.of(features_file(sink, rel, drop_rows))


def rewrite_file(sink: Sink, rel: str, drop_rows: np.ndarray | None, fit: Fit | None, index: int) -> FileAction | None:
    """A table file without ``drop_rows``, its ``pca`` recomputed with ``fit`` when given;
    None when no row is left."""
    table = _kept(sink, rel, drop_rows)
    if table.num_rows == 0:
        return None
    if fit is not None:
        x = frames.matrix(table.column("features").to_pandas(types_mapper=pd.ArrowDtype))
        table = table.set_column(table.schema.get_field_index("pca"), "pca", _list_array(fit.load().transform(x)))
        table = table.set_column(table.schema.get_field_index("pca_fit"), "pca_fit", pa.array([fit.fit_id] * table.num_rows, pa.string()))
    return write_file(table, sink, f"part-{sink.run_id}-r{index:05d}.parquet")


def merge_files(sink: Sink, rels: list[str], index: int) -> FileAction:
    """Small table files streamed into one, a row group each: the same rows, one input file in
    memory at a time (the run commits the merged file and removes the inputs)."""
    name = f"part-{sink.run_id}-m{index:05d}.parquet"
    url = sink.file_url(name)
    fs, path = storage.get_fs(url, sink.storage_options)
    rows, stats = 0, []
    try:
        with fs.open(path, "wb") as f, pq.ParquetWriter(f, TABLE_SCHEMA, compression="snappy") as writer:
            for rel in rels:
                table = _kept(sink, rel, None)
                writer.write_table(table)
                rows += table.num_rows
                stats.append(json.loads(file_stats(table)))
        size = fs.size(path)
    except OSError as e:
        raise storage.translate(e, url) from e
    return FileAction(name, int(size), rows, merged_stats(stats))


def merged_stats(parts: list[dict]) -> str:
    """Delta statistics of files put together: counts added, minima of minima, maxima of maxima."""
    mins: dict = {}
    maxs: dict = {}
    nulls: dict = {}
    for st in parts:
        for c, v in st["minValues"].items():
            mins[c] = v if c not in mins else min(mins[c], v)
        for c, v in st["maxValues"].items():
            maxs[c] = v if c not in maxs else max(maxs[c], v)
        for c, v in st["nullCount"].items():
            nulls[c] = nulls.get(c, 0) + v
    return json.dumps({"numRecords": sum(st["numRecords"] for st in parts), "minValues": mins, "maxValues": maxs,
                       "nullCount": nulls})


def kept_rows(sink: Sink, rel: str, drop_rows: np.ndarray | None) -> int:
    """Rows a table file keeps (from its footer)."""
    fs, path = storage.get_fs(sink.file_url(rel), sink.storage_options)
    with fs.open(path, "rb") as f:
        n = pq.ParquetFile(f).metadata.num_rows
    return n - (0 if drop_rows is None else len(drop_rows))


def features_part(index: int, manifest_url: str, ckpt: checkpoint.Checkpoints) -> np.ndarray:
    """The features matrix of a checkpointed partition's good rows."""
    _, feats = _checkpointed(index, manifest_url, ckpt)
    return frames.matrix(feats["features"])


def features_file(sink: Sink, rel: str, drop_rows: np.ndarray | None) -> np.ndarray:
    """The features matrix of the rows a table file keeps."""
    return frames.matrix(_kept(sink, rel, drop_rows).column("features").to_pandas(types_mapper=pd.ArrowDtype))
