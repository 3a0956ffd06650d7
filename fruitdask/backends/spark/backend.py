"""The Spark backend: the seed notebook's stages on PySpark, writing the same Delta table.

- The images to featurize are the plan's manifest, one row group per partition; an RDD of
  partition numbers maps each one to :func:`fruitdask.lake.tasks.featurize_part` in the
  executors, which read the bytes through :mod:`fruitdask.storage` (local paths and
  ``s3://`` alike: the hadoop-aws jars cannot be assumed), featurize with the partition
  function every backend shares (:func:`fruitdask.features.frames.featurize_frame`) and write
  their Parquet files; the driver commits them with deltalake (no Delta jars can be
  downloaded here, and delta-rs needs no JVM).
- Weights travel once with ``sc.broadcast``; each Python worker builds its Keras model once
  (:func:`fruitdask.features.model.cached_model`).
- The PCA: the same exact moments as the Dask backend, summed by Spark's ``treeReduce``
  (no ``d x d`` covariance on the driver beyond the final one), and projected in the
  executors. Features wider than the moments allow are refused before the session starts.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
import pandas as pd

from fruitdask import checkpoint, storage
from fruitdask.config import RunConfig
from fruitdask.features.model import WeightsInfo
from fruitdask.features.precision import Resolved, detect_and_resolve
from fruitdask.features.settings import FeatureSettings
from fruitdask.lake import tasks
from fruitdask.lake.update import check_wide
from fruitdask.pca_moments import merge_all
from fruitdask.progress import Poller, Progress

logger = logging.getLogger(__name__)


def featurize_index(index: int, manifest_url: str, bc, settings: FeatureSettings, ckpt: checkpoint.Checkpoints,
                    sink: tasks.Sink, fit: tasks.Fit | None, threads: int, done=None) -> pd.DataFrame:
    """Executor body: partition ``index`` of the manifest through the shared task body."""
    df = tasks.read_manifest_part(index, manifest_url, sink.storage_options)
    out = tasks.featurize_part(df, bc.value, settings, ckpt, sink, fit, index, threads=threads)
    if done is not None:  # the driver's progress bar (reaches it as each task ends)
        done.add(len(df))
    return out


def _merge(a, b):
    return merge_all([a, b])


def _run_leaf(leaf: tuple):
    fn, args = leaf
    return fn(*args)


class SparkBackend:
    """The run's steps on PySpark (see :mod:`fruitdask.backends` for the order)."""

    starts_early = False  # the JVM starts once there is work, as the notebook did

    def __init__(self, cfg: RunConfig, target: storage.OutputTarget, progress: Progress) -> None:
        self.cfg, self.target, self.progress = cfg, target, progress
        self.storage_options = dict(target.storage_options)
        self.cluster: dict = {}
        self.extra: dict = {}

    def start(self, stack: ExitStack) -> None:
        """Refuse a PCA the moments cannot hold, then start the session."""
        from fruitdask.backends.spark.session import spark_session

        check_wide(self.cfg.feature_dim, "spark")
        warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)
        self.session = stack.enter_context(spark_session(self.cfg))
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
        self.extra.setdefault("broadcast", "sc.broadcast (lazy: executors fetch it in their first task)")

    def prepare(self, weights: list[np.ndarray], weights_info: WeightsInfo) -> None:
        self.bc = self.sc.broadcast(weights)

    def featurize_parts(self, manifest_url: str, sizes: list[int], settings: FeatureSettings,
                        ckpt: checkpoint.Checkpoints, sink: tasks.Sink, fit: tasks.Fit | None) -> pd.DataFrame:
        """One Spark task per manifest partition; the receipts collected on the driver."""
        done = self.sc.accumulator(0)
        threads = int(self.sc.getConf().get("spark.task.cpus", "1"))
        bc, n = self.bc, len(sizes)
        self.extra["partitions"] = n
        rdd = self.sc.parallelize(range(n), n).map(
            lambda i: featurize_index(i, manifest_url, bc, settings, ckpt, sink, fit, threads, done))
        self.progress.start(sum(sizes))
        try:
            with Poller(self.progress, lambda: done.value):
                parts = rdd.collect()
        finally:
            self.progress.close()
        return pd.concat(parts, ignore_index=True) if parts else tasks.receipt_meta()

    def map_tasks(self, fn, args_list: list[tuple]) -> list:
        """``fn(*args)`` for each ``args`` in the executors; the (small) results in order."""
        if not args_list:
            return []
        return self.sc.parallelize([(fn, a) for a in args_list], len(args_list)).map(_run_leaf).collect()

    def tree_reduce(self, leaves: list[tuple]):
        """The moments of each leaf, merged by Spark's ``treeReduce``."""
        if not leaves:
            return None
        return self.sc.parallelize(leaves, len(leaves)).map(_run_leaf).treeReduce(_merge, depth=3)
