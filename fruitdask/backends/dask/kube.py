"""``--cluster kubernetes``: the ``DaskCluster`` resource of the dask-kubernetes operator.

The builders are pure: :func:`make_cluster_spec` turns :class:`~fruitdask.config.KubeSettings`
into the ``DaskCluster`` resource (scheduler and worker containers, ports, sizes,
environment, the scheduler's Service), so everything is tested without a cluster. Its pods
come from :mod:`fruitdask.backends.dask.kube_pods` (hardened, region-bound, mutual TLS), the
service account and NetworkPolicies created beside it from
:mod:`fruitdask.backends.dask.kube_policies`; :mod:`fruitdask.backends.dask.kube_connect`
creates them all and connects the client, the only place that talks to the Kubernetes API.

The scheduler keeps Dask's defaults, the Active Memory Manager included: nothing a run
needs is scattered (the weights are a file each worker reads once), so no replica needs
protecting from it.
"""

from __future__ import annotations

import math
from typing import Any

from fruitdask.backends.dask.kube_pods import HOME, SCRATCH, pod_spec, tls_env
from fruitdask.config import EU_REGIONS, TF_ENV, KubeSettings
from fruitdask.errors import ClusterError
from fruitdask.storage import stores

SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
# Fixed worker and nanny ports (random by default) so the NetworkPolicy can open them.
WORKER_PORT = 9000
NANNY_PORT = 9001
WORKER_DASHBOARD_PORT = 8788
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


def scheduler_service_account_name(settings: KubeSettings) -> str:
    """The role-less service account the scheduler runs under: ``<cluster name>-scheduler``."""
    return f"{settings.name}-scheduler"


def scheduler_address(settings: KubeSettings) -> str:
    """The in-cluster ``tls://`` address of the scheduler Service the operator creates."""
    return f"tls://{settings.name}-scheduler.{settings.namespace}.svc.cluster.local:{SCHEDULER_PORT}"


def owner_references(settings: KubeSettings) -> list[dict[str, Any]]:
    """``metadata.ownerReferences`` naming the pod that owns the cluster, or ``[]``.

    With ``settings.owner_pod_name`` and ``owner_pod_uid`` (the chart's daily pod sets them
    from the downward API), every object created for the cluster (the ``DaskCluster``, its
    scheduler's service account and its NetworkPolicies) names that pod as its owner.
    Kubernetes' garbage collector then deletes them when the pod object goes (the Job's
    TTL, the CronJob's history limit, an eviction, ``kubectl delete pod``), whether or not
    the run reached its own ``finally:``; the operator's scheduler and worker pods follow,
    being owned by the ``DaskCluster``. Not a controller reference and no
    ``blockOwnerDeletion``: the pod's Job stays its controller, and the run needs no right
    on the pod's finalizers. An owner must live in the objects' namespace, which the chart
    guarantees by setting the namespace from the same pod.

    Raises
    ------
    ClusterError
        If only one of the two is set.
    """
    name, uid = settings.owner_pod_name, settings.owner_pod_uid
    if not name and not uid:
        return []
    if not (name and uid):
        raise ClusterError(
            f"the cluster's owner pod needs both a name and a uid, got name={name!r} uid={uid!r}: set "
            "FRUITDASK_KUBE_OWNER_POD_NAME and FRUITDASK_KUBE_OWNER_POD_UID from the downward API "
            "(fieldRef metadata.name and metadata.uid), or neither"
        )
    return [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}]


