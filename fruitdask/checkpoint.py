"""Checkpoints of featurized partitions, so that ``--resume`` skips VGG16 for done work.

Every featurized partition is written, by the task that computed it, to a deterministic
prefix beside the output::

    <parent>/.<name>.fruitdask-checkpoint/<fingerprint>/part-<digest>.parquet

``fingerprint`` hashes what decides the features (weights digest, image size, pooling,
precision, runtime, format version) and the batch size (:func:`fingerprint`); ``digest`` hashes the partition's own ``path, label``
rows and the version of each file as listed (``source_version``: size and ETag on S3, size and
mtime locally), so a checkpoint never outlives a change of its files: a file fixed or replaced
in place between a failed run and ``--resume`` is featurized again.
A run that dies after featurization (during the PCA, the write or the commit) leaves the
checkpoints in place (:meth:`fruitdask.storage.OutputTarget.abort` only removes the run's
own staging prefix), and the same command with ``--resume`` reads them back instead of
running the model. A partition whose rows changed gets another digest and is computed
again; a checkpoint that cannot be read is ignored and recomputed. A committed run removes
the checkpoints (:func:`clear`).

All storage goes through :mod:`fruitdask.storage`; the functions here run on workers.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

from fruitdask import storage
from fruitdask.features import frames
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsSource
from fruitdask.schema import FEATURES_SCHEMA
from fruitdask.storage.paths import checkpoint_root  # a hidden sibling of the output, like its staging

logger = logging.getLogger(__name__)

#: Bumped when the checkpoint layout or the meaning of its columns changes.
FORMAT_VERSION = 1


def fingerprint(settings: FeatureSettings) -> str:
    """The name of a run's checkpoints: :meth:`FeatureSettings.checkpoint_key` under this
    checkpoint format. Unlike the table's fingerprint it keeps the batch size (see there: a
    resumed partition must be what this run computes, bit for bit); not the rows, nor the
    storage options they are read with."""
    return settings.checkpoint_key(f"v{FORMAT_VERSION}")


def partition_digest(df: pd.DataFrame) -> str:
    """Hash of a partition's ``path, label`` rows and, when the partition has them, its
    files' ``source_version`` (a manifest partition always does), in order."""
    h = hashlib.sha256()
    versions = df["source_version"] if "source_version" in df else [None] * len(df)
    for path, label, version in zip(df["path"], df["label"], versions, strict=True):
        h.update(f"{path}\0{label}\n".encode() if version is None else f"{path}\0{label}\0{version}\n".encode())
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class Checkpoints:
    """Where one run's partitions are checkpointed, and whether to read them back.

    Small and picklable: it travels to the workers inside each featurize task.
    """

    prefix: str
    resume: bool
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def part_url(self, df: pd.DataFrame) -> str:
        return storage.join(self.prefix, f"part-{partition_digest(df)}.parquet")

    def load(self, df: pd.DataFrame) -> pd.DataFrame | None:
        """The checkpointed result of partition ``df``, or None when there is none usable."""
        import pyarrow.parquet as pq

        url = self.part_url(df)
        try:
            data = storage.read_bytes(url, self.storage_options)
        except FileNotFoundError:
            return None
        except OSError as e:
            logger.warning("cannot read checkpoint %s (%s): computing the partition again", url, e)
            return None
        try:
            table = pq.read_table(io.BytesIO(data), schema=FEATURES_SCHEMA)
        except (pa.ArrowException, OSError, ValueError) as e:
            # A worker killed mid-write leaves a torn file; recomputing is always safe.
            logger.warning("checkpoint %s is damaged (%s): computing the partition again", url, e)
            return None
        out = table.to_pandas(types_mapper=pd.ArrowDtype)
        if list(out["path"]) != list(df["path"]):
            logger.warning("checkpoint %s holds other rows: computing the partition again", url)
            return None
        out.index = df.index
        return out

    def save(self, result: pd.DataFrame, df: pd.DataFrame) -> None:
        """Write the featurized partition; a failed write only costs a recompute on resume."""
        url = self.part_url(df)
        try:
            storage.write_parquet_part(result, url, FEATURES_SCHEMA, self.storage_options)
        except OSError as e:
            logger.warning("could not checkpoint %s (%s): a --resume would compute it again", url, e)


def for_run(target: storage.OutputTarget, settings: FeatureSettings, resume: bool) -> Checkpoints:
    """The :class:`Checkpoints` of a run featurizing with ``settings`` into ``target``."""
    return Checkpoints(
        prefix=storage.join(checkpoint_root(target.url), fingerprint(settings)),
        resume=bool(resume),
        storage_options=dict(target.storage_options),
    )


def featurize_checkpointed(
    df: pd.DataFrame,
    weights: WeightsSource,
    settings: FeatureSettings,
    checkpoints: Checkpoints | None,
    *,
    threads: int | None = None,
) -> pd.DataFrame:
    """Featurize one partition, reusing its checkpoint when resuming, and checkpoint it.

    Parameters
    ----------
    df
        A partition of ``path, label`` rows, with the files' ``source_version`` (part of the
        checkpoint's name: see :func:`partition_digest`).
    weights, settings, threads
        Passed on to :func:`fruitdask.features.frames.featurize_frame`.
    checkpoints
        None to neither read nor write checkpoints.
    """
    rows = df[["path", "label"]]
    if checkpoints is None or len(df) == 0:
        return frames.featurize_frame(rows, weights, settings, threads=threads)
    if checkpoints.resume:
        cached = checkpoints.load(df)
        if cached is not None:
            logger.info("reused checkpoint of %d images", len(df))
            return cached
    result = frames.featurize_frame(rows, weights, settings, threads=threads)
    checkpoints.save(result, df)
    return result


def clear(target: storage.OutputTarget) -> None:
    """Remove an output's checkpoints once its dataset is committed."""
    storage.remove_prefix(checkpoint_root(target.url), target.storage_options)
