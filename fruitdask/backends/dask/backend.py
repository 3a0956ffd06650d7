"""The Dask backend: load the weights from a file on each worker, ``map_partitions`` the
featurization over a Parquet manifest, stream the PCA.

Nothing the run needs exists only in a worker's memory, so losing any worker at any stage
costs a recompute, never the run, on schedulers with their default configuration (Active
Memory Manager on, as on dask/helm-chart, dask-gateway or Coiled clusters):

- the **weights** are a file the tasks name (:class:`fruitdask.features.weights_file.WeightsSource`:
  the user's ``s3://`` file, or an ``.npz`` the client stages for a local file, ImageNet or
  random weights); each worker process reads it once, the first time it builds its model
  (:func:`fruitdask.features.model.cached_model`), so the weights travel to each worker once, also to
  a worker that joins late or replaces a dead one. Never scattered: scattered data cannot be
  recomputed, and the AMM drops its extra replicas;
- the **listing** is a Parquet manifest in the staging prefix, one row group per partition,
  read back by tasks (:mod:`fruitdask.backends.dask.manifest`);
- the **reduction** is written there too and read by a task the write stage depends on.

Workers warm up (import TensorFlow, build VGG16 for the run's image size) as soon as the
cluster is up (:meth:`DaskBackend.warm_up`), while the client lists the images and reads the weights.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import dask
import numpy as np
import pandas as pd

from fruitdask import checkpoint, output, storage
from fruitdask.backends.base import Featurized, n_partitions
from fruitdask.backends.dask import manifest
from fruitdask.backends.dask.cluster import cluster_shape, dask_client, start_fork_server, worker_addresses
from fruitdask.config import RunConfig
from fruitdask.features import frames, model
from fruitdask.features.model import WeightsInfo
from fruitdask.features.precision import Resolved, agree, detect_on_worker
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsSource, npz_bytes
from fruitdask.progress import Progress
from fruitdask.reduce import Reduction, fit_incremental_pca, silence_first_batch_warning

logger = logging.getLogger(__name__)


def featurize_on_worker(
    df: pd.DataFrame, weights: WeightsSource | list[np.ndarray], settings: FeatureSettings,
    checkpoints: checkpoint.Checkpoints | None = None,
) -> pd.DataFrame:
    """Task body: pin TensorFlow to this worker's threads, then featurize the partition
    (or reuse its checkpoint under ``--resume``; see :mod:`fruitdask.checkpoint`)."""
    return checkpoint.featurize_checkpointed(df, weights, settings, checkpoints, threads=_worker_threads())


def _worker_threads() -> int | None:
    from distributed import get_worker

    try:
        return get_worker().state.nthreads
    except ValueError:  # not on a worker (e.g. the synchronous scheduler in tests)
        return None


def track_images(collection, counts: list[int], bar) -> None:
    """Advance ``bar`` by each partition's image count as its future completes.

    ``counts[i]`` is the number of listed images in partition ``i`` of the persisted
    ``collection`` (known from the listing), so the bar counts images, not tasks.
    """
    from distributed import as_completed, futures_of

    futures = futures_of(collection)
    bar.start(sum(counts))
    try:
        for future in as_completed(futures):
            # Keys are (name, partition); the name is the optimized graph's, not the
            # collection's own, so only the partition number is reliable.
            i = future.key[-1] if isinstance(future.key, tuple) else None
            bar.advance(counts[i] if isinstance(i, int) and 0 <= i < len(counts) else sum(counts) // max(len(futures), 1))
    finally:
        bar.close()


def _split(listing: pd.DataFrame, parts: int) -> list[pd.DataFrame]:
    bounds = np.linspace(0, len(listing), parts + 1).round().astype(int)
    return [listing.iloc[a:b].reset_index(drop=True) for a, b in itertools.pairwise(bounds) if b > a]


def _matrix_of(df: pd.DataFrame) -> np.ndarray:
    return frames.matrix(df["features"])


#: Folder of the staging prefix for the run's own inputs (manifest, weights, reduction);
#: removed before the commit, so it never reaches the output.
INTERNAL = "_fruitdask"


def warm_up_on_worker(image_size: int, precision: str = "float32") -> float:
    """Task body: :func:`fruitdask.features.model.warm_up` with this worker's thread count."""
    return model.warm_up(image_size, _worker_threads(), precision)