def object_metadata(settings: KubeSettings, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """``metadata`` of an object created for the cluster: name, namespace, labels and, for a
    cluster owned by a pod, :func:`owner_references`."""
    meta: dict[str, Any] = {"name": name, "namespace": settings.namespace, "labels": labels}
    owners = owner_references(settings)
    if owners:
        meta["ownerReferences"] = owners
    return meta


def make_cluster_spec(settings: KubeSettings, env: dict[str, str]) -> dict[str, Any]:
    """The ``DaskCluster`` resource (``kubernetes.dask.org/v1``) for these settings.

    Same layout as ``dask_kubernetes.operator.make_cluster_spec``, with ``dask scheduler`` /
    ``dask worker`` commands (``dask-scheduler`` is gone from distributed), a hardened pod
    spec, the region affinity and the environment. Every pod speaks mutual TLS with the
    certificates of ``settings.tls_secret``; the workers point at the ``tls://`` address
    (``DASK_SCHEDULER_ADDRESS``, which the operator then leaves alone). The workers run
    under ``settings.service_account`` (IRSA for S3), the scheduler under the role-less
    :func:`scheduler_service_account_name`. A cluster owned by a pod names it in
    ``metadata.ownerReferences`` (:func:`owner_references`).

    Parameters
    ----------
    settings
        Image, worker count and size, namespace, service account and region.
    env
        Extra environment for scheduler and workers (e.g. ``FRUITDASK_STORAGE_*``). It may
        not override ``HOME``, ``TMPDIR``, :data:`~fruitdask.config.TF_ENV`, the region,
        the TLS settings or the workers' scheduler address.

    Returns
    -------
    dict
        A plain dict, ready to create as a ``kubernetes.dask.org/v1`` resource.

    Raises
    ------
    ClusterError
        If the region is outside the EU allow-list, the worker count is below 1, a
        resource quantity is malformed, or no TLS Secret is named.
    """
    _check_settings(settings)
    # The worker's sizes first: a malformed quantity fails before anything else is built.
    worker = _worker_container(settings, env)
    labels = _labels(settings)
    return {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskCluster",
        "metadata": object_metadata(settings, settings.name, labels),
        "spec": {
            "idleTimeout": 0,
            "worker": {
                "replicas": settings.n_workers,
                "metadata": {"labels": {**labels, "app.kubernetes.io/component": "worker"}},
                "spec": pod_spec(settings, worker, settings.service_account, _scratch_volumes(settings)),
            },
            "scheduler": {
                "metadata": {"labels": {**labels, "app.kubernetes.io/component": "scheduler"}},
                "spec": pod_spec(
                    settings, _scheduler_container(settings, env), scheduler_service_account_name(settings), []
                ),
                "service": _scheduler_service(settings),
            },
        },
    }


def _check_settings(settings: KubeSettings) -> None:
    """Refuse what must never be deployed: no TLS, a region outside the EU, no workers."""
    _check_tls_secret(settings)
    if settings.region not in EU_REGIONS:
        raise ClusterError(
            f"Kubernetes region {settings.region!r} is outside the EU: use one of {', '.join(EU_REGIONS)}"
        )
    if settings.n_workers < 1:
        raise ClusterError(f"n_workers must be at least 1, got {settings.n_workers}: e.g. 2")
    owner_references(settings)  # both or neither


def _pod_env(settings: KubeSettings, env: dict[str, str]) -> dict[str, str]:
    """The environment of every pod: ``env`` under the settings it may not override."""
    return {
        **env,
        "HOME": HOME,
        "TMPDIR": "/tmp",
        **stores.pod_env(settings.region),  # what each store's client needs (S3: AWS_REGION)
        **TF_ENV,
        **tls_env(),
    }


def _labels(settings: KubeSettings) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "fruitdask",
        "app.kubernetes.io/instance": settings.name,
        "app.kubernetes.io/managed-by": "dask-kubernetes",
        "app.kubernetes.io/part-of": "fruitdask",
    }


def _worker_container(settings: KubeSettings, env: dict[str, str]) -> dict[str, Any]:
    """``dask worker`` on fixed ports, sized from the settings, pointed at the TLS scheduler."""
    memory_limit = int(parse_quantity(settings.worker_memory) * MEMORY_FRACTION)
    nthreads = worker_threads(settings.worker_cpu)
    worker_resources = {
        "requests": {"cpu": settings.worker_cpu, "memory": settings.worker_memory},
        "limits": {"cpu": settings.worker_cpu, "memory": settings.worker_memory},
    }
    return {
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
            "--protocol",
            "tls",
            "--worker-port",
            str(WORKER_PORT),
            "--nanny-port",
            str(NANNY_PORT),
        ],
        "env": _env_list({**_pod_env(settings, env), "DASK_SCHEDULER_ADDRESS": scheduler_address(settings)}),
        "resources": worker_resources,
        "ports": [
            {"name": "http-dashboard", "containerPort": WORKER_DASHBOARD_PORT, "protocol": "TCP"},
            {"name": "tcp-worker", "containerPort": WORKER_PORT, "protocol": "TCP"},
            {"name": "tcp-nanny", "containerPort": NANNY_PORT, "protocol": "TCP"},
        ],
    }


def _scratch_volumes(settings: KubeSettings) -> list[dict[str, Any]]:
    """The worker's spill directory, as large as its memory."""
    return [{"name": "scratch", "emptyDir": {"sizeLimit": settings.worker_memory}}]


def _scheduler_container(settings: KubeSettings, env: dict[str, str]) -> dict[str, Any]:
    """``dask scheduler`` on TLS, with the health probes dask-kubernetes' own spec has."""
    return {
        "name": "scheduler",
        "image": settings.image,
        "args": ["dask", "scheduler", "--host", "0.0.0.0", "--port", str(SCHEDULER_PORT),
                 "--protocol", "tls", "--dashboard-address", f":{DASHBOARD_PORT}"],
        "env": _env_list(_pod_env(settings, env)),
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


def _scheduler_service(settings: KubeSettings) -> dict[str, Any]:
    """The ClusterIP Service the operator creates for the scheduler's comm and dashboard."""
    return {
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
    }


def _check_tls_secret(settings: KubeSettings) -> None:
    if not settings.tls_secret:
        raise ClusterError(
            "--cluster kubernetes always uses TLS: pass --kube-tls-secret NAME, a Secret in namespace "
            f"{settings.namespace!r} with ca.crt, tls.crt and tls.key (e.g. from cert-manager, as for the chart's tls.existingSecret)"
        )
