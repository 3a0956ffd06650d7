"""Execution backends: where and how the shared stages run (Dask by default, Spark to compare).

A backend decides only *where* things run. The pipeline (:mod:`fruitdask.pipeline`) calls
its steps in order, each inside its own stage timer, and owns everything both backends
share: the listing, the weights, the featurization settings, the table update
(:mod:`fruitdask.lake.update`: the task bodies of :mod:`fruitdask.lake.tasks` tell good
rows from failed images) and the run record.

The steps of a :class:`fruitdask.backends.base.Backend`, in the order the pipeline calls them:

``start(stack, settings)`` (stage ``startup``)
    Open the engine; it closes with ``stack``. Dask starts before the listing on a first run,
    so that its workers warm up meanwhile (``starts_early``); an update lists and diffs first
    and starts nothing when there is nothing to do; Spark once there is work.
``describe()``, ``resolve_precision(requested)``, ``warm_up(stack, settings)``
    The cluster's shape (``run.json``'s ``cluster``); ``--precision`` resolved by the workers
    themselves when they run on other machines (:func:`workers_elsewhere`; otherwise the
    pipeline resolves it on this one before anything starts); then early work on the workers:
    the VGG16 graph of the run's :class:`~fruitdask.features.settings.FeatureSettings`.
``running()``
    A context around the steps below (Dask: the performance report).
``prepare(weights, weights_info)`` (stage ``broadcast``)
    Get the weights to the workers; returns the
    :class:`~fruitdask.features.weights_file.WeightsSource` the tasks load them from.
``featurize_parts(manifest_url, sizes, job)`` (stage ``featurize``)
    Each manifest partition through :func:`fruitdask.lake.tasks.featurize_part` where the
    engine runs things; the receipts (files written, failed images), with the progress bar.
``map_tasks(fn, args_list)``, ``tree_reduce(leaves)`` (stages ``pca``, ``write``)
    The lake's other task bodies (moments, projection, file rewrites) on the engine;
    :mod:`fruitdask.lake.update` decides which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fruitdask.config import RunConfig
from fruitdask.errors import ConfigError

if TYPE_CHECKING:  # light on purpose: the run command imports this before anything heavy
    from fruitdask.backends.base import Backend
    from fruitdask.progress import Progress
    from fruitdask.storage import OutputTarget


def make_backend(cfg: RunConfig, target: OutputTarget, progress: Progress) -> Backend:
    """The backend ``cfg.backend`` writing into ``target`` (imported lazily: Spark is an extra)."""
    if cfg.backend == "dask":
        from fruitdask.backends.dask.backend import DaskBackend

        return DaskBackend(cfg, target, progress)
    if cfg.backend == "spark":
        from fruitdask.backends.spark.backend import SparkBackend

        return SparkBackend(cfg, target, progress)
    raise ConfigError(f"unknown backend {cfg.backend!r}: use dask or spark")


def start_early(cfg: RunConfig, *, gated: bool = False) -> None:
    """Start what the backend can start before the run's own imports and checks: for a
    local Dask cluster, the fork server its workers come from, importing TensorFlow, or,
    ``gated`` (an update, which may have nothing to do), everything before TensorFlow
    (:mod:`fruitdask.backends.dask.forkserver`). Nothing for the other backends."""
    if cfg.backend == "dask" and cfg.cluster == "local":
        from fruitdask.backends.dask.cluster import start_fork_server

        # Before the table is read, `auto` is a guess: int8 is OpenVINO's, anything else TensorFlow's.
        runtime = cfg.runtime if cfg.runtime != "auto" else ("openvino" if cfg.precision == "int8" else "tensorflow")
        start_fork_server(gated=gated, runtime=runtime)


def stop_early() -> None:
    """After a run: a fork server :func:`start_early` left at its gate (the run had nothing to
    do, or failed before its cluster) leaves without importing TensorFlow."""
    from fruitdask.backends.dask import forkserver

    forkserver.close_gate()


def workers_elsewhere(cfg: RunConfig) -> bool:
    """Whether the model runs on other machines than this one (a Dask scheduler address or
    Kubernetes), so that what this machine's CPU can do says nothing about the workers."""
    return cfg.backend == "dask" and cfg.cluster != "local"
