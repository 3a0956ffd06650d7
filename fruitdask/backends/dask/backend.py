"""The Dask backend: load the weights from a file on each worker, ``map_partitions`` the
featurization over a Parquet manifest, and run the lake's task bodies on the workers.

Nothing the run needs exists only in a worker's memory, and no feature stays in it: each
partition's features go to storage (its checkpoint, or straight into a data file of the
table) as the task that made them ends; every later step (the PCA moments, the projection,
the rewrite of table files) is a task that reads files of bounded size and returns a small
receipt. Losing any worker at any stage costs a recompute, never the run, on schedulers
with their default configuration (Active Memory Manager on):

- the **weights** are a file the tasks name (:class:`fruitdask.features.weights_file.WeightsFile`:
  the user's ``s3://`` file, or an ``.npz`` the client stages for a local file, ImageNet or
  random weights); each worker process reads it once, the first time it builds its model
  (:func:`fruitdask.features.model.cached_runtime`). Never scattered: scattered data cannot be
  recomputed, and the AMM drops its extra replicas;
- the **listing** is the plan's Parquet manifest, one row group per partition, read back by
  tasks (``dd.from_map``);
- the **PCA fit** is a file beside the table that tasks read once per process.

Workers warm up (import TensorFlow, build VGG16 for the run's image size) as soon as the
cluster is up (:meth:`DaskBackend.warm_up`), while the client lists the images and reads the weights.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import dask
import numpy as np
import pandas as pd

from fruitdask import checkpoint, output, storage
from fruitdask.backends.dask.cluster import cluster_shape, dask_client, start_fork_server, worker_addresses
from fruitdask.config import RunConfig
from fruitdask.features import model
from fruitdask.features.model import WeightsInfo
from fruitdask.features.precision import Resolved, agree, detect_on_worker
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsFile, WeightsSource, npz_bytes
from fruitdask.lake import tasks
from fruitdask.lake.update import MomentsLeaf
from fruitdask.pca_moments import Moments, merge_all
from fruitdask.pca_streamed import silence_first_batch_warning
from fruitdask.progress import Progress, steady_rate
from fruitdask.reduce import PCA, Reduction

T = TypeVar("T")

#: Moments merged per task of the tree reduction.
TREE_FAN_IN = 8

logger = logging.getLogger(__name__)


def featurize_on_worker(df: pd.DataFrame, job: tasks.FeaturizeJob) -> pd.DataFrame:
    """Task body: featurize one manifest partition with this worker's threads and write it
    (:func:`fruitdask.lake.tasks.featurize_part`); returns the partition's receipt, as a
    frame (:func:`fruitdask.lake.tasks.receipts_frame`: a Dask DataFrame's partition)."""
    index = int(df["part"].iloc[0]) if len(df) else 0
    return tasks.receipts_frame(tasks.featurize_part(df, job, index, threads=_worker_threads()))


def _worker_threads() -> int | None:
    from distributed import get_worker

    try:
        return get_worker().state.nthreads
    except ValueError:  # not on a worker (e.g. the synchronous scheduler in tests)
        return None


def track_images(futures: list, counts: list[int], bar, marks: list[tuple[float, int]] | None = None) -> list:
    """Gather each partition's (small) result as its future completes, releasing it at once,
    and advance ``bar`` by the partition's image count (``futures[i]`` computes partition
    ``i`` of ``counts[i]`` images). Returns the results in partition order; ``marks``, when
    given, receives ``(seconds since start, images done)`` at each completion."""
    from distributed import as_completed

    index = {f.key: i for i, f in enumerate(futures)}
    results: list = [None] * len(futures)
    bar.start(sum(counts))
    t0, done = time.perf_counter(), 0
    try:
        for future in as_completed(futures):
            i = index.get(future.key, 0)
            results[i] = future.result()
            future.release()
            bar.advance(counts[i])
            done += counts[i]
            if marks is not None:
                marks.append((time.perf_counter() - t0, done))
    finally:
        bar.close()
    return results


#: The steady rate counts from the moment this share of the images is done: the workers'
#: model build and first batches (a fixed cost per run) are behind it.
STEADY_FROM = 0.1


def steady_after_warm_up(marks: list[tuple[float, int]], share: float = STEADY_FROM) -> float | None:
    """:func:`fruitdask.progress.steady_rate` from the first partition end past ``share`` of
    the images (None with too few partitions to tell)."""
    if len(marks) < 4:
        return None
    total = marks[-1][1]
    return steady_rate(marks, next(i for i, m in enumerate(marks) if m[1] >= share * total))


#: Folder of the staging prefix for the run's own inputs (manifest, weights, reduction);
#: removed before the commit, so it never reaches the output.
INTERNAL = "_fruitdask"


def warm_up_on_worker(settings: FeatureSettings) -> float:
    """Task body: :func:`fruitdask.features.model.warm_up` with this worker's thread count."""
    return model.warm_up(settings, _worker_threads())


def preimport_client_modules() -> None:
    """Import what the client's later steps need (Dask's collections for the listing and
    the PCA, matplotlib for the scree plot of a fit) now, before the cluster starts.

    A local cluster's worker can only be forked once the fork server has imported
    TensorFlow (seconds, on one core); this process waits for it anyway, so these imports
    use the idle core instead of sitting between the stages after the model is ready.
    matplotlib is imported, not the report: the report sits above the backends.
    """
    import dask.array
    import dask.dataframe  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")  # as fruitdask.report.plots.import_pyplot: no display
    import matplotlib.pyplot


class DaskBackend:
    """The run's steps on a Dask cluster (see :mod:`fruitdask.backends` for the order)."""

    name = "dask"
    starts_early = True  # the workers warm up while the client lists the images
    supports_wide_fit = True  # dask-ml's IncrementalPCA streams features too wide for moments

    def __init__(self, cfg: RunConfig, target: storage.OutputTarget, progress: Progress) -> None:
        self.cfg, self.target, self.progress = cfg, target, progress
        self.storage_options = dict(target.storage_options)
        self.cluster: dict = {}
        self.extra: dict = {}
        self.client: Any = None
        self.weights_key = ""

    def start(self, stack: ExitStack, settings: FeatureSettings) -> None:
        """Open the client; a local cluster's workers warm up for ``settings`` as they start."""
        if self.cfg.cluster == "local":
            start_fork_server()  # a no-op when ``fruitdask run`` started it as it started
        preimport_client_modules()
        self.client = stack.enter_context(dask_client(self.cfg, settings))

    def describe(self) -> dict:
        self.cluster = cluster_shape(self.client)
        return self.cluster

    def resolve_precision(self, requested: str) -> Resolved:
        """Each worker resolves ``requested`` on its own hardware; bf16 only if all have it."""
        answers = self.client.run(detect_on_worker, requested, on_error="return")
        return agree(requested, {w: a for w, a in answers.items() if isinstance(a, dict)})

    def warm_up(self, stack: ExitStack, settings: FeatureSettings) -> None:
        """One :func:`warm_up_on_worker` task pinned to each worker present now (a worker that
        joins later builds its model at its first partition instead)."""
        warm = [
            self.client.submit(warm_up_on_worker, settings, key=f"warm-up-{uuid.uuid4().hex}",
                               workers=[w], allow_other_workers=False, pure=False)
            for w in worker_addresses(self.client)
        ]
        if warm:  # unfinished on a worker that died; finished ones are released
            stack.callback(self.client.cancel, warm)

    @contextmanager
    def running(self) -> Iterator[None]:
        """The steps under a Dask performance report, staged (the pipeline publishes it
        with the run's record once the table is committed)."""
        from distributed import performance_report

        with tempfile.TemporaryDirectory(prefix="fruitdask-") as tmp:
            report_file = os.path.join(tmp, output.DASK_REPORT)
            with performance_report(filename=report_file):
                yield
            with open(report_file, "rb") as f:
                self.target.write_bytes(output.DASK_REPORT, f.read())
            self.extra["performance_report"] = output.DASK_REPORT
        self.extra["weights_loads"] = _weights_loads(self.client, self.weights_key)

    def prepare(self, weights: WeightsSource, weights_info: WeightsInfo) -> WeightsFile:
        """The weights as a file the tasks name, not scattered data (module doc)."""
        self.weights_key = weights_info.sha256
        return weights_source(weights, weights_info, self.target, shared_disk=self.cfg.cluster == "local")

    def featurize_parts(self, manifest_url: str, sizes: list[int], job: tasks.FeaturizeJob) -> list[tasks.Receipt]:
        """``map_partitions`` of the featurization over the manifest; the receipts, gathered
        as partitions end (the bar counts images)."""
        import dask.dataframe as dd

        self.extra["checkpoint"] = {"prefix": job.ckpt.prefix, "resume": job.ckpt.resume}
        listing = dd.from_map(
            tasks.read_manifest_part, range(len(sizes)), url=manifest_url, storage_options=self.storage_options,
            label="manifest", enforce_metadata=False, meta=tasks.manifest_meta(),
        )
        receipts = listing.map_partitions(featurize_on_worker, job, meta=tasks.receipt_meta())
        futures = self.client.compute(receipts.to_delayed())
        try:
            marks: list[tuple[float, int]] = []
            parts = track_images(futures, sizes, self.progress, marks)
            rate = steady_after_warm_up(marks)
            self.extra["steady_images_per_s"] = None if rate is None else round(rate, 3)
        finally:
            _settle(self.client, futures)
        return [r for part in parts for r in tasks.receipts_of(part)]

    def map_tasks(self, fn: Callable[..., T], args_list: list[tuple], *, background: bool = False) -> list[T]:
        """``fn(*args)`` for each ``args`` on the workers; the (small) results in order.
        ``background`` tasks run behind every task already queued (a lower priority): called
        from another thread, they fill the threads a running step leaves idle."""
        if not args_list:
            return []
        name = f"{fn.__name__}-{uuid.uuid4().hex[:8]}"
        priority = -1 if background else 0
        futures = [self.client.submit(fn, *args, key=f"{name}-{i}", pure=False, priority=priority)
                   for i, args in enumerate(args_list)]
        try:
            return self.client.gather(futures)
        finally:
            _settle(self.client, futures)

    def tree_reduce(self, leaves: list[MomentsLeaf]) -> Moments | None:
        """Run each ``(fn, args)`` leaf and merge their moments :data:`TREE_FAN_IN` at a time,
        as one graph: Dask's ordering runs a merge as soon as its leaves are done, so the
        moments held at once stay a few fan-ins' worth, and no task's input grows with the
        number of partitions."""
        if not leaves:
            return None
        name = uuid.uuid4().hex[:8]
        level = [dask.delayed(fn, pure=False)(*args, dask_key_name=f"{fn.__name__}-{name}-{i}")
                 for i, (fn, args) in enumerate(leaves)]
        while len(level) > 1:
            level = [dask.delayed(merge_all, pure=False)(level[i : i + TREE_FAN_IN]) for i in range(0, len(level), TREE_FAN_IN)]
        future = self.client.compute(level[0])
        try:
            return future.result()
        finally:
            future.release()

    def fit_wide(self, staged: list[tuple[int, int]], manifest_url: str, ckpt: checkpoint.Checkpoints,
                 sink: tasks.Sink, kept_files: list[tuple[str, np.ndarray | None]], pca: PCA) -> Reduction:
        """The rows of the PCA's streamed strategy (features too wide for moments): one dask
        array of blocks that are each one checkpoint or one table file, read by the task that
        needs it, handed to ``pca.fit``."""
        import dask.array as da

        self.client.run(silence_first_batch_warning, on_error="ignore")  # a worker may be gone
        kept_rows = self.map_tasks(tasks.kept_rows, [(sink, p, rows) for p, rows in kept_files])
        d = pca.n_features
        blocks = [da.from_delayed(dask.delayed(tasks.features_part)(i, manifest_url, ckpt), shape=(n, d), dtype=np.float32)
                  for i, n in staged if n]
        blocks += [da.from_delayed(dask.delayed(tasks.features_file)(sink, p, rows), shape=(n, d), dtype=np.float32)
                   for (p, rows), n in zip(kept_files, kept_rows, strict=True) if n]
        X = da.concatenate(blocks, axis=0) if blocks else da.zeros((0, d), dtype=np.float32)
        return pca.fit(X)


#: Seconds a failed step waits for its tasks still running (their writes land before the
#: run removes its files).
SETTLE_S = 60


def _settle(client, futures: list) -> None:
    """Cancel what has not started, wait (bounded) for what is running: when a step ends,
    by success or failure, none of its tasks is still writing a file."""
    from distributed import wait

    # A future is "pending" for the client while it waits or runs: ask the scheduler which
    # are running (cancelling those would not stop their writes), cancel the rest.
    pending = [f for f in futures if f.status == "pending"]
    running = {k for keys in client.processing().values() for k in keys} if pending else set()
    client.cancel([f for f in pending if f.key not in running])
    try:
        wait([f for f in pending if f.key in running], timeout=SETTLE_S)
    except Exception as e:  # noqa: BLE001 - a worker gone or a timeout: the cleanup is best effort
        logger.debug("tasks still running after the step ended: %s", e)
    client.cancel(futures)


def weights_source(weights: WeightsSource, info: WeightsInfo, target: storage.OutputTarget, *,
                   shared_disk: bool) -> WeightsFile:
    """Where workers load the weights from: the file they were read from (``info.source``) as
    is when the workers can read it (a remote file, or a local one when the workers share this
    disk: a local cluster; each worker checks the digest), otherwise an ``.npz`` of them
    staged beside the output (remote workers may not see the client's disk, and random or
    ImageNet weights have no file at all)."""
    so = dict(target.storage_options)
    if info.kind == "file" and (storage.is_remote(info.source) or shared_disk):
        # A local path made absolute: a worker's working directory may differ.
        url = info.source if "://" in info.source else os.path.abspath(info.source)
        return WeightsFile(url, info.sha256, so)
    url = target.write_bytes(f"{INTERNAL}/weights-{info.sha256[:16]}.npz", npz_bytes(weights.load()))
    return WeightsFile(url, info.sha256, so)


def _weights_loads(client, key: str) -> dict[str, int]:
    """How many times each live worker read the weights file (1 each in the normal case)."""
    counts = client.run(model.load_counts, on_error="ignore")
    return {w: int(c.get(key, 0)) for w, c in sorted(counts.items()) if isinstance(c, dict)}
