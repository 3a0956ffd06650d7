"""The columns of every table fruitdask writes, in one place (pyarrow only).

- a featurized partition (:func:`fruitdask.features.frames.featurize_frame`, a ``--resume``
  checkpoint): :data:`FEATURES_SCHEMA`;
- the skipped images (``path, label, stage, reason``) and ``errors.parquet`` (the same, plus
  where each image came from and the run that tried it): :data:`SKIPPED_SCHEMA`,
  :data:`ERRORS_SCHEMA`;
- the features table (``OUTPUT/features``, Delta Lake): :data:`TABLE_SCHEMA`;
- the listing the client spills to its disk and the manifest handed to the tasks:
  :data:`SPILL_SCHEMA`, :data:`MANIFEST_SCHEMA`.

Everything else derives from these: the column lists (``*_COLUMNS``), the Spark DDL
(:func:`spark_ddl`), the pandas frames of :mod:`fruitdask.features.frames`. The writers
(Dask tasks, Spark executors) and the readers (the classifier, the report, ``fruitdask
table``) import them from here, so they cannot drift apart.
"""

from __future__ import annotations

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
FEATURES_COLUMNS = FEATURES_SCHEMA.names

#: The features table (``OUTPUT/features``, Delta Lake): one row per current image.
TABLE_SCHEMA = pa.schema(
    [
        ("image_key", STRING),  # the image's path relative to the input root: stable
        ("path", STRING),  # where it was read (full path or URL)
        ("label", STRING),
        ("source_version", STRING),  # size + ETag (S3) or size + mtime (local) when listed
        ("settings", STRING),  # fingerprint of the feature settings (lake.keys.settings_fingerprint)
        ("run_id", STRING),  # the run that featurized it
        ("featurized_at", pa.timestamp("us", tz="UTC")),
        ("features", FLOAT_LIST),
        ("pca", FLOAT_LIST),
        ("pca_fit", STRING),  # the PCA fit that made ``pca`` (OUTPUT/pca/<pca_fit>.npz)
    ]
)
TABLE_COLUMNS = TABLE_SCHEMA.names

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

_SPARK_TYPES = {
    pa.string(): "STRING", pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.int32(): "INT",
    pa.int64(): "BIGINT", pa.bool_(): "BOOLEAN",
}


def spark_type(t: pa.DataType) -> str:
    """The Spark SQL type of Arrow type ``t`` (the types the schemas above use)."""
    if pa.types.is_list(t):
        return f"ARRAY<{spark_type(t.value_type)}>"
    if pa.types.is_timestamp(t):
        return "TIMESTAMP"  # Spark keeps instants in UTC, as the table's tz="UTC" column does
    if t in _SPARK_TYPES:
        return _SPARK_TYPES[t]
    raise TypeError(f"no Spark type for Arrow type {t}: add it to fruitdask.schema._SPARK_TYPES")


def spark_ddl(schema: pa.Schema) -> str:
    """``schema`` as a Spark DDL string (``path STRING, features ARRAY<FLOAT>, ...``), e.g.
    for ``spark.read.schema(...)`` on a run's Parquet files or ``errors.parquet``."""
    return ", ".join(f"{f.name} {spark_type(f.type)}" for f in schema)


FEATURES_DDL = spark_ddl(FEATURES_SCHEMA)
TABLE_DDL = spark_ddl(TABLE_SCHEMA)
ERRORS_DDL = spark_ddl(ERRORS_SCHEMA)
