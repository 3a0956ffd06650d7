"""The Spark backend: the seed notebook's stages on PySpark, done right, for comparison.

- Reading: the rows are the pipeline's listing. For local paths Spark's ``binaryFile``
  reader (``recursiveFileLookup``, one ``pathGlobFilter`` that matches .jpg/.jpeg/.png in
  any letter case) reads the bytes, checked against that listing so both backends see the
  same rows (timed in the featurize stage: it is Spark reading images, not listing them);
  for ``s3://`` the paths are read through :func:`fruitdask.storage.read_bytes` inside the
  executors (the hadoop-aws jars cannot be assumed).
- Weights travel once with ``sc.broadcast``; each Python worker builds its Keras model once
  (:func:`fruitdask.features.model.cached_model`) inside ``mapInArrow`` (the Arrow sibling of
  ``mapInPandas``: batches stay Arrow, so ``list<float32>`` columns never round-trip through
  pandas objects) and calls the Dask backend's partition function,
  :func:`fruitdask.features.frames.featurize_frame`, on the bytes Spark read.
- ``pyspark.ml`` ``StandardScaler`` + ``PCA``; K by the same variance rule
  (:func:`fruitdask.reduce.finish`). Spark's PCA gathers a ``d x d`` covariance on the
  driver, so a large ``d`` is refused before the session starts unless
  ``--spark-allow-large-pca``.
- Parquet parts are written by the executors through :mod:`fruitdask.storage`, with the
  same Arrow schema as the Dask backend.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
import pandas as pd
import pyarrow as pa

from fruitdask import output, storage
from fruitdask.backends.base import Featurized, n_partitions
from fruitdask.config import RunConfig
from fruitdask.errors import OutputError, ReductionError
from fruitdask.features import frames
from fruitdask.features.model import WeightsInfo
from fruitdask.features.precision import Resolved, detect_and_resolve
from fruitdask.features.settings import FeatureSettings
from fruitdask.progress import Poller, Progress
from fruitdask.reduce import Reduction, finish, plan_pca, safe_scale

logger = logging.getLogger(__name__)

#: One Hadoop glob for the extensions :data:`fruitdask.storage.IMAGE_EXTENSIONS`, any case.
IMAGE_GLOB = "*.{[jJ][pP][gG],[jJ][pP][eE][gG],[pP][nN][gG]}"
#: Covariances up to this size fit Spark's default 1 GiB driver (2,048 features measured);
#: above it the driver is sized for the PCA (4,608 features killed the default one).
DEFAULT_DRIVER_PCA_BYTES = 48 << 20
#: Covariance size (bytes) above which Spark's driver-side PCA needs ``--spark-allow-large-pca``.
LARGE_PCA_BYTES = 1 << 30
#: ``RowMatrix.computeCovariance`` refuses more columns than this.
MAX_SPARK_PCA_COLUMNS = 65535

FEATURES_DDL = "path string, label string, features array<float>, error_stage string, error_reason string"


def covariance_bytes(d: int) -> int:
    """Bytes of the ``d x d`` double covariance Spark's PCA builds on the driver."""
    return d * d * 8


def check_pca_size(cfg: RunConfig) -> str | None:
    """Refuse, before any work, a PCA whose driver-side covariance would not fit.

    Returns the ``spark.driver.memory`` to ask for when the user opted in to a large PCA.
    """
    d = cfg.feature_dim
    need = covariance_bytes(d)
    if d > MAX_SPARK_PCA_COLUMNS:
        raise ReductionError(
            f"Spark's PCA cannot take {d:,} features (RowMatrix allows {MAX_SPARK_PCA_COLUMNS:,} columns): "
            f"use --backend dask (IncrementalPCA streams), --pooling avg, or a smaller --image-size"
        )
    if need <= DEFAULT_DRIVER_PCA_BYTES:
        return None
    if need <= LARGE_PCA_BYTES:
        # Measured: 4,608 features (a 170 MB covariance) killed a default 1 GiB driver. The
        # Gramian is built as packed triangles per task, merged, then densified and
        # decomposed by Breeze: several copies at once. Size the driver for them.
        return f"{math.ceil(8 * need / 2**30) + 1}g"
    gb = need / 1e9
    if not cfg.spark_allow_large_pca:
        raise ReductionError(
            f"Spark's PCA would gather a {d:,} x {d:,} covariance on the driver ({gb:.1f} GB of doubles, about "
            f"twice that with its SVD) for --pooling {cfg.pooling} at --image-size {cfg.image_size}: use --backend dask "
            f"(IncrementalPCA streams batches), --pooling avg (512 features), or pass --spark-allow-large-pca "
            f"on a driver with more than {8 * gb:.0f} GB"
        )
    return f"{math.ceil(8 * need / 2**30) + 1}g"


