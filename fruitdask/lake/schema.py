"""The columns of what a run writes: the features table and the errors file.

One place for them, so the writers (Dask tasks, Spark executors) and the readers (the
classifier, the report, ``fruitdask table``) agree.
"""

from __future__ import annotations

import pyarrow as pa

FLOAT_LIST = pa.list_(pa.float32())

#: The features table (``OUTPUT/features``, Delta Lake): one row per current image.
TABLE_SCHEMA = pa.schema(
    [
        ("image_key", pa.string()),  # the image's path relative to the input root: stable
        ("path", pa.string()),  # where it was read (full path or URL)
        ("label", pa.string()),
        ("source_version", pa.string()),  # size + ETag (S3) or size + mtime (local) when listed
        ("settings", pa.string()),  # fingerprint of the feature settings (lake.keys.settings_fingerprint)
        ("run_id", pa.string()),  # the run that featurized it
        ("featurized_at", pa.timestamp("us", tz="UTC")),
        ("features", FLOAT_LIST),
        ("pca", FLOAT_LIST),
        ("pca_fit", pa.string()),  # the PCA fit that made ``pca`` (OUTPUT/pca/<pca_fit>.npz)
    ]
)
TABLE_COLUMNS = TABLE_SCHEMA.names

#: ``errors.parquet``: the current images that could not be used, one row each.
ERRORS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("image_key", pa.string()),
        ("source_version", pa.string()),
        ("run_id", pa.string()),
    ]
)
ERROR_COLUMNS = ERRORS_SCHEMA.names

#: Stages whose failure may not repeat (a storage hiccup): retried by every run. Other
#: failures (a file that does not decode) are retried when the file changes.
TRANSIENT_STAGES = frozenset({"read"})

#: The listing as the client spills it to its disk while listing.
SPILL_SCHEMA = pa.schema(
    [("path", pa.string()), ("label", pa.string()), ("image_key", pa.string()), ("source_version", pa.string())]
)
#: The manifest handed to the tasks (one row group per partition): the images to featurize,
#: each ``added`` (new to the table) or ``updated`` (its source changed).
MANIFEST_SCHEMA = SPILL_SCHEMA.append(pa.field("change", pa.string()))
