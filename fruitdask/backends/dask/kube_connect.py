"""Create (or connect to) the ``--cluster kubernetes`` Dask cluster and reach it over TLS.

The objects come from the pure builders of :mod:`fruitdask.backends.dask.kube` and
:mod:`fruitdask.backends.dask.kube_policies` (:func:`cluster_resources` puts them in creation
order); this module only makes the Kubernetes calls (:class:`OperatorApi`, on kr8s and dask-kubernetes, imported lazily so
the rest of fruitdask runs without them) and builds the client's TLS credentials. The
calls sit behind the small :class:`KubeApi` protocol so the create/delete logic is tested
with a fake.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from fruitdask.backends.dask.kube import make_cluster_spec
from fruitdask.backends.dask.kube_policies import make_network_policies, make_scheduler_service_account
from fruitdask.config import KubeSettings
from fruitdask.errors import ClusterError

logger = logging.getLogger(__name__)


def cluster_resources(settings: KubeSettings, env: dict[str, str]) -> list[dict[str, Any]]:
    """Everything :func:`open_kube_cluster` creates, in creation order.

    The service account and the policies come first, so no scheduler or worker pod ever
    runs without them; deletion goes in reverse.
    """
    return [
        make_scheduler_service_account(settings),
        *make_network_policies(settings),
        make_cluster_spec(settings, env),
    ]


def client_security() -> Any:
    """The client's ``distributed.security.Security`` for the TLS scheduler, from Dask config.

    The certificate files come from Dask's own configuration, as for any Dask client:
    ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``, ``..._TLS__CLIENT__CERT`` and
    ``..._TLS__CLIENT__KEY`` (or ``distributed.comm.tls.*`` in a Dask YAML file). Inside a
    pod that mounts the Secret they point at its files, as the chart's Job does.

    Raises
    ------
    ClusterError
        If the CA file or the client certificate is not configured.
    """
    from distributed.security import Security

    security = Security(require_encryption=True)
    missing = [
        var
        for var, value in (
            # Security sets these from dask's config at run time (not declared on the class).
            ("DASK_DISTRIBUTED__COMM__TLS__CA_FILE", getattr(security, "tls_ca_file", None)),
            ("DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT", getattr(security, "tls_client_cert", None)),
        )
        if not value
    ]
    if missing:
        raise ClusterError(
            "--cluster kubernetes speaks TLS, and this client has no certificate: set "
            f"{' and '.join(missing)} (and DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY) to the files of the "
            "TLS Secret (ca.crt, tls.crt, tls.key)"
        )
    return security


@dataclass(frozen=True)
class KubeConnection:
    """Where and how the client reaches an operator-made scheduler."""

    scheduler_address: str  # tls://, through a port-forward when outside the cluster
    security: Any  # distributed.security.Security
    dashboard_link: str | None = None


class KubeApi(Protocol):
    """The Kubernetes calls :func:`open_kube_cluster` makes (a fake one in the tests)."""

    def create(self, obj: dict[str, Any]) -> None: ...

    def delete(self, obj: dict[str, Any]) -> None: ...

    def scheduler_endpoints(self, name: str, namespace: str, timeout: float) -> tuple[str, str | None]: ...


class OperatorApi:
    """:class:`KubeApi` on kr8s and dask-kubernetes' own waiting and port-forward helpers."""

    def __init__(self) -> None:
        try:
            import dask_kubernetes.operator  # noqa: F401 - registers the DaskCluster kind with kr8s
            import kr8s
        except ImportError as e:
            raise ClusterError(
                "--cluster kubernetes needs dask-kubernetes: pip install dask-kubernetes, "
                "or pass --cluster tls://SCHEDULER:8786 to use a running scheduler"
            ) from e
        self._kr8s = kr8s

    def _object(self, obj: dict[str, Any]) -> Any:
        return self._kr8s.objects.object_from_spec(obj, allow_unknown_type=True)

    def create(self, obj: dict[str, Any]) -> None:
        self._object(obj).create()

    def delete(self, obj: dict[str, Any]) -> None:
        try:
            self._object(obj).delete()
        except self._kr8s.NotFoundError:
            pass  # already gone (the operator deletes its own children)

    def scheduler_endpoints(self, name: str, namespace: str, timeout: float) -> tuple[str, str | None]:
        """``(tcp://host:port of the comm port, http://... of the dashboard)``: the in-cluster
        Service name when it resolves, else a port-forward (a daemon thread that outlives
        this call, as in ``KubeCluster``)."""
        from dask_kubernetes.operator.networking import get_scheduler_address, wait_for_scheduler, wait_for_service

        async def endpoints() -> tuple[str, str]:
            await wait_for_scheduler(name, namespace, timeout=timeout)
            await wait_for_service(f"{name}-scheduler", namespace)
            comm = await get_scheduler_address(f"{name}-scheduler", namespace)
            dashboard = await get_scheduler_address(f"{name}-scheduler", namespace, port_name="http-dashboard")
            return comm, dashboard

        comm, dashboard = asyncio.run(asyncio.wait_for(endpoints(), timeout))
        return comm, dashboard.replace("tcp://", "http://", 1) + "/status"


