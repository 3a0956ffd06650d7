"""The DaskCluster spec for ``--cluster kubernetes``, built and checked without a cluster."""

from __future__ import annotations

import subprocess
import sys
import types
from dataclasses import replace
from typing import Any, ClassVar

import jsonschema
import kubernetes_validate
import pytest
from k8s_validation import KUBE_VERSION, REPO, dask_cluster_schema, pod_policy_violations, pod_specs

from fruitdask.config import EU_REGIONS, TF_ENV, KubeSettings
from fruitdask.errors import ClusterError
from fruitdask.kube import make_cluster_spec, open_kube_cluster, parse_quantity, worker_threads

AMM = "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START"
SETTINGS = KubeSettings(
    name="fruits-run",
    namespace="fruitdask",
    image="123456789012.dkr.ecr.eu-west-1.amazonaws.com/fruitdask:0.1.0",
    n_workers=3,
    worker_cpu="4",
    worker_memory="16Gi",
    service_account="fruits-fruitdask",
    region="eu-west-1",
)
ENV = {"FRUITDASK_STORAGE_REGION": "eu-west-1", "TF_CPP_MIN_LOG_LEVEL": "0"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return make_cluster_spec(SETTINGS, ENV)


def containers(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        role: spec["spec"][role]["spec"]["containers"][0] for role in ("scheduler", "worker")
    }


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c["env"]}


def test_resource_identity(spec) -> None:
    assert spec["apiVersion"] == "kubernetes.dask.org/v1"
    assert spec["kind"] == "DaskCluster"
    assert spec["metadata"]["name"] == "fruits-run"
    assert spec["metadata"]["namespace"] == "fruitdask"
    assert spec["spec"]["worker"]["replicas"] == 3


def test_valid_against_the_operator_crd(spec) -> None:
    jsonschema.validate(spec, dask_cluster_schema())


def test_pod_specs_valid_kubernetes(spec) -> None:
    for _where, pod_spec in pod_specs(spec):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod_spec}
        kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)


def test_same_layout_as_upstream_make_cluster_spec(spec) -> None:
    from dask_kubernetes.operator import make_cluster_spec as upstream

    ref = upstream(name="fruits-run", image=SETTINGS.image, n_workers=3, env=ENV)
    assert set(ref["spec"]) <= set(spec["spec"])
    assert set(ref["spec"]["scheduler"]) <= set(spec["spec"]["scheduler"])
    assert ref["spec"]["scheduler"]["service"]["selector"] == spec["spec"]["scheduler"]["service"]["selector"]
    assert ref["spec"]["scheduler"]["service"]["ports"] == spec["spec"]["scheduler"]["service"]["ports"]
    for role in ("scheduler", "worker"):
        mine, theirs = containers(spec)[role], ref["spec"][role]["spec"]["containers"][0]
        assert mine["name"] == theirs["name"]
        assert mine["ports"] == theirs["ports"]


def test_image_commands_and_sizing(spec) -> None:
    c = containers(spec)
    assert c["scheduler"]["image"] == c["worker"]["image"] == SETTINGS.image
    assert c["scheduler"]["args"][:2] == ["dask", "scheduler"]
    assert c["worker"]["args"][:2] == ["dask", "worker"]
    args = c["worker"]["args"]
    assert args[args.index("--nthreads") + 1] == "4"
    assert args[args.index("--memory-limit") + 1] == str(int(16 * 2**30 * 0.9))
    assert args[args.index("--local-directory") + 1] == "/scratch"
    assert args[args.index("--name") + 1] == "$(DASK_WORKER_NAME)"  # set by the operator
    assert c["worker"]["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi"},
        "limits": {"cpu": "4", "memory": "16Gi"},
    }
    assert set(c["scheduler"]["resources"]) == {"requests", "limits"}


def test_env(spec) -> None:
    for role, c in containers(spec).items():
        env = env_of(c)
        assert env[AMM] == "False", role
        for k, v in TF_ENV.items():
            assert env[k] == v, (role, k)  # TF_ENV wins over a caller's value
        assert env["FRUITDASK_STORAGE_REGION"] == "eu-west-1"
        assert env["HOME"] == "/home/fruitdask" and env["TMPDIR"] == "/tmp"
        assert env["AWS_REGION"] == "eu-west-1"


