"""The hardened pod every Dask process of ``--cluster kubernetes`` runs in.

The same hardening as the Helm chart (``helm/fruitdask``): non-root, read-only root
filesystem, all capabilities dropped, RuntimeDefault seccomp, no service account token,
writable ``emptyDir`` volumes for ``HOME``, ``/tmp`` and the worker's spill directory, a
required node affinity on the EU region, and the TLS Secret mounted for mutual TLS.
Pure: dicts in, dicts out (:mod:`fruitdask.backends.dask.kube` puts the containers in).
"""

from __future__ import annotations

from typing import Any

from fruitdask.config import KubeSettings

UID = 10001  # the non-root user of the Dockerfile
HOME = "/home/fruitdask"
SCRATCH = "/scratch"
TLS_DIR = "/etc/dask/tls"


def tls_env() -> dict[str, str]:
    """Dask configuration, as environment, for mutual TLS with the mounted Secret.

    The same variables as the chart's ``tls.enabled``: one certificate for every role,
    ``ca.crt`` / ``tls.crt`` / ``tls.key`` of the Secret mounted at :data:`TLS_DIR`.
    """
    env = {
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": f"{TLS_DIR}/ca.crt",
    }
    for role in ("SCHEDULER", "WORKER", "CLIENT"):
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] = f"{TLS_DIR}/tls.crt"
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] = f"{TLS_DIR}/tls.key"
    return env


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


def pod_spec(
    settings: KubeSettings,
    container: dict[str, Any],
    service_account: str | None,
    extra_volumes: list[dict[str, Any]],
) -> dict[str, Any]:
    """The pod spec of ``container`` (completed here: security context, mounts), with the
    region affinity, the volumes and, when given, the service account it runs under."""
    pod_sc, container_sc = _security()
    container["securityContext"] = container_sc
    container["imagePullPolicy"] = "IfNotPresent"
    tls = {"name": "tls", "secret": {"secretName": settings.tls_secret, "defaultMode": 0o440}}
    container["volumeMounts"] = [
        {"name": "home", "mountPath": HOME},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
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
        "volumes": [{"name": "home", "emptyDir": {"sizeLimit": "1Gi"}}, {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}, tls, *extra_volumes],
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    return spec