def featurize_batches(batches: Iterator[pa.RecordBatch], bc, settings: FeatureSettings, *, threads: int | None,
                      ends=None, images=None) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body: ``path, label, content`` batches to feature batches, with the
    partition function of the Dask backend (:func:`fruitdask.features.frames.featurize_frame`)
    on the bytes Spark read.

    Rows whose ``content`` is null (``s3://`` inputs, or files Spark's lister hides) are read
    through :func:`fruitdask.storage.read_bytes` there, in the executor.
    """
    for batch in batches:
        if batch.num_rows == 0:
            continue
        df = pd.DataFrame({"path": batch.column("path").to_pylist(), "label": batch.column("label").to_pylist()})
        out = frames.featurize_frame(df, bc.value, settings, threads=threads, contents=batch.column("content").to_pylist())
        if images is not None:  # the driver's progress bar (reaches it as each task ends)
            images.add(batch.num_rows)
        yield pa.RecordBatch.from_pandas(out, schema=frames.FEATURES_SCHEMA, preserve_index=False)
    if ends is not None:
        ends.add([time.time()])


def write_batches(batches: Iterator[pa.RecordBatch], bc_reduction, *, staging: str, storage_options: dict) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body: add the ``pca`` column and write this partition as one Parquet part."""
    from pyspark import TaskContext

    tables = [pa.Table.from_batches([b]) for b in batches if b.num_rows]
    rows = 0
    if tables:
        df = pa.concat_tables(tables).to_pandas(types_mapper=pd.ArrowDtype)
        out = frames.add_pca(df, bc_reduction.value)
        part = TaskContext.get().partitionId()
        rows = storage.write_parquet_part(out, storage.join(staging, f"part-{part:05d}.parquet"), frames.OUTPUT_SCHEMA, storage_options)
    yield pa.RecordBatch.from_pydict({"rows": [rows]}, schema=pa.schema([("rows", pa.int64())]))


def _images_frame(spark, input_url: str, listing: pd.DataFrame, parts: int):
    """A DataFrame of ``path, label, content`` with exactly the rows of ``listing``: the
    bytes as Spark's ``binaryFile`` read them (local input), or null to be read in the
    executors (``s3://``)."""
    from pyspark.sql import functions as F

    listed = set(listing["path"])
    schema = "path string, label string, content binary"
    if storage.is_remote(input_url):
        rows = [(p, lab, None) for p, lab in zip(listing["path"], listing["label"], strict=True)]
        return spark.createDataFrame(rows, schema).repartition(parts), {"listing": "storage.list_images (s3)"}
    raw = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", IMAGE_GLOB)
        .load(input_url)
    )
    # binaryFile names files "file:/a/Cherry 1/x.jpg" (not percent-encoded): drop the scheme only.
    images = raw.select(F.regexp_replace("path", "^file:(//)?", "").alias("path"), "content")
    images = images.withColumn("label", F.element_at(F.split("path", "/"), -2)).select("path", "label", "content")
    found = {r["path"] for r in images.select("path").collect()}
    # Hadoop hides names starting with "_" or "." and skips symlink loops; list_images keeps
    # "_" names. Rows are the project's listing: extras dropped, missing ones read in tasks.
    extra, missing = sorted(found - listed), sorted(listed - found)
    if extra:
        logger.warning("Spark listed %d files the project listing did not (e.g. %s): ignored", len(extra), extra[0])
        images = images.filter(~F.col("path").isin(extra))
    if missing:
        logger.info("%d listed files were hidden from Spark's reader (e.g. %s): read in the executors", len(missing), missing[0])
        sub = listing[listing["path"].isin(missing)]
        images = images.unionByName(spark.createDataFrame([(p, lab, None) for p, lab in zip(sub["path"], sub["label"], strict=True)], schema))
    return images.repartition(parts), {"listing": "binaryFile", "hidden_from_spark": len(missing), "ignored": len(extra)}