def test_service_account_security_and_region(spec) -> None:
    problems = [p for where, s in pod_specs(spec) for p in pod_policy_violations(where, s, EU_REGIONS)]
    assert not problems, "\n".join(problems)
    for _, pod_spec in pod_specs(spec):
        assert pod_spec["serviceAccountName"] == "fruits-fruitdask"
        terms = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["eu-west-1"]
        mounts = {m["mountPath"] for m in pod_spec["containers"][0]["volumeMounts"]}
        assert {"/home/fruitdask", "/tmp"} <= mounts
    worker = spec["spec"]["worker"]["spec"]
    assert {"name": "scratch", "emptyDir": {"sizeLimit": "16Gi"}} in worker["volumes"]
    assert spec["spec"]["scheduler"]["service"]["type"] == "ClusterIP"


def test_no_service_account_when_none() -> None:
    spec = make_cluster_spec(replace(SETTINGS, service_account=None), {})
    assert all("serviceAccountName" not in s for _, s in pod_specs(spec))


def test_defaults_are_valid() -> None:
    spec = make_cluster_spec(KubeSettings(), {})
    jsonschema.validate(spec, dask_cluster_schema())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"region": "us-east-1"}, "outside the EU"),
        ({"n_workers": 0}, "n_workers"),
        ({"worker_memory": "lots"}, "8Gi"),
        ({"worker_cpu": "two"}, "1500m"),
    ],
)
def test_refuses_bad_settings(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ClusterError, match=match):
        make_cluster_spec(replace(SETTINGS, **change), {})


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [("8Gi", 8 * 2**30), ("512Mi", 512 * 2**20), ("2G", 2 * 10**9), ("1.5Gi", int(1.5 * 2**30)), ("1000", 1000)],
)
def test_parse_quantity(quantity: str, expected: int) -> None:
    assert parse_quantity(quantity) == expected


@pytest.mark.parametrize(("cpu", "expected"), [("2", 2), ("1500m", 1), ("250m", 1), ("3.7", 3)])
def test_worker_threads(cpu: str, expected: int) -> None:
    assert worker_threads(cpu) == expected


def test_builder_is_pure_and_imports_no_dask_kubernetes() -> None:
    code = (
        "import sys; from fruitdask.config import KubeSettings; from fruitdask.kube import make_cluster_spec;"
        "make_cluster_spec(KubeSettings(), {}); assert 'dask_kubernetes' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


# -- open_kube_cluster -----------------------------------------------------------------


class FakeKubeCluster:
    created: ClassVar[list[FakeKubeCluster]] = []

    def __init__(self, *, custom_cluster_spec=None, namespace=None, shutdown_on_close=None, quiet=False,
                 name=None, create_mode=None):
        self.spec = custom_cluster_spec
        self.namespace = namespace
        self.name = name or custom_cluster_spec["metadata"]["name"]
        self.shutdown_on_close = shutdown_on_close
        self.closed = False
        FakeKubeCluster.created.append(self)

    @classmethod
    def from_name(cls, name, **kwargs):
        return cls(name=name, create_mode="CONNECT_ONLY", shutdown_on_close=False, **kwargs)

    def close(self):
        self.closed = True


@pytest.fixture
def fake_operator(monkeypatch):
    FakeKubeCluster.created = []
    module = types.ModuleType("dask_kubernetes.operator")
    module.KubeCluster = FakeKubeCluster
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", module)
    return FakeKubeCluster


def test_open_creates_from_spec_and_closes(fake_operator) -> None:
    with open_kube_cluster(SETTINGS, ENV) as cluster:
        assert cluster.spec == make_cluster_spec(SETTINGS, ENV)
        assert cluster.namespace == "fruitdask"
        assert cluster.shutdown_on_close is True
    assert cluster.closed


def test_open_connects_to_existing_without_deleting_it(fake_operator) -> None:
    with open_kube_cluster(replace(SETTINGS, connect_existing=True), ENV) as cluster:
        assert cluster.spec is None and cluster.name == "fruits-run"
    assert cluster.shutdown_on_close is False  # close() leaves the DaskCluster running


def test_open_closes_on_error(fake_operator) -> None:
    with pytest.raises(RuntimeError):
        with open_kube_cluster(SETTINGS, ENV):
            raise RuntimeError("pipeline failed")
    assert fake_operator.created[0].closed


def test_missing_dask_kubernetes_says_how_to_fix(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    with pytest.raises(ClusterError, match="pip install dask-kubernetes"):
        with open_kube_cluster(SETTINGS, ENV):
            pass


def test_unreachable_cluster_api_is_a_cluster_error(monkeypatch, tmp_path) -> None:
    """The real KubeCluster with no kubeconfig and no in-cluster credentials."""
    import dask_kubernetes.operator  # noqa: F401 - a [dev] dependency: missing, the test fails loudly
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ClusterError, match="KUBECONFIG"):
        with open_kube_cluster(SETTINGS, ENV):
            pass
