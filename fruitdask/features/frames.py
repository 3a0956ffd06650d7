"""Per-partition work on pandas frames, shared by the Dask and Spark backends.

A partition is a frame of ``path, label``. :func:`featurize_frame` reads its images (through
:mod:`fruitdask.storage`), featurizes them with the pure functions of
:mod:`fruitdask.features.featurize`, and returns ``path, label, features, error_stage, error_reason``
where ``features`` is a real Arrow ``list<float32>`` column: it reaches Parquet as numbers,
never as the strings an object column of numpy arrays turns into.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from fruitdask import storage
from fruitdask.features import featurize, model
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsSource
from fruitdask.schema import FEATURES_SCHEMA, FLOAT_LIST, FRAME_ERRORS

logger = logging.getLogger(__name__)

FLOAT_LIST_DTYPE = pd.ArrowDtype(FLOAT_LIST)
STRING_DTYPE = pd.ArrowDtype(pa.string())

def list_column(matrix: np.ndarray | None, n: int, index: pd.Index, valid: np.ndarray | None = None) -> pd.Series:
    """An Arrow ``list<float32>`` series of ``n`` rows from a ``(n_valid, d)`` matrix.

    Rows where ``valid`` is False are null.
    """
    if valid is None:
        valid = np.ones(n, dtype=bool)
    d = 0 if matrix is None or matrix.size == 0 else matrix.shape[1]
    lengths = np.where(valid, d, 0)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).ravel() if d else np.zeros(0, np.float32))
    arr = pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~valid))
    return pd.Series(pd.arrays.ArrowExtensionArray(arr), index=index, name=None)


def matrix(series: pd.Series) -> np.ndarray:
    """``(n, d)`` float32 matrix from a non-null ``list<float32>`` series."""
    if len(series) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    arr = pa.array(series)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(series), -1).astype(np.float32, copy=False)


def features_meta() -> pd.DataFrame:
    """Empty frame with the columns and dtypes :func:`featurize_frame` returns
    (:data:`fruitdask.schema.FEATURES_SCHEMA`)."""
    return pd.DataFrame({f.name: pd.Series([], dtype=pd.ArrowDtype(f.type)) for f in FEATURES_SCHEMA})


def read_many(paths: list[str], storage_options: Mapping[str, Any] | None) -> tuple[list[bytes | None], dict[int, str]]:
    """Read each file; a file that cannot be read is ``None`` with its reason."""
    contents: list[bytes | None] = []
    errors: dict[int, str] = {}
    for i, p in enumerate(paths):
        try:
            contents.append(storage.read_bytes(p, storage_options))
        except OSError as e:
            contents.append(None)
            errors[i] = f"cannot read file: {e}"
    return contents, errors


def assemble(df: pd.DataFrame, result: featurize.BatchResult, read_errors: dict[int, str]) -> pd.DataFrame:
    """Join a batch result back onto its ``path, label`` rows (errors keep their row)."""
    n = len(df)
    valid = np.zeros(n, dtype=bool)
    valid[result.ok] = True
    full = np.zeros((n, result.features.shape[1] if result.features.size else 0), dtype=np.float32)
    if result.features.size:
        full[valid] = result.features
    stage: list[str | None] = [None] * n
    reason: list[str | None] = [None] * n
    for i, msg in read_errors.items():
        stage[i], reason[i] = "read", msg
    for i, st, msg in result.errors:
        stage[i], reason[i] = st, msg
    return pd.DataFrame(
        {
            "path": pd.Series(df["path"].to_numpy(), index=df.index, dtype=STRING_DTYPE),
            "label": pd.Series(df["label"].to_numpy(), index=df.index, dtype=STRING_DTYPE),
            "features": list_column(full[valid], n, df.index, valid),
            "error_stage": pd.Series(stage, index=df.index, dtype=STRING_DTYPE),
            "error_reason": pd.Series(reason, index=df.index, dtype=STRING_DTYPE),
        }
    )


def featurize_frame(
    df: pd.DataFrame,
    weights: WeightsSource,
    settings: FeatureSettings,
    *,
    threads: int | None = None,
    contents: Sequence[bytes | None] | None = None,
) -> pd.DataFrame:
    """Read, decode and featurize one partition of ``path, label`` rows.

    Parameters
    ----------
    weights
        Where the weights come from; each worker process loads them once
        (:func:`fruitdask.features.model.cached_runtime`).
    settings
        What decides the features, and the ``storage_options`` the images are read with.
    threads
        The runtime's threads in this worker (a runtime value, not a setting).
    contents
        The images' bytes when the caller already read them (Spark's ``binaryFile``); a
        ``None`` entry is read here through :mod:`fruitdask.storage`.
    """
    if len(df) == 0:
        return features_meta()
    s = settings
    runtime = model.cached_runtime(weights, s, threads)
    if contents is None:
        contents, read_errors = read_many(list(df["path"]), s.storage_options)
    else:
        contents, read_errors = _read_missing(df, list(contents), s.storage_options)
    result = featurize.featurize_bytes(runtime, contents, s.image_size, s.pooling, s.batch_size)
    return assemble(df, result, read_errors)


def _read_missing(
    df: pd.DataFrame, contents: list[bytes | None], storage_options: Mapping[str, Any] | None
) -> tuple[list[bytes | None], dict[int, str]]:
    """Fill the ``None`` entries of ``contents`` by reading their paths."""
    missing = [i for i, c in enumerate(contents) if c is None]
    if not missing:
        return contents, {}
    read, errs = read_many([df["path"].iloc[i] for i in missing], storage_options)
    for j, i in enumerate(missing):
        contents[i] = read[j]
    return contents, {missing[j]: msg for j, msg in errs.items()}


def split_rows(df):
    """The good rows (``path, label, features``) and the skipped ones (``path, label, stage,
    reason``) of a featurized frame.

    For the classifier, which featurizes its test images and its non-fruit pictures as frames
    (the pipeline's tasks split their receipts in :mod:`fruitdask.lake.tasks`)."""
    ok = df["error_stage"].isna()
    errors = df[~ok][["path", "label", *FRAME_ERRORS]].rename(columns=FRAME_ERRORS)
    return df[ok][["path", "label", "features"]], errors
