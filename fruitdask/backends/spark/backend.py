"""The Spark backend: the seed notebook's stages on PySpark, writing the same Delta table.

- The images to featurize are the plan's manifest, one row group per partition; an RDD of
  partition numbers maps each one to :func:`fruitdask.lake.tasks.featurize_part` in the
  executors, which read the bytes through :mod:`fruitdask.storage` (local paths and
  ``s3://`` alike: the hadoop-aws jars cannot be assumed), featurize with the partition
  function every backend shares (:func:`fruitdask.features.frames.featurize_frame`) and write
  their Parquet files; the driver commits them with deltalake (no Delta jars can be
  downloaded here, and delta-rs needs no JVM).
- Weights travel once with ``sc.broadcast`` (:class:`BroadcastWeights`, the tasks' weights
  source); each Python worker builds its Keras model once
  (:func:`fruitdask.features.model.cached_runtime`).
- The PCA: the same exact moments as the Dask backend, summed by Spark's ``treeReduce``
  (no ``d x d`` covariance on the driver beyond the final one), and projected in the
  executors. Features wider than the moments allow are refused before the session starts.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from fruitdask import checkpoint, storage
from fruitdask.config import RunConfig
from fruitdask.errors import ReductionError
from fruitdask.features.model import WeightsInfo
from fruitdask.features.precision import Resolved, detect_and_resolve
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsSource
from fruitdask.lake import tasks
from fruitdask.lake.update import MomentsLeaf, check_wide
from fruitdask.pca_moments import Moments, merge_all
from fruitdask.progress import Poller, Progress
from fruitdask.reduce import PCA, Reduction

if TYPE_CHECKING:  # pyspark is imported when the session starts (it is an extra)
    from pyspark import Broadcast

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class BroadcastWeights:
    """The run's weights as a Spark broadcast: executors fetch the arrays once each."""

    broadcast: Broadcast[list[np.ndarray]]
    sha256: str

    def load(self) -> list[np.ndarray]:
        return self.broadcast.value


def featurize_index(index: int, manifest_url: str, job: tasks.FeaturizeJob, threads: int, done=None) -> list[tasks.Receipt]:
    """Executor body: partition ``index`` of the manifest through the shared task body."""
    df = tasks.read_manifest_part(index, manifest_url, job.sink.storage_options)
    out = tasks.featurize_part(df, job, index, threads=threads)
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

    name = "spark"
    starts_early = False  # the JVM starts once there is work, as the notebook did
    supports_wide_fit = False  # the PCA is the moments' only: no streamed fit of wider features

    def __init__(self, cfg: RunConfig, target: storage.OutputTarget, progress: Progress) -> None:
        self.cfg, self.target, self.progress = cfg, target, progress
        self.storage_options = dict(target.storage_options)
        self.cluster: dict = {}
        self.extra: dict = {}

    def start(self, stack: ExitStack, settings: FeatureSettings) -> None:
        """Refuse a PCA the moments cannot hold, then start the session."""
        from fruitdask.backends.spark.session import spark_session

        check_wide(settings.feature_dim, self.supports_wide_fit, self.name)
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

    def warm_up(self, stack: ExitStack, settings: FeatureSettings) -> None:
        """Nothing: each Python worker builds its model in its first task."""

    @contextmanager
    def running(self) -> Iterator[None]:
        yield
        self.extra.setdefault("broadcast", "sc.broadcast (lazy: executors fetch it in their first task)")

    def prepare(self, weights: WeightsSource, weights_info: WeightsInfo) -> BroadcastWeights:
        return BroadcastWeights(self.sc.broadcast(weights.load()), weights_info.sha256)

    def featurize_parts(self, manifest_url: str, sizes: list[int], job: tasks.FeaturizeJob) -> list[tasks.Receipt]:
        """One Spark task per manifest partition; the receipts collected on the driver."""
        done = self.sc.accumulator(0)
        threads = int(self.sc.getConf().get("spark.task.cpus", "1"))
        n = len(sizes)
        self.extra["partitions"] = n
        rdd = self.sc.parallelize(range(n), n).map(lambda i: featurize_index(i, manifest_url, job, threads, done))
        self.progress.start(sum(sizes))
        try:
            with Poller(self.progress, lambda: done.value):
                parts = rdd.collect()
        finally:
            self.progress.close()
        return [r for part in parts for r in part]

    def map_tasks(self, fn: Callable[..., T], args_list: list[tuple], *, background: bool = False) -> list[T]:
        """``fn(*args)`` for each ``args`` in the executors; the (small) results in order.
        ``background`` changes nothing here: a job submitted from another thread already runs
        in the slots the running jobs leave free (Spark's FIFO scheduler, by job)."""
        if not args_list:
            return []
        return self.sc.parallelize([(fn, a) for a in args_list], len(args_list)).map(_run_leaf).collect()

    def tree_reduce(self, leaves: list[MomentsLeaf]) -> Moments | None:
        """The moments of each leaf, merged by Spark's ``treeReduce``."""
        if not leaves:
            return None
        return self.sc.parallelize(leaves, len(leaves)).map(_run_leaf).treeReduce(_merge, depth=3)

    def fit_wide(self, staged: list[tuple[int, int]], manifest_url: str, ckpt: checkpoint.Checkpoints,
                 sink: tasks.Sink, kept_files: list[tuple[str, np.ndarray | None]], pca: PCA) -> Reduction:
        """Never called: ``supports_wide_fit`` is False, so the run is refused before its session
        starts (:func:`fruitdask.lake.update.check_wide`); raises if called all the same."""
        raise ReductionError("the Spark backend sums moments only: features this wide need --backend dask, or "
                             "--pooling avg")