class _EndTimes:
    """Accumulator of the wall-clock times at which featurize tasks finished (for the bench)."""

    @staticmethod
    def zero(value: list) -> list:
        return []

    @staticmethod
    def addInPlace(a: list, b: list) -> list:
        a.extend(b)
        return a


def spark_pca(vectors, plan, n_rows: int, variance: float) -> Reduction:
    """Fit ``pyspark.ml`` ``StandardScaler`` + ``PCA`` on a DataFrame with a vector column ``x``.

    pyspark's ``StandardScaler`` divides by the *sample* standard deviation (n-1) where the
    Dask backend divides by the population one (n): the scaled data differ by the constant
    sqrt(n/(n-1)), which leaves components and explained-variance *ratios* unchanged. The
    returned :class:`Reduction` keeps the population scale and variances in the Dask
    backend's units, so ``reduction.npz`` and the ``pca`` column mean the same for both.
    """
    from pyspark.ml.feature import PCA, StandardScaler

    scaler = StandardScaler(withMean=True, withStd=True, inputCol="x", outputCol="z").fit(vectors)
    mean = scaler.mean.toArray()
    sample_std = scaler.std.toArray()
    fitted = PCA(k=plan.n_fit, inputCol="z", outputCol="p").fit(scaler.transform(vectors).select("z"))
    components = fitted.pc.toArray().T  # pc is d x k
    # Sign convention of sklearn's svd_flip(u_based_decision=False): largest |value| positive.
    signs = np.sign(components[np.arange(len(components)), np.argmax(np.abs(components), axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    ratios = fitted.explainedVariance.toArray()
    # Total variance of the population-standardized data, with an n-1 denominator as sklearn.
    n_varying = int(np.sum(sample_std > 1e-12))
    total = n_varying * n_rows / max(n_rows - 1, 1)
    return finish(
        plan, mean, safe_scale(sample_std * math.sqrt((n_rows - 1) / n_rows)), np.zeros_like(mean), components,
        ratios * total, ratios, variance, n_rows, "pyspark.ml StandardScaler + PCA (exact, driver-side covariance)",
    )


class SparkBackend:
    """The run's steps on PySpark (see :mod:`fruitdask.backends` for the order)."""

    starts_early = False  # the JVM starts once the output is locked, as the notebook did

    def __init__(self, cfg: RunConfig, target: storage.OutputTarget, progress: Progress) -> None:
        self.cfg, self.target, self.progress = cfg, target, progress
        self.storage_options = dict(target.storage_options)
        self.cluster: dict = {}
        self.extra: dict = {}

    def start(self, stack: ExitStack) -> None:
        """Refuse a PCA the driver cannot hold, then start the session."""
        from fruitdask.backends.spark.session import spark_session

        driver_memory = check_pca_size(self.cfg)
        warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)
        self.session = stack.enter_context(spark_session(self.cfg, driver_memory=driver_memory))
        self.sc = self.session.sparkContext

    def describe(self) -> dict:
        sc = self.sc
        self.cluster = {
            "backend": "spark", "n_workers": 1 if sc.master.startswith("local") else None,
            "threads": sc.defaultParallelism, "memory_limit_bytes": None, "scheduler": sc.master,
            "dashboard": sc.uiWebUrl, "spark_version": sc.version,
        }
        return self.cluster

    def resolve_precision(self, requested: str) -> Resolved:
        """On the driver's machine: executors are assumed alike (``--spark-master`` elsewhere
        is a comparison set-up, see docs/architecture-review.md)."""
        return detect_and_resolve(requested)

    def warm_up(self, stack: ExitStack, precision: str) -> None:
        """Nothing: each Python worker builds its model in its first task."""

    @contextmanager
    def running(self) -> Iterator[None]:
        yield
        self.feats.unpersist()
        self.extra = {**self.listing_info, "partitions": self.parts,
                      "featurize_task_ends_s": sorted(round(t - self.t0, 3) for t in self.ends.value),
                      "broadcast": "sc.broadcast (lazy: executors fetch it in their first task)"}

    def prepare(self, listing: pd.DataFrame, weights: list[np.ndarray], weights_info: WeightsInfo) -> None:
        self.listing = listing
        self.parts = n_partitions(len(listing), self.cfg.partition_size, self.sc.defaultParallelism)
        self.bc = self.sc.broadcast(weights)

    def featurize(self, settings: FeatureSettings) -> Featurized:
        """Spark reads the bytes (``binaryFile``) and ``mapInArrow`` featurizes them with the
        shared partition function; the features stay persisted on the executors."""
        from pyspark import StorageLevel
        from pyspark.sql import functions as F

        images, self.listing_info = _images_frame(self.session, self.cfg.input, self.listing, self.parts)
        self.ends, done = self.sc.accumulator([], _EndTimes()), self.sc.accumulator(0)
        threads = int(self.sc.getConf().get("spark.task.cpus", "1"))
        body = _featurizer(self.bc, self.ends, settings, threads, done)
        self.t0 = time.time()
        self.feats = feats = images.mapInArrow(body, FEATURES_DDL).persist(StorageLevel.MEMORY_AND_DISK)
        self.progress.start(len(self.listing))
        try:
            with Poller(self.progress, lambda: done.value):
                # A real sink: counting the features column forces the UDF (a bare count() may prune it).
                total, with_features = feats.select(F.count(F.lit(1)), F.count("features")).first()
        finally:
            self.progress.close()
        bad = feats.filter(F.col("error_stage").isNotNull()).select(*frames.FEATURES_SCHEMA.names).collect()
        _, errors = frames.split_rows(pd.DataFrame([tuple(r) for r in bad], columns=frames.FEATURES_SCHEMA.names))
        if total != len(self.listing):
            raise OutputError(f"Spark featurized {total} rows for {len(self.listing)} listed images: run again with --debug")
        good = feats.filter(F.col("error_stage").isNull()).select("path", "label", "features")
        return Featurized(data=good, rows=int(with_features), errors=errors.reset_index(drop=True))

    def reduce(self, featurized: Featurized) -> Reduction:
        """``pyspark.ml`` StandardScaler + PCA (driver-side covariance)."""
        from pyspark.ml.functions import array_to_vector

        cfg, n_rows = self.cfg, featurized.rows
        plan = plan_pca(n_rows, cfg.feature_dim, cfg.components, cfg.pca_batch_size)
        return spark_pca(featurized.data.select(array_to_vector("features").alias("x")), plan, n_rows, cfg.variance)

    def write(self, featurized: Featurized, reduction: Reduction) -> int:
        """One Parquet part per partition, written by the executors."""
        from pyspark.sql import functions as F

        writer = _writer(self.sc.broadcast(reduction), self.target.staging_path(output.FEATURES), self.storage_options)
        return featurized.data.mapInArrow(writer, "rows long").agg(F.sum("rows")).first()[0] or 0


def _featurizer(bc, ends, settings: FeatureSettings, threads: int, done=None):
    def body(batches):
        return featurize_batches(batches, bc, settings, threads=threads, ends=ends, images=done)

    return body


def _writer(bc_red, staging: str, storage_options: dict):
    def body(batches):
        return write_batches(batches, bc_red, staging=staging, storage_options=storage_options)

    return body