def _read_reduction(url: str, storage_options: dict) -> Reduction:
    return Reduction.from_npz(storage.read_bytes(url, storage_options))


def preimport_client_modules() -> None:
    """Import what the client's later steps need (Dask's collections for the listing and
    the PCA, matplotlib for the scree plot and the report) now, before the cluster starts.

    A local cluster's worker can only be forked once the fork server has imported
    TensorFlow (seconds, on one core); this process waits for it anyway, so these imports
    use the idle core instead of sitting between the stages after the model is ready.
    """
    import dask.array
    import dask.dataframe  # noqa: F401

    from fruitdask.report.plots import import_pyplot

    import_pyplot()


class DaskBackend:
    """The run's steps on a Dask cluster (see :mod:`fruitdask.backends` for the order)."""

    starts_early = True  # the workers warm up while the client lists the images

    def __init__(self, cfg: RunConfig, target: storage.OutputTarget, progress: Progress) -> None:
        self.cfg, self.target, self.progress = cfg, target, progress
        self.storage_options = dict(target.storage_options)
        self.cluster: dict = {}
        self.extra: dict = {}
        self.client: Any = None
        self.weights_key = ""

    def start(self, stack: ExitStack) -> None:
        if self.cfg.cluster == "local":
            start_fork_server()  # a no-op when ``fruitdask run`` started it as it started
        preimport_client_modules()
        self.client = stack.enter_context(dask_client(self.cfg))

    def describe(self) -> dict:
        self.cluster = cluster_shape(self.client)
        return self.cluster

    def resolve_precision(self, requested: str) -> Resolved:
        """Each worker resolves ``requested`` on its own hardware; bf16 only if all have it."""
        answers = self.client.run(detect_on_worker, requested, on_error="return")
        return agree(requested, {w: a for w, a in answers.items() if isinstance(a, dict)})

    def warm_up(self, stack: ExitStack, precision: str) -> None:
        """One :func:`warm_up_on_worker` task pinned to each worker present now (a worker that
        joins later builds its model at its first partition instead)."""
        warm = [
            self.client.submit(warm_up_on_worker, self.cfg.image_size, precision, key=f"warm-up-{uuid.uuid4().hex}",
                               workers=[w], allow_other_workers=False, pure=False)
            for w in worker_addresses(self.client)
        ]
        if warm:  # unfinished on a worker that died; finished ones are released
            stack.callback(self.client.cancel, warm)

    @contextmanager
    def running(self) -> Iterator[None]:
        """The steps under a Dask performance report, copied to the output after them; the
        run's own inputs are then removed from staging."""
        from distributed import performance_report

        with tempfile.TemporaryDirectory(prefix="fruitdask-") as tmp:
            report_file = os.path.join(tmp, output.DASK_REPORT)
            with performance_report(filename=report_file):
                yield
            with open(report_file, "rb") as f:
                self.target.write_bytes(output.DASK_REPORT, f.read())
            self.extra["performance_report"] = output.DASK_REPORT
        storage.remove_prefix(self.target.staging_path(INTERNAL), self.storage_options)
        self.extra["weights_loads"] = _weights_loads(self.client, self.weights_key)

    def prepare(self, listing: pd.DataFrame, weights: list[np.ndarray], weights_info: WeightsInfo) -> None:
        """The weights and the listing as files in staging, not scattered data: every task
        input can be read again (module doc)."""
        self.weights_key = weights_info.sha256
        self.source = weights_source(self.cfg, self.target, weights, weights_info, self.storage_options)
        parts = _split(listing, n_partitions(len(listing), self.cfg.partition_size, self.cluster.get("threads") or 1))
        self.counts = [len(p) for p in parts]
        url = self.target.staging_path(f"{INTERNAL}/manifest.parquet")
        manifest.write_manifest(parts, url, self.storage_options)
        import dask.dataframe as dd  # imported already by preimport_client_modules

        self.listing = dd.from_map(
            manifest.read_part, range(len(parts)), url=url, storage_options=self.storage_options,
            meta=listing.iloc[:0], label="manifest", enforce_metadata=False,
        )

    def featurize(self, settings: FeatureSettings) -> Featurized:
        """Featurize every partition (or reuse its checkpoint), persisted on the workers."""
        from distributed import wait

        ckpt = checkpoint.for_run(self.cfg.output, settings, self.cfg.resume)
        self.extra["checkpoint"] = {"prefix": ckpt.prefix, "resume": ckpt.resume}
        feats = self.listing.map_partitions(
            featurize_on_worker, self.source, settings, checkpoints=ckpt, meta=frames.features_meta()
        ).persist()
        track_images(feats, self.counts, self.progress)
        wait(feats)
        good, errors = frames.split_rows(feats)
        errors = errors.compute().reset_index(drop=True)
        lengths = [int(x) for x in good.map_partitions(len).compute()]
        return Featurized(data=(good, lengths), rows=sum(lengths), errors=errors)

    def reduce(self, featurized: Featurized) -> Reduction:
        """IncrementalPCA streamed over the persisted partitions."""
        import dask.array as da

        good, lengths = featurized.data
        self.client.run(silence_first_batch_warning, on_error="ignore")  # a worker may be gone
        d, cfg = self.cfg.feature_dim, self.cfg
        blocks = [
            da.from_delayed(dask.delayed(_matrix_of)(part), shape=(n, d), dtype=np.float32)
            for part, n in zip(good.to_delayed(), lengths, strict=True)
            if n > 0
        ]
        X = da.concatenate(blocks, axis=0) if blocks else da.zeros((0, d), dtype=np.float32)
        return fit_incremental_pca(X, components=cfg.components, variance=cfg.variance, batch_size=cfg.pca_batch_size,
                                   power_iterations=cfg.pca_power_iterations, seed=cfg.seed)

    def write(self, featurized: Featurized, reduction: Reduction) -> int:
        """One Parquet part per partition, with its ``pca`` column, written by the workers."""
        good, _ = featurized.data
        # A task result read from a staged file, not scattered: recomputable anywhere.
        red_url = self.target.write_bytes(f"{INTERNAL}/reduction.npz", reduction.to_npz())
        red = dask.delayed(_read_reduction, pure=True)(red_url, self.storage_options)
        out = good.map_partitions(frames.add_pca, red, meta=frames.output_meta())
        writes = [
            dask.delayed(storage.write_parquet_part)(
                part, self.target.staging_path(f"{output.FEATURES}/part-{i:05d}.parquet"), frames.OUTPUT_SCHEMA,
                self.storage_options,
            )
            for i, part in enumerate(out.to_delayed())
        ]
        return sum(dask.compute(*writes))


def weights_source(cfg: RunConfig, target: storage.OutputTarget, weights: list[np.ndarray], info: WeightsInfo,
                   storage_options: dict) -> WeightsSource:
    """Where workers load the weights from: the user's file as is when the workers can read
    it (a remote file, or a local one for a local cluster's workers, which share this disk;
    each worker checks the digest), otherwise an ``.npz`` of them staged beside the output
    (remote workers may not see the client's disk, and random or ImageNet weights have no
    file at all)."""
    if info.kind == "file" and (storage.is_remote(cfg.weights) or cfg.cluster == "local"):
        # A local path made absolute: a worker's working directory may differ.
        url = cfg.weights if "://" in cfg.weights else os.path.abspath(cfg.weights)
        return WeightsSource(url, info.sha256, storage_options)
    url = target.write_bytes(f"{INTERNAL}/weights-{info.sha256[:16]}.npz", npz_bytes(weights))
    return WeightsSource(url, info.sha256, storage_options)


def _weights_loads(client, key: str) -> dict[str, int]:
    """How many times each live worker read the weights file (1 each in the normal case)."""
    counts = client.run(model.load_counts, on_error="ignore")
    return {w: int(c.get(key, 0)) for w, c in sorted(counts.items()) if isinstance(c, dict)}
