"""Offline Kubernetes checks shared by the chart, manifest and spec tests.

Core objects are validated with ``kubernetes-validate`` (strict: unknown fields fail)
against a Kubernetes version it ships; custom resources against their CRD schemas
(vendored under ``k8s_schemas/``, or shipped by dask-kubernetes). An object of a kind with
no schema is an error, never a skip.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "fruitdask"
K8S = REPO / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "k8s_schemas"
# EKS standard support; kubernetes-validate ships schemas for it offline.
KUBE_VERSION = "1.33.0"
EU_REGIONS = ("eu-west-1", "eu-west-3", "eu-central-1", "eu-north-1", "eu-south-1", "eu-south-2")

_CUSTOM = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.yaml",
    ("karpenter.sh/v1", "NodePool"): "nodepool.yaml",
    ("karpenter.k8s.aws/v1", "EC2NodeClass"): "ec2nodeclass.yaml",
    # Written by hand, unverified (see its header): the structure is also checked in the tests.
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.yaml",
}


def strictify(schema: Any) -> Any:
    """Copy of an OpenAPI schema where every object with ``properties`` rejects unknown
    keys, as ``kubectl apply`` does with strict server-side field validation."""
    if isinstance(schema, dict):
        out = {k: strictify(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strictify(v) for v in schema]
    return schema


@functools.cache
def dask_cluster_schema() -> dict[str, Any]:
    """``openAPIV3Schema`` of the DaskCluster CRD shipped with dask-kubernetes."""
    import dask_kubernetes

    crd_path = (
        Path(dask_kubernetes.__file__).parent
        / "operator/deployment/helm/dask-kubernetes-operator/crds/daskcluster.yaml"
    )
    crd = yaml.safe_load(crd_path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    # The API server accepts these on every object (metadata is checked as ObjectMeta).
    schema["properties"].update(
        {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
    )
    return strictify(schema)


@functools.cache
def custom_schema(api_version: str, kind: str) -> dict[str, Any]:
    if (api_version, kind) == ("kubernetes.dask.org/v1", "DaskCluster"):
        return dask_cluster_schema()
    try:
        name = _CUSTOM[(api_version, kind)]
    except KeyError:
        raise AssertionError(f"no schema for custom resource {api_version} {kind}: vendor one") from None
    return strictify(yaml.safe_load((SCHEMAS / name).read_text()))


def is_custom(obj: dict[str, Any]) -> bool:
    return (obj["apiVersion"], obj["kind"]) in _CUSTOM or obj["kind"] == "DaskCluster"


def validate_object(obj: dict[str, Any]) -> None:
    """Raise if ``obj`` does not match its Kubernetes or CRD schema."""
    if is_custom(obj):
        jsonschema.validate(obj, custom_schema(obj["apiVersion"], obj["kind"]))
    else:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def load_documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def render(values: dict[str, Any] | None = None, name: str = "fruits", namespace: str = "fruitdask") -> list[dict[str, Any]]:
    """Every object the chart renders for ``values`` (hooks included), via helm-python-sdk."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=name, namespace=namespace, is_install=True)
    objects: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(load_documents(text))
    return objects


def render_notes(values: dict[str, Any] | None = None, name: str = "fruits") -> str:
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=name, namespace="fruitdask", is_install=True)
    return manifests["fruitdask/templates/NOTES.txt"]


def ci_values() -> dict[str, dict[str, Any]]:
    """The chart's ``ci/*-values.yaml`` files by stem, plus the defaults as ``default``."""
    out: dict[str, dict[str, Any]] = {"default": {}}
    for path in sorted((CHART / "ci").glob("*.yaml")):
        out[path.stem] = yaml.safe_load(path.read_text()) or {}
    return out


def pod_specs(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(where, pod spec)`` pairs inside a workload object."""
    kind = obj["kind"]
    name = obj.get("metadata", {}).get("name", "?")
    if kind == "Pod":
        return [(f"Pod/{name}", obj["spec"])]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [(f"{kind}/{name}", obj["spec"]["template"]["spec"])]
    if kind == "CronJob":
        return [(f"{kind}/{name}", obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "DaskCluster":
        return [
            (f"{kind}/{name}/scheduler", obj["spec"]["scheduler"]["spec"]),
            (f"{kind}/{name}/worker", obj["spec"]["worker"]["spec"]),
        ]
    return []


def pod_policy_violations(where: str, spec: dict[str, Any], allowed_regions: tuple[str, ...] = EU_REGIONS) -> list[str]:
    """What in a pod spec breaks the restricted profile, resources or the EU placement."""
    bad: list[str] = []
    psc = spec.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        bad.append(f"{where}: pod securityContext.runAsNonRoot is not true")
    if psc.get("runAsUser", 1) == 0:
        bad.append(f"{where}: pod runs as uid 0")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        bad.append(f"{where}: pod seccompProfile is not RuntimeDefault")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            bad.append(f"{where}: {key} is set")
    for vol in spec.get("volumes", []):
        if "hostPath" in vol:
            bad.append(f"{where}: volume {vol['name']} is a hostPath")
    containers = spec.get("containers", []) + spec.get("initContainers", [])
    if not containers:
        bad.append(f"{where}: no containers")
    for c in containers:
        cw = f"{where}/{c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{cw}: allowPrivilegeEscalation is not false")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{cw}: readOnlyRootFilesystem is not true")
        if sc.get("privileged"):
            bad.append(f"{cw}: privileged")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
            bad.append(f"{cw}: capabilities are not drop [ALL]")
        if sc.get("runAsUser", 1) == 0:
            bad.append(f"{cw}: runs as uid 0")
        if (sc.get("seccompProfile") or psc.get("seccompProfile", {})).get("type") != "RuntimeDefault":
            bad.append(f"{cw}: seccompProfile is not RuntimeDefault")
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(part, {}):
                    bad.append(f"{cw}: resources.{part}.{r} missing")
        if str(c.get("image", "")).endswith(":latest") or ":" not in str(c.get("image", "")):
            bad.append(f"{cw}: image {c.get('image')!r} has no pinned tag")
    terms = (
        spec.get("affinity", {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", {})
        .get("nodeSelectorTerms", [])
    )
    if not terms:
        bad.append(f"{where}: no required node affinity")
    for term in terms:
        exprs = [
            e
            for e in term.get("matchExpressions", [])
            if e["key"] == "topology.kubernetes.io/region" and e["operator"] == "In"
        ]
        if not exprs or not set(exprs[0]["values"]) <= set(allowed_regions):
            bad.append(f"{where}: node affinity term {term} does not pin topology.kubernetes.io/region to the EU")
    return bad


def deepcopy(obj: Any) -> Any:
    return copy.deepcopy(obj)
