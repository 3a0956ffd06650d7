"""Who may reach the ``--cluster kubernetes`` Dask cluster, and with which rights.

Pure builders of the objects created beside the ``DaskCluster``: the NetworkPolicies (like
the chart's, only the cluster's own pods and labelled clients reach the Dask ports) and the
scheduler's own service account with no role, because any client of the scheduler can run
code on it; only the workers run under the service account that carries the S3 role (IRSA).
"""

from __future__ import annotations

from typing import Any

from fruitdask.backends.dask.kube import (
    NANNY_PORT,
    SCHEDULER_PORT,
    WORKER_PORT,
    object_metadata,
    scheduler_service_account_name,
)
from fruitdask.config import KubeSettings

#: Labels a pod in the namespace needs (with ``app.kubernetes.io/instance: <cluster name>``)
#: to reach the scheduler and workers; the same key as the chart's ``clientLabels``.
CLIENT_LABELS: dict[str, str] = {"fruitdask.io/client": "true"}
#: Egress of the workers for S3, STS (IRSA) and the weights download: HTTPS anywhere, as
#: S3 has no fixed addresses; the chart lets this be narrowed (networkPolicy.s3Egress).
HTTPS_EGRESS_CIDRS: tuple[str, ...] = ("0.0.0.0/0",)


def _metadata(settings: KubeSettings, name: str, component: str) -> dict[str, Any]:
    labels = {
        "app.kubernetes.io/name": "fruitdask",
        "app.kubernetes.io/instance": settings.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "fruitdask",
        "app.kubernetes.io/part-of": "fruitdask",
    }
    return object_metadata(settings, name, labels)


def make_scheduler_service_account(settings: KubeSettings) -> dict[str, Any]:
    """The scheduler's ``ServiceAccount``: no annotations, so no IAM role, and no API token.

    Any client of a Dask scheduler can run code on it (``Client.run_on_scheduler``), so the
    scheduler must not hold the S3 role the workers get through IRSA.
    """
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(settings, scheduler_service_account_name(settings), "scheduler"),
        "automountServiceAccountToken": False,
    }


def _ports(*numbers: int) -> list[dict[str, Any]]:
    # Numbers, never names: the AWS VPC CNI policy agent has mishandled named ports.
    return [{"port": n, "protocol": "TCP"} for n in numbers]


def make_network_policies(settings: KubeSettings) -> list[dict[str, Any]]:
    """``NetworkPolicy`` objects for the operator's scheduler and worker pods.

    The same rules as the chart's (``helm/fruitdask/templates/networkpolicy.yaml``), on the
    labels the operator puts on its pods (``dask.org/cluster-name``, ``dask.org/component``):

    * scheduler: comm port from this cluster's workers and labelled clients
      (:data:`CLIENT_LABELS` plus ``app.kubernetes.io/instance``: ``settings.client_instance``,
      by default the cluster's name); egress to DNS and
      the workers' worker and nanny ports only (no S3, no internet);
    * workers: worker and nanny ports from the scheduler, peer workers and clients; egress
      to DNS, HTTPS (S3, STS for IRSA) and the scheduler and peer workers.

    Dashboards get no ingress: reach them with ``kubectl port-forward``, which policies do
    not affect. Every port is a number.
    """
    cluster = {"dask.org/cluster-name": settings.name}
    scheduler = {"podSelector": {"matchLabels": {**cluster, "dask.org/component": "scheduler"}}}
    workers = {"podSelector": {"matchLabels": {**cluster, "dask.org/component": "worker"}}}
    clients = {
        "podSelector": {"matchLabels": {**CLIENT_LABELS, "app.kubernetes.io/instance": settings.client_instance or settings.name}}
    }
    dns = {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }
        ],
        "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
    }
    https = {"to": [{"ipBlock": {"cidr": c}} for c in HTTPS_EGRESS_CIDRS], "ports": _ports(443)}
    scheduler_policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(settings, f"{settings.name}-scheduler", "scheduler"),
        "spec": {
            "podSelector": scheduler["podSelector"],
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [workers, clients], "ports": _ports(SCHEDULER_PORT)}],
            "egress": [dns, {"to": [workers], "ports": _ports(WORKER_PORT, NANNY_PORT)}],
        },
    }
    worker_policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(settings, f"{settings.name}-worker", "worker"),
        "spec": {
            "podSelector": workers["podSelector"],
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [scheduler, workers, clients], "ports": _ports(WORKER_PORT, NANNY_PORT)}],
            "egress": [
                dns,
                https,
                {"to": [scheduler], "ports": _ports(SCHEDULER_PORT)},
                {"to": [workers], "ports": _ports(WORKER_PORT)},
            ],
        },
    }
    return [scheduler_policy, worker_policy]
