"""``--cluster kubernetes``: a Dask cluster from the dask-kubernetes operator.

:func:`make_cluster_spec` is pure: it turns :class:`~fruitdask.config.KubeSettings` into
the ``DaskCluster`` resource that the operator's ``KubeCluster`` creates, so the spec is
tested without a cluster. :func:`open_kube_cluster` is the only place that talks to the
Kubernetes API; dask-kubernetes is imported there, lazily, so the rest of fruitdask runs
without it.

The pods get the same hardening as the Helm chart (``helm/fruitdask``): non-root, read-only
root filesystem, all capabilities dropped, RuntimeDefault seccomp, writable ``emptyDir``
volumes for ``HOME``, ``/tmp`` and the worker's spill directory, and a required node
affinity on the EU region.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .config import EU_REGIONS, TF_ENV, KubeSettings
from .errors import ClusterError

logger = logging.getLogger(__name__)

#: Set on the scheduler and every worker. The pipeline broadcasts the model weights with
#: ``scatter(broadcast=True)``; the Active Memory Manager's ReduceReplicas policy would
#: otherwise drop those replicas again and every task would refetch them.
AMM_OFF_ENV: dict[str, str] = {"DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START": "False"}

SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
WORKER_DASHBOARD_PORT = 8788
UID = 10001  # the non-root user of the Dockerfile
HOME = "/home/fruitdask"
SCRATCH = "/scratch"
# The scheduler's own footprint; the worker size comes from KubeSettings.
SCHEDULER_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "500m", "memory": "1Gi"},
    "limits": {"cpu": "1", "memory": "2Gi"},
}
# Share of the container memory limit given to Dask's --memory-limit: the nanny process
# and the Python runtime need the rest, or the kernel OOM-kills before Dask spills.
MEMORY_FRACTION = 0.9

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_quantity(quantity: str) -> int:
    """Bytes in a Kubernetes memory quantity such as ``"8Gi"``, ``"512Mi"`` or ``"2G"``.

    Raises
    ------
    ClusterError
        If the quantity has no recognised unit or no number.
    """
    text = str(quantity).strip()
    # Two-letter binary suffixes first, so "Mi" is not read as "M".
    suffix = next((u for u in (*_BINARY, *_DECIMAL) if text.endswith(u)), "")
    number, factor = text[: len(text) - len(suffix)], {**_BINARY, **_DECIMAL}.get(suffix, 1)
    try:
        return int(float(number) * factor)
    except ValueError as e:
        raise ClusterError(
            f"memory {quantity!r} is not a Kubernetes quantity: use e.g. 8Gi or 512Mi"
        ) from e


def worker_threads(cpu: str) -> int:
    """``--nthreads`` for a CPU quantity: ``"2"`` -> 2, ``"1500m"`` -> 1 (at least 1)."""
    text = str(cpu).strip()
    try:
        cores = int(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError as e:
        raise ClusterError(f"cpu {cpu!r} is not a Kubernetes quantity: use e.g. 2 or 1500m") from e
    return max(1, math.floor(cores))


def _env_list(env: dict[str, str]) -> list[dict[str, str]]:
    return [{"name": k, "value": str(v)} for k, v in sorted(env.items())]


def _security() -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod, container) security contexts meeting the Pod Security "restricted" level."""
    seccomp = {"type": "RuntimeDefault"}
    pod = {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": seccomp,
    }
    container = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": seccomp,
    }
    return pod, container


def _pod_spec(
    settings: KubeSettings, container: dict[str, Any], extra_volumes: list[dict[str, Any]]
) -> dict[str, Any]:
    pod_sc, container_sc = _security()
    container["securityContext"] = container_sc
    container["imagePullPolicy"] = "IfNotPresent"
    container["volumeMounts"] = [
        {"name": "home", "mountPath": HOME},
        {"name": "tmp", "mountPath": "/tmp"},
    ] + [{"name": v["name"], "mountPath": SCRATCH} for v in extra_volumes]
    spec: dict[str, Any] = {
        "securityContext": pod_sc,
        "automountServiceAccountToken": False,
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "topology.kubernetes.io/region",
                                    "operator": "In",
                                    "values": [settings.region],
                                }
                            ]
                        }
                    ]
                }
            }
        },
        "containers": [container],
        "volumes": [{"name": "home", "emptyDir": {"sizeLimit": "1Gi"}}, {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}, *extra_volumes],
    }
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    return spec


