"""The columns of every table fruitdask writes, in one place (pyarrow only).

- a featurized partition (:func:`fruitdask.features.frames.featurize_frame`, a ``--resume``
  checkpoint): :data:`FEATURES_SCHEMA`;
- the skipped images (``path, label, stage, reason``) and ``errors.parquet`` (the same, plus
  where each image came from and the run that tried it): :data:`SKIPPED_SCHEMA`,
  :data:`ERRORS_SCHEMA`;
- the features table (``OUTPUT/features``, Delta Lake): :data:`TABLE` declares each column
  with the value of rows that predate it, :data:`TABLE_SCHEMA` derives from it;
- the listing the client spills to its disk and the manifest handed to the tasks:
  :data:`SPILL_SCHEMA`, :data:`MANIFEST_SCHEMA`.

Everything else derives from these: the column lists (``*_COLUMNS``), the pandas frames of
:mod:`fruitdask.features.frames` (the Spark backend runs the same task bodies over an RDD
of partition numbers, :mod:`fruitdask.lake.tasks`: no Spark schema is needed). The writers (Dask tasks, Spark executors) import the schemas from
here; a reader names the table columns it reads, and checks them against the schema
through :func:`table_columns` (``lake.table.read_columns``, ``classifier.candidate``), so
a renamed column fails where it is read, not later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

FLOAT_LIST = pa.list_(pa.float32())
STRING = pa.string()

#: An image that could not be used: where it is, its label, the stage that failed
#: (``list``, ``read``, ``decode``...) and why.
SKIPPED_SCHEMA = pa.schema([("path", STRING), ("label", STRING), ("stage", STRING), ("reason", STRING)])
SKIPPED_COLUMNS = SKIPPED_SCHEMA.names

#: A featurized partition's error columns, and the skipped-row column each one becomes.
FRAME_ERRORS = {"error_stage": "stage", "error_reason": "reason"}

#: A featurized partition, errors included (null ``features`` and an ``error_stage`` for an
#: image that failed): what every backend's tasks return and a checkpoint holds.
FEATURES_SCHEMA = pa.schema(
    [("path", STRING), ("label", STRING), ("features", FLOAT_LIST),
     *((frame, SKIPPED_SCHEMA.field(skipped).type) for frame, skipped in FRAME_ERRORS.items())]
)

@dataclass(frozen=True)
class TableColumn:
    """A column of the features table, and the value of rows written before it existed:
    ``backfill`` computes it from a table's other columns (an Arrow table in, an array out),
    else every such row gets ``default``. The columns of the table's first format need
    neither. See :func:`complete_table`."""

    name: str
    type: pa.DataType
    default: Any = None
    backfill: Callable[[pa.Table], pa.Array | pa.ChunkedArray] | None = None

    @property
    def field(self) -> pa.Field:
        return pa.field(self.name, self.type)

    def fill(self, table: pa.Table) -> pa.Array | pa.ChunkedArray:
        """This column's values for the rows of ``table``, which lacks it."""
        if self.backfill is not None:
            return self.backfill(table).cast(self.type)
        return pa.array([self.default] * table.num_rows, self.type)


#: The features table (``OUTPUT/features``, Delta Lake): one row per current image. A column
#: added here reaches existing tables without featurizing them again: the next run adds it by
#: Delta schema evolution and fills old rows (:mod:`fruitdask.lake.migrate`), and the rows a
#: run writes get it the same way (:func:`complete_table`) unless the writer sets it.
TABLE: tuple[TableColumn, ...] = (
    TableColumn("image_key", STRING),  # the image's path relative to the input root: stable
    TableColumn("path", STRING),  # where it was read (full path or URL)
    TableColumn("label", STRING),
    TableColumn("source_version", STRING),  # size + ETag (S3) or size + mtime (local) when listed
    TableColumn("settings", STRING),  # fingerprint of the feature settings (lake.keys.settings_fingerprint)
    TableColumn("run_id", STRING),  # the run that featurized it
    TableColumn("featurized_at", pa.timestamp("us", tz="UTC")),
    TableColumn("features", FLOAT_LIST),
    TableColumn("pca", FLOAT_LIST),
    TableColumn("pca_fit", STRING),  # the PCA fit that made ``pca`` (OUTPUT/pca/<pca_fit>.npz)
)
TABLE_SCHEMA = pa.schema([c.field for c in TABLE])


def complete_table(table: pa.Table) -> pa.Table:
    """Rows of the features table with every column of :data:`TABLE` they lack filled
    (:meth:`TableColumn.fill`, in :data:`TABLE`'s order, so that a backfill may read a column
    filled before it), as :data:`TABLE_SCHEMA` orders and types them."""
    for column in TABLE:
        if column.name not in table.column_names:
            table = table.append_column(column.field, column.fill(table))
    return table.select(TABLE_SCHEMA.names).cast(TABLE_SCHEMA)


#: ``errors.parquet``: the current images that could not be used, one row each.
ERRORS_SCHEMA = pa.schema(
    [*SKIPPED_SCHEMA, *(TABLE_SCHEMA.field(name) for name in ("image_key", "source_version", "run_id"))]
)
ERROR_COLUMNS = ERRORS_SCHEMA.names

#: Stages whose failure may not repeat (a storage hiccup): retried by every run. Other
#: failures (a file that does not decode) are retried when the file changes.
TRANSIENT_STAGES = frozenset({"read"})

#: The listing as the client spills it to its disk while listing.
SPILL_SCHEMA = pa.schema([TABLE_SCHEMA.field(name) for name in ("path", "label", "image_key", "source_version")])
#: The manifest handed to the tasks (one row group per partition): the images to featurize,
#: each ``added`` (new to the table) or ``updated`` (its source changed).
MANIFEST_SCHEMA = SPILL_SCHEMA.append(pa.field("change", STRING))


def table_columns(names: list[str] | None = None) -> pa.Schema:
    """The features table's schema cut to ``names`` (all columns when ``None``), in that order."""
    return pa.schema([TABLE_SCHEMA.field(name) for name in names or TABLE_SCHEMA.names])
