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
cluster is up (:func:`session`), while the client lists the images and reads the weights.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd

from fruitdask import checkpoint, storage
from fruitdask.backends import BackendResult, RunContext
from fruitdask.backends.dask import manifest
from fruitdask.backends.dask.cluster import cluster_shape, dask_client, worker_addresses
from fruitdask.config import RunConfig
from fruitdask.errors import OutputError
from fruitdask.features import frames, model
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsSource, npz_bytes
from fruitdask.reduce import Reduction, fit_incremental_pca, silence_first_batch_warning
from fruitdask.runinfo import StageTimer

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


def n_partitions(n_images: int, partition_size: int, n_threads: int) -> int:
    """Partitions of about ``partition_size`` images, a multiple of the cluster's threads so
    that the last wave keeps every thread busy."""
    parts = max(1, math.ceil(n_images / partition_size))
    if n_threads > 1:
        parts = math.ceil(parts / n_threads) * n_threads
    return max(1, min(parts, n_images))


def _split(listing: pd.DataFrame, parts: int) -> list[pd.DataFrame]:
    bounds = np.linspace(0, len(listing), parts + 1).round().astype(int)
    return [listing.iloc[a:b].reset_index(drop=True) for a, b in itertools.pairwise(bounds) if b > a]


def _matrix_of(df: pd.DataFrame) -> np.ndarray:
    return frames.matrix(df["features"])


#: Folder of the staging prefix for the run's own inputs (manifest, weights, reduction);
#: removed before the commit, so it never reaches the output.
INTERNAL = "_fruitdask"


@dataclass
class Session:
    """A connected client, its cluster's shape, and the warm-up tasks sent to its workers."""

    client: Any
    shape: dict
    warm_ups: list = field(default_factory=list)


def _submit_warm_ups(client, cfg: RunConfig) -> list:
    """One :func:`warm_up_on_worker` task pinned to each worker present now (a worker that
    joins later builds its model at its first partition instead)."""
    return [
        client.submit(warm_up_on_worker, cfg.image_size, cfg.precision, key=f"warm-up-{uuid.uuid4().hex}",
                      workers=[w], allow_other_workers=False, pure=False)
        for w in worker_addresses(client)
    ]


def warm_up_on_worker(image_size: int, precision: str = "float32") -> float:
    """Task body: :func:`fruitdask.features.model.warm_up` with this worker's thread count."""
    return model.warm_up(image_size, _worker_threads(), precision)


@contextmanager
def session(cfg: RunConfig, timer: StageTimer, on_cluster: Callable[[dict], None] = lambda _: None) -> Iterator[Session]:
    """Open the client (``startup``), report the cluster, and start the workers' warm-up."""
    with ExitStack() as stack:
        with timer.stage("startup"):
            client = stack.enter_context(dask_client(cfg))
        shape = cluster_shape(client)
        on_cluster(shape)
        warm = _submit_warm_ups(client, cfg)
        try:
            yield Session(client, shape, warm)
        finally:
            if warm:
                client.cancel(warm)  # unfinished on a worker that died; finished ones are released


def weights_source(ctx: RunContext, storage_options: dict) -> WeightsSource:
    """Where workers load the weights from: the user's remote file as is, otherwise an
    ``.npz`` of them staged beside the output (workers may not see the client's disk, and
    random or ImageNet weights have no file at all)."""
    info = ctx.weights_info
    if info.kind == "file" and storage.is_remote(ctx.cfg.weights):
        return WeightsSource(ctx.cfg.weights, info.sha256, storage_options)
    url = ctx.target.write_bytes(f"{INTERNAL}/weights-{info.sha256[:16]}.npz", npz_bytes(ctx.weights))
    return WeightsSource(url, info.sha256, storage_options)


def _read_reduction(url: str, storage_options: dict) -> Reduction:
    return Reduction.from_npz(storage.read_bytes(url, storage_options))


def run(ctx: RunContext) -> BackendResult:
    """Featurize, reduce and write the dataset into ``ctx.target``'s staging prefix."""
    with ExitStack() as stack:
        sess = ctx.session or stack.enter_context(session(ctx.cfg, ctx.timer, ctx.on_cluster))
        return _run(ctx, sess)