def make_cluster_spec(settings: KubeSettings, env: dict[str, str]) -> dict[str, Any]:
    """The ``DaskCluster`` resource (``kubernetes.dask.org/v1``) for these settings.

    Same layout as ``dask_kubernetes.operator.make_cluster_spec``, with ``dask scheduler`` /
    ``dask worker`` commands (``dask-scheduler`` is gone from distributed), a hardened pod
    spec, the region affinity, the service account (IRSA for S3) and the environment.

    Parameters
    ----------
    settings
        Image, worker count and size, namespace, service account and region.
    env
        Extra environment for scheduler and workers (e.g. ``FRUITDASK_STORAGE_*``). It may
        not override :data:`~fruitdask.config.TF_ENV` or the Active Memory Manager switch.

    Returns
    -------
    dict
        A plain dict, ready for ``KubeCluster(custom_cluster_spec=...)``.

    Raises
    ------
    ClusterError
        If the region is outside the EU allow-list, the worker count is below 1, or a
        resource quantity is malformed.
    """
    if settings.region not in EU_REGIONS:
        raise ClusterError(
            f"Kubernetes region {settings.region!r} is outside the EU: use one of {', '.join(EU_REGIONS)}"
        )
    if settings.n_workers < 1:
        raise ClusterError(f"n_workers must be at least 1, got {settings.n_workers}: e.g. 2")
    memory_limit = int(parse_quantity(settings.worker_memory) * MEMORY_FRACTION)
    nthreads = worker_threads(settings.worker_cpu)
    full_env = {
        **env,
        "HOME": HOME,
        "TMPDIR": "/tmp",
        "AWS_REGION": settings.region,
        "AWS_DEFAULT_REGION": settings.region,
        **TF_ENV,
        **AMM_OFF_ENV,
    }
    labels = {
        "app.kubernetes.io/name": "fruitdask",
        "app.kubernetes.io/instance": settings.name,
        "app.kubernetes.io/managed-by": "dask-kubernetes",
        "app.kubernetes.io/part-of": "fruitdask",
    }

    worker_resources = {
        "requests": {"cpu": settings.worker_cpu, "memory": settings.worker_memory},
        "limits": {"cpu": settings.worker_cpu, "memory": settings.worker_memory},
    }
    worker_container = {
        "name": "worker",
        "image": settings.image,
        "args": [
            "dask",
            "worker",
            "--name",
            "$(DASK_WORKER_NAME)",
            "--nthreads",
            str(nthreads),
            "--memory-limit",
            str(memory_limit),
            "--local-directory",
            SCRATCH,
            "--dashboard",
            "--dashboard-address",
            str(WORKER_DASHBOARD_PORT),
        ],
        "env": _env_list(full_env),
        "resources": worker_resources,
        "ports": [{"name": "http-dashboard", "containerPort": WORKER_DASHBOARD_PORT, "protocol": "TCP"}],
    }
    scheduler_container = {
        "name": "scheduler",
        "image": settings.image,
        "args": ["dask", "scheduler", "--host", "0.0.0.0", "--port", str(SCHEDULER_PORT),
                 "--dashboard-address", f":{DASHBOARD_PORT}"],
        "env": _env_list(full_env),
        "resources": SCHEDULER_RESOURCES,
        "ports": [
            {"name": "tcp-comm", "containerPort": SCHEDULER_PORT, "protocol": "TCP"},
            {"name": "http-dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"port": "http-dashboard", "path": "/health"},
            "initialDelaySeconds": 0,
            "periodSeconds": 1,
            "timeoutSeconds": 300,
        },
        "livenessProbe": {
            "httpGet": {"port": "http-dashboard", "path": "/health"},
            "initialDelaySeconds": 15,
            "periodSeconds": 20,
        },
    }
    scratch = [{"name": "scratch", "emptyDir": {"sizeLimit": settings.worker_memory}}]
    return {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskCluster",
        "metadata": {"name": settings.name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "idleTimeout": 0,
            "worker": {
                "replicas": settings.n_workers,
                "metadata": {"labels": {**labels, "app.kubernetes.io/component": "worker"}},
                "spec": _pod_spec(settings, worker_container, scratch),
            },
            "scheduler": {
                "metadata": {"labels": {**labels, "app.kubernetes.io/component": "scheduler"}},
                "spec": _pod_spec(settings, scheduler_container, []),
                "service": {
                    "type": "ClusterIP",
                    "selector": {
                        "dask.org/cluster-name": settings.name,
                        "dask.org/component": "scheduler",
                    },
                    "ports": [
                        {"name": "tcp-comm", "protocol": "TCP", "port": SCHEDULER_PORT,
                         "targetPort": "tcp-comm"},
                        {"name": "http-dashboard", "protocol": "TCP", "port": DASHBOARD_PORT,
                         "targetPort": "http-dashboard"},
                    ],
                },
            },
        },
    }


@contextmanager
def open_kube_cluster(settings: KubeSettings, env: dict[str, str]) -> Iterator[Any]:
    """Create (or connect to) a Dask cluster on Kubernetes; close only what was created.

    Parameters
    ----------
    settings
        With ``connect_existing`` the cluster named ``settings.name`` in
        ``settings.namespace`` must already exist and is left running on exit; otherwise a
        new one is created from :func:`make_cluster_spec` and deleted on exit.
    env
        Extra environment for scheduler and workers (see :func:`make_cluster_spec`).

    Yields
    ------
    dask_kubernetes.operator.KubeCluster
        Pass it to ``distributed.Client``.

    Raises
    ------
    ClusterError
        If dask-kubernetes is not installed, or the Kubernetes API or the operator cannot
        be reached.
    """
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as e:
        raise ClusterError(
            "--cluster kubernetes needs dask-kubernetes: pip install dask-kubernetes, "
            "or pass --cluster tcp://SCHEDULER:8786 to use a running scheduler"
        ) from e

    spec = None if settings.connect_existing else make_cluster_spec(settings, env)
    try:
        if settings.connect_existing:
            logger.info("connecting to DaskCluster %s in namespace %s", settings.name, settings.namespace)
            cluster = KubeCluster.from_name(settings.name, namespace=settings.namespace, quiet=True)
        else:
            logger.info(
                "creating DaskCluster %s in namespace %s with %d workers",
                settings.name,
                settings.namespace,
                settings.n_workers,
            )
            cluster = KubeCluster(
                custom_cluster_spec=spec,
                namespace=settings.namespace,
                shutdown_on_close=True,
                quiet=True,
            )
    except ClusterError:
        raise
    except Exception as e:  # kr8s/kopf/aiohttp raise many types for "no cluster"
        # The half-built cluster stays registered for dask-kubernetes' atexit reaper, which
        # would fail a second time, noisily, at interpreter exit.
        instances = getattr(KubeCluster, "_instances", None)
        if instances is not None:
            for stale in [c for c in instances if getattr(c, "name", None) == settings.name]:
                instances.discard(stale)
        action = "connect to" if settings.connect_existing else "create"
        raise ClusterError(
            f"could not {action} DaskCluster {settings.name!r} in namespace {settings.namespace!r}: {e}. "
            "Check that kubectl reaches the cluster (KUBECONFIG, or run in-cluster), that the "
            "dask-kubernetes operator is installed (helm install --repo https://helm.dask.org "
            "-n dask-operator --create-namespace dask-kubernetes-operator dask-kubernetes-operator), "
            "and, with connect_existing, that the cluster exists"
        ) from e
    try:
        yield cluster
    finally:
        # A connected cluster has shutdown_on_close=False, so close() leaves it running.
        cluster.close()
