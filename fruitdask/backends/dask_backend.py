"""The Dask backend: scatter the weights, ``map_partitions`` the featurization, stream the PCA.

Weights travel with ``client.scatter([weights], broadcast=True)``: one transfer per worker,
visible in the dashboard as a single key, and passed to tasks as a future so they never sit
inside a task's closure. (A ``WorkerPlugin`` would also survive the loss of every holder,
but it keeps a second copy in the scheduler's memory and hides the transfer from the task
graph; a lost worker is recovered either way, because the remaining replicas feed the
replacement.) Each worker process builds its Keras model once and reuses it
(:func:`fruitdask.model.cached_model`).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import tempfile
from contextlib import ExitStack

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd

from .. import checkpoint, frames, storage
from ..cluster import cluster_shape, dask_client
from ..errors import OutputError
from ..reduce import fit_incremental_pca, silence_first_batch_warning
from . import BackendResult, RunContext

logger = logging.getLogger(__name__)


def featurize_on_worker(
    df: pd.DataFrame, weights: list[np.ndarray], checkpoints: checkpoint.Checkpoints | None = None, **kwargs
) -> pd.DataFrame:
    """Task body: pin TensorFlow to this worker's threads, then featurize the partition
    (or reuse its checkpoint under ``--resume``; see :mod:`fruitdask.checkpoint`)."""
    from distributed import get_worker

    try:
        threads = get_worker().state.nthreads
    except ValueError:  # not on a worker (e.g. the synchronous scheduler in tests)
        threads = None
    return checkpoint.featurize_checkpointed(df, weights, checkpoints, threads=threads, **kwargs)


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


def run(ctx: RunContext) -> BackendResult:
    """Featurize, reduce and write the dataset into ``ctx.target``'s staging prefix."""
    cfg, timer = ctx.cfg, ctx.timer
    storage_options = cfg.storage.storage_options()
    extra: dict = {}
    with ExitStack() as stack:
        with timer.stage("startup"):
            client = stack.enter_context(dask_client(cfg))
        shape = cluster_shape(client)
        ctx.on_cluster(shape)
        from distributed import performance_report, wait

        with tempfile.TemporaryDirectory(prefix="fruitdask-") as tmp:
            report_file = os.path.join(tmp, "dask-report.html")
            with performance_report(filename=report_file):
                with timer.stage("broadcast"):
                    # Wrapped in a list: scatter() of a bare list returns one future per item.
                    weights = client.scatter([ctx.weights], broadcast=True, hash=False)[0]
                    wait(weights)
                    parts = _split(ctx.listing, n_partitions(len(ctx.listing), cfg.partition_size, shape["threads"] or 1))
                    # The listing travels as data, not inside the task graph: a lake of
                    # millions of paths would otherwise make a graph of hundreds of MB.
                    # hash=False: dask's tokenize of pandas-3 string columns ignores their
                    # values, so hashed scatter merged every partition into one key.
                    # broadcast=True, like the weights: scattered data cannot be recomputed,
                    # so a part held by one worker only would be lost with it (issue 6).
                    listing = dd.from_delayed(
                        client.scatter(parts, hash=False, broadcast=True), meta=ctx.listing.iloc[:0], verify_meta=False
                    )
                with timer.stage("featurize"):
                    ckpt = checkpoint.for_run(cfg.output, ctx.weights_info.sha256, cfg)
                    extra["checkpoint"] = {"prefix": ckpt.prefix, "resume": ckpt.resume}
                    feats = listing.map_partitions(
                        featurize_on_worker,
                        weights,
                        weights_key=ctx.weights_info.sha256,
                        image_size=cfg.image_size,
                        precision=cfg.precision,
                        pooling=cfg.pooling,
                        batch_size=cfg.batch_size,
                        storage_options=storage_options,
                        checkpoints=ckpt,
                        meta=frames.features_meta(),
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
                    client.run(silence_first_batch_warning)
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
                    # Broadcast like the weights: a lost worker must not take the only copy.
                    red = client.scatter(reduction, broadcast=True, hash=False)
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
        extra["weight_replicas"] = len(client.who_has(weights).get(weights.key, ()))
    if written != n_rows:
        raise OutputError(f"wrote {written} rows but featurized {n_rows}: the output is incomplete, run again")
    return BackendResult(rows=n_rows, errors=errors, reduction=reduction, cluster=shape, extra=extra)