def _run(ctx: RunContext, sess: Session) -> BackendResult:
    cfg, timer, client, shape = ctx.cfg, ctx.timer, sess.client, sess.shape
    storage_options = cfg.storage.storage_options()
    extra: dict = {}
    from distributed import performance_report, wait

    with tempfile.TemporaryDirectory(prefix="fruitdask-") as tmp:
        report_file = os.path.join(tmp, "dask-report.html")
        with performance_report(filename=report_file):
            with timer.stage("broadcast"):
                # Files, not scattered data: every task input can be read again (module doc).
                source = weights_source(ctx, storage_options)
                parts = _split(ctx.listing, n_partitions(len(ctx.listing), cfg.partition_size, shape["threads"] or 1))
                manifest_url = ctx.target.staging_path(f"{INTERNAL}/manifest.parquet")
                manifest.write_manifest(parts, manifest_url, storage_options)
                listing = dd.from_map(
                    manifest.read_part, range(len(parts)), url=manifest_url, storage_options=storage_options,
                    meta=ctx.listing.iloc[:0], label="manifest", enforce_metadata=False,
                )
            with timer.stage("featurize"):
                settings = FeatureSettings.from_config(cfg, ctx.weights_info.sha256)
                ckpt = checkpoint.for_run(cfg.output, settings, cfg.resume)
                extra["checkpoint"] = {"prefix": ckpt.prefix, "resume": ckpt.resume}
                feats = listing.map_partitions(
                    featurize_on_worker, source, settings, checkpoints=ckpt, meta=frames.features_meta()
                ).persist()
                track_images(feats, [len(p) for p in parts], ctx.progress)
                wait(feats)
                errors = (
                    feats[~feats["error_stage"].isna()][["path", "label", "error_stage", "error_reason"]]
                    .compute()
                    .rename(columns={"error_stage": "stage", "error_reason": "reason"})
                    .reset_index(drop=True)
                )
                good = feats[feats["error_stage"].isna()][["path", "label", "features"]]
                lengths = [int(x) for x in good.map_partitions(len).compute()]
            n_rows = sum(lengths)
            with timer.stage("pca"):
                client.run(silence_first_batch_warning, on_error="ignore")  # a worker may be gone
                d = cfg.feature_dim
                blocks = [
                    da.from_delayed(dask.delayed(_matrix_of)(part), shape=(n, d), dtype=np.float32)
                    for part, n in zip(good.to_delayed(), lengths, strict=True)
                    if n > 0
                ]
                X = da.concatenate(blocks, axis=0) if blocks else da.zeros((0, d), dtype=np.float32)
                reduction = fit_incremental_pca(
                    X,
                    components=cfg.components,
                    variance=cfg.variance,
                    batch_size=cfg.pca_batch_size,
                    power_iterations=cfg.pca_power_iterations,
                    seed=cfg.seed,
                )
            with timer.stage("write"):
                # A task result read from a staged file, not scattered: recomputable anywhere.
                red_url = ctx.target.write_bytes(f"{INTERNAL}/reduction.npz", reduction.to_npz())
                red = dask.delayed(_read_reduction, pure=True)(red_url, storage_options)
                out = good.map_partitions(frames.add_pca, red, meta=frames.output_meta())
                writes = [
                    dask.delayed(storage.write_parquet_part)(
                        part, ctx.target.staging_path(f"features/part-{i:05d}.parquet"), frames.OUTPUT_SCHEMA, storage_options
                    )
                    for i, part in enumerate(out.to_delayed())
                ]
                written = sum(dask.compute(*writes))
        with open(report_file, "rb") as f:
            ctx.target.write_bytes("dask-report.html", f.read())
        extra["performance_report"] = "dask-report.html"
    del feats
    storage.remove_prefix(ctx.target.staging_path(INTERNAL), storage_options)
    extra["weights_loads"] = _weights_loads(client, ctx.weights_info.sha256)
    if written != n_rows:
        raise OutputError(f"wrote {written} rows but featurized {n_rows}: the output is incomplete, run again")
    return BackendResult(rows=n_rows, errors=errors, reduction=reduction, cluster=shape, extra=extra)


def _weights_loads(client, key: str) -> dict[str, int]:
    """How many times each live worker read the weights file (1 each in the normal case)."""
    counts = client.run(model.load_counts, on_error="ignore")
    return {w: int(c.get(key, 0)) for w, c in sorted(counts.items()) if isinstance(c, dict)}
