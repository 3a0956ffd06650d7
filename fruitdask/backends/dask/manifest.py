"""The listing as a Parquet manifest that tasks read, instead of data scattered to workers.

The client writes the listing once, one row group per partition, into the run's staging
prefix (:func:`write_manifest`); each partition of the run's Dask DataFrame is a task that
reads its own row group back (:func:`read_part`, through ``dd.from_map``). A partition lost
with a worker is simply read again, and the task graph stays small however many paths the
lake holds (a task carries a URL and a number, not its paths).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fruitdask import storage

SCHEMA = pa.schema([("path", pa.string()), ("label", pa.string())])


def write_manifest(parts: Sequence[pd.DataFrame], url: str, storage_options: Mapping[str, Any] | None) -> int:
    """Write ``parts`` (frames of ``path, label``) as one Parquet file, one row group each;
    return the number of row groups."""
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, SCHEMA, compression="snappy") as writer:
        for part in parts:
            table = pa.Table.from_pandas(part[["path", "label"]], schema=SCHEMA, preserve_index=False)
            writer.write_table(table, row_group_size=max(1, len(part)))
    storage.write_file(url, buf.getvalue(), storage_options)
    return len(parts)


def read_part(index: int, url: str, storage_options: Mapping[str, Any] | None) -> pd.DataFrame:
    """Row group ``index`` of the manifest at ``url`` as a ``path, label`` frame (on a worker)."""
    fs, path = storage.get_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(index)
    except OSError as e:
        raise storage.translate(e, url) from e
    return table.to_pandas()