def _tls(address: str) -> str:
    """The scheme of an address from dask-kubernetes (always ``tcp://``) made ``tls://``;
    TLS runs over the same TCP connection, port-forwarded or not."""
    return "tls://" + address.split("://", 1)[-1]


@contextmanager
def open_kube_cluster(
    settings: KubeSettings, env: dict[str, str], api: KubeApi | None = None, timeout: float = 600.0
) -> Iterator[KubeConnection]:
    """Create (or connect to) a TLS Dask cluster on Kubernetes; delete only what was created.

    dask-kubernetes' ``KubeCluster`` only speaks plain TCP to the scheduler, so the
    ``DaskCluster`` is created here (with its service account and NetworkPolicies, from
    :func:`cluster_resources`) and the client connects with :func:`client_security`.

    Parameters
    ----------
    settings
        With ``connect_existing`` the cluster named ``settings.name`` in
        ``settings.namespace`` must already exist and is left running on exit; otherwise a
        new one is created and deleted on exit, whatever happens in between.
    env
        Extra environment for scheduler and workers (see :func:`make_cluster_spec`).
    api
        The Kubernetes calls; :class:`OperatorApi` (kr8s) when omitted.
    timeout
        Seconds to wait for the scheduler to be ready.

    Yields
    ------
    KubeConnection
        ``Client(conn.scheduler_address, security=conn.security)``.

    Raises
    ------
    ClusterError
        If dask-kubernetes is not installed, the client has no TLS certificate, or the
        Kubernetes API or the operator cannot be reached.
    """
    security = client_security()
    resources = [] if settings.connect_existing else cluster_resources(settings, env)
    api = api or OperatorApi()
    created: list[dict[str, Any]] = []
    try:
        try:
            _log_start(settings)
            for obj in resources:
                api.create(obj)
                created.append(obj)
            comm, dashboard = api.scheduler_endpoints(settings.name, settings.namespace, timeout)
        except ClusterError:
            raise
        except Exception as e:  # kr8s/httpx/asyncio raise many types for "no cluster"
            raise _unreachable(settings, e) from e
        yield KubeConnection(_tls(comm), security, dashboard)
    finally:
        _delete_created(api, created, settings.namespace)


def _log_start(settings: KubeSettings) -> None:
    if settings.connect_existing:
        logger.info("connecting to DaskCluster %s in namespace %s", settings.name, settings.namespace)
    else:
        logger.info(
            "creating DaskCluster %s in namespace %s with %d workers (TLS, NetworkPolicy)",
            settings.name,
            settings.namespace,
            settings.n_workers,
        )


def _unreachable(settings: KubeSettings, e: Exception) -> ClusterError:
    """The error for a cluster that could not be created or reached, with what to check."""
    action = "connect to" if settings.connect_existing else "create"
    return ClusterError(
        f"could not {action} DaskCluster {settings.name!r} in namespace {settings.namespace!r}: {e}. "
        "Check that kubectl reaches the cluster (KUBECONFIG, or run in-cluster), that the "
        "dask-kubernetes operator is installed (helm install --repo https://helm.dask.org "
        "-n dask-operator --create-namespace dask-kubernetes-operator dask-kubernetes-operator), "
        "and, with connect_existing, that the cluster exists"
    )


def _delete_created(api: KubeApi, created: list[dict[str, Any]], namespace: str) -> None:
    """Delete what was created, newest first; a failure is logged and the rest still go."""
    for obj in reversed(created):
        try:
            api.delete(obj)
        except Exception as e:  # noqa: BLE001 - keep deleting the rest; the first error wins
            logger.warning(
                "could not delete %s %s: %s; delete it with kubectl -n %s delete %s %s",
                obj["kind"], obj["metadata"]["name"], e, namespace,
                obj["kind"].lower(), obj["metadata"]["name"],
            )
