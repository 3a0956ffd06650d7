"""The single place that opens and closes the Dask client.

Three modes, chosen by ``--cluster``: ``local`` (a ``LocalCluster`` of worker processes
sized to this machine), an existing scheduler address (``tcp://host:8786``, ``tls://...``),
or ``kubernetes`` (dask-kubernetes' operator, see :mod:`fruitdask.backends.dask.kube_connect`). Whatever this
module creates, it closes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fruitdask.config import TF_ENV, RunConfig
from fruitdask.errors import ClusterError

if TYPE_CHECKING:  # the settings module imports the configuration only; kept off the command's first imports
    from fruitdask.features.settings import FeatureSettings

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = "20s"
#: How local worker processes are started. ``forkserver`` forks each worker from a small
#: server process that already imported ``distributed`` (and numpy, pandas...), and its
#: children leave with ``os._exit`` instead of unwinding a TensorFlow-laden interpreter:
#: on a quiet 2-core machine (``benchmarks/cluster_lifecycle.py``), closing a 2-worker
#: cluster after TensorFlow ran took 1.10 s with Dask's default ``spawn`` and 0.05 s with
#: ``forkserver``; starting it 0.2 s more (the fork server starts first).
LOCAL_START_METHOD = "forkserver"


@dataclass(frozen=True)
class LocalShape:
    n_workers: int
    threads_per_worker: int


#: Most threads one local worker gets by default: the largest machine measured (16 cores).
MAX_LOCAL_THREADS = 16


def local_shape(n_workers: int | None, threads_per_worker: int | None, cores: int | None = None) -> LocalShape:
    """Default LocalCluster shape, by measurement (docs/architecture-review.md, "LocalCluster shape").

    One worker process with a thread per core: one TensorFlow import, one VGG16 build and
    one copy of the weights, and its partitions share TensorFlow's thread pool. Measured
    best at 224 px, float32, against raw Keras in the same invocation
    (``benchmarks/local_shape.py``): on 2 cores 1 x 2 (27.2 s end to end against 28.7 s
    for 2 x 1); on 16 cores (Intel Xeon with AMX) 1 x 16, steady 51.9 and 54.5 images/s
    in two invocations against 48.9 and 49.6 for 8 x 2, 50.7 and 51.8 for 2 x 8, 46.7 for
    16 x 1, and the best end to end in both. Above 16 cores (not measured) one such worker
    per 16 cores. A flag given alone is completed to fill the cores.
    """
    cores = cores or os.cpu_count() or 1
    if n_workers and threads_per_worker:
        return LocalShape(n_workers, threads_per_worker)
    if n_workers:
        return LocalShape(n_workers, max(1, cores // n_workers))
    threads = threads_per_worker or min(cores, MAX_LOCAL_THREADS)
    return LocalShape(max(1, cores // threads), threads)


def local_start_method() -> str | None:
    """``forkserver`` where this platform has it and Dask's own default (``spawn``) is in
    force; ``None`` (keep the configured method) when someone chose one on purpose."""
    import multiprocessing

    import dask

    configured = dask.config.get("distributed.worker.multiprocessing-method", "spawn")
    if configured != "spawn" or LOCAL_START_METHOD not in multiprocessing.get_all_start_methods():
        return None
    return LOCAL_START_METHOD


def start_fork_server(*, gated: bool = False, runtime: str = "tensorflow") -> None:
    """Start the fork server local workers come from, with their imports, if they will be
    forked (:func:`local_start_method`); once it runs, let it import TensorFlow unless
    ``gated`` (see :mod:`fruitdask.backends.dask.forkserver`); ``runtime`` names the inference
    runtime whose library it preloads."""
    if local_start_method() == "forkserver":
        from fruitdask.backends.dask import forkserver

        forkserver.start_early({**TF_ENV, forkserver.RUNTIME_ENV: runtime}, gated=gated)
        if not gated:
            forkserver.open_gate()


def start_local_cluster(
    n_workers: int,
    threads_per_worker: int,
    *,
    processes: bool = True,
    env: Mapping[str, str] | None = TF_ENV,
    dashboard_address: str = ":0",
    **kwargs,
):
    """Start a ``distributed.LocalCluster``; the caller closes it.

    The one place that builds a local cluster, for ``--cluster local``, the tests and the
    benchmarks alike. Worker processes get ``env`` (TensorFlow's quiet, single-pool
    settings by default); threads in this process share its environment, so ``env`` only
    applies with ``processes=True``.

    Parameters
    ----------
    n_workers, threads_per_worker
        The cluster's shape.
    processes
        Worker processes (each under a nanny) or threads of this process.
    env
        Environment of each worker process; ``None`` for none beyond the inherited one.
    dashboard_address
        ``":0"`` picks a free port, so several clusters never collide.
    **kwargs
        Passed to ``LocalCluster`` (``memory_limit``, ``silence_logs``, ``lifetime`` ...).
    """
    from distributed import LocalCluster

    if processes and env is not None:
        kwargs["env"] = dict(env)
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=processes,
        dashboard_address=dashboard_address,
        **kwargs,
    )


def _warm_up_preload(settings: FeatureSettings | None) -> dict:
    """Worker keywords that start the warm-up of ``settings``' model with each worker process
    (see :mod:`fruitdask.backends.dask.preload`); none without settings or while their
    precision is still ``auto``."""
    if settings is None or settings.precision not in ("float32", "bfloat16"):
        return {}
    from fruitdask.backends.dask import preload

    return {"preload": [preload.__name__], "preload_argv": preload.argv(settings)}


def _local(cfg: RunConfig, stack: ExitStack, settings: FeatureSettings | None):
    import dask

    method = local_start_method()
    if method:
        start_fork_server()  # started already by the command, unless called as a library
        # For the cluster's whole life: a nanny restarting a lost worker reads it again.
        stack.enter_context(dask.config.set({"distributed.worker.multiprocessing-method": method}))
    shape = local_shape(cfg.n_workers, cfg.threads_per_worker)
    logger.info("starting LocalCluster: %d workers x %d threads", shape.n_workers, shape.threads_per_worker)
    try:
        cluster = start_local_cluster(
            shape.n_workers,
            shape.threads_per_worker,
            memory_limit=cfg.memory_limit,
            dashboard_address=cfg.dashboard_address,
            # The fork server is started once per process and keeps the environment of
            # that moment: give each worker this process's environment of *now* (AWS
            # profile, endpoint, credentials files), as a spawned worker would inherit it.
            env={**os.environ, **TF_ENV} if method else TF_ENV,
            **_warm_up_preload(settings),
            silence_logs=logging.ERROR if not cfg.debug else logging.INFO,
        )
    except Exception as e:
        raise ClusterError(f"could not start a local Dask cluster: {e}") from e
    stack.callback(cluster.close)
    return cluster


@contextmanager
def dask_client(cfg: RunConfig, settings: FeatureSettings | None = None) -> Iterator:
    """Yield a connected ``distributed.Client``; close the client and anything created.

    A local cluster's workers start warming up the model of ``settings`` when given."""
    from distributed import Client

    with ExitStack() as stack:
        target = cfg.cluster
        security = None  # Dask's configuration, for local clusters and tcp:// / tls:// addresses
        if target == "local":
            cluster = _local(cfg, stack, settings)
        elif target == "kubernetes":
            from fruitdask.backends.dask.kube_connect import open_kube_cluster

            kube = stack.enter_context(open_kube_cluster(cfg.kube, dict(TF_ENV)))
            cluster, security = kube.scheduler_address, kube.security
            if kube.dashboard_link:
                logger.info("Dask dashboard of the Kubernetes cluster: %s", kube.dashboard_link)
        elif "://" in target:
            cluster = target
        else:
            raise ClusterError(
                f"--cluster {target!r} is not understood: use local, kubernetes, or a scheduler address like tcp://host:8786"
            )
        timeout = f"{cfg.cluster_timeout:g}s" if cfg.cluster_timeout else CONNECT_TIMEOUT
        try:
            client = Client(cluster, timeout=timeout, set_as_default=True, security=security)
        except (OSError, TimeoutError) as e:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {target!r} within {timeout} (--cluster-timeout): "
                "check the address and that the scheduler is running (kubectl port-forward for a cluster)"
            ) from e
        stack.callback(client.close)
        logger.debug("Dask dashboard: %s", client.dashboard_link)
        yield client


def cluster_shape(client) -> dict:
    """Workers, threads and memory of the connected cluster, for ``run.json``."""
    info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else client.scheduler_info()
    workers = info.get("workers", {})
    return {
        "n_workers": len(workers),
        "threads": sum(w.get("nthreads", 0) for w in workers.values()),
        "memory_limit_bytes": sum(w.get("memory_limit", 0) or 0 for w in workers.values()),
        "scheduler": info.get("address"),
        "dashboard": client.dashboard_link,
    }


def worker_addresses(client) -> list[str]:
    """Addresses of the workers connected now (all of them, however many)."""
    info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else client.scheduler_info()
    return sorted(info.get("workers", {}))


def _accepts_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters
