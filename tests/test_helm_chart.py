"""Render helm/fruitdask with the Helm engine bundled in helm-python-sdk and check the result.

Every rendered object is validated against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict) or its CRD schema; every pod is checked against the
restricted security profile, resources, labels and EU placement.
"""

from __future__ import annotations

import re
from typing import Any

import helm_python as helm  # a [dev] dependency, imported plainly: missing, it fails loudly
import pytest
import yaml
from k8s_validation import (
    CHART,
    ci_values,
    is_custom,
    pod_policy_violations,
    pod_specs,
    render,
    render_notes,
    validate_object,
)

from fruitdask.config import EU_REGIONS, TF_ENV

CI_VALUES = ci_values()
AMM = "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START"
LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
)


@pytest.fixture(scope="module", params=sorted(CI_VALUES))
def rendered(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    values = CI_VALUES[request.param]
    return request.param, values, render(values)


def by_kind(objects: list[dict[str, Any]], kind: str, suffix: str = "") -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]


def one(objects: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = by_kind(objects, kind, suffix)
    assert len(found) == 1, f"expected one {kind} *{suffix}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    return c


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def test_chart_metadata_and_lint() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["kubeVersion"].startswith(">=")
    report = helm.lint(str(CHART), strict=True, kube_version="v1.33.0")
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not errors, errors


def test_ci_values_cover_every_option() -> None:
    assert {"tls-values", "gpu-values", "metrics-values", "job-values", "karpenter-values"} <= set(CI_VALUES)


def test_every_object_is_valid_kubernetes(rendered) -> None:
    _name, _, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "NetworkPolicy", "Pod"} <= kinds
    for obj in objects:
        validate_object(obj)  # raises on any schema error or unknown kind


def test_custom_resources_are_validated_not_skipped(rendered) -> None:
    name, _, objects = rendered
    custom = {o["kind"] for o in objects if is_custom(o)}
    expected = {
        "metrics-values": {"ServiceMonitor", "PodMonitor"},
        "karpenter-values": {"NodePool", "EC2NodeClass"},
    }.get(name, set())
    assert custom == expected


def test_every_pod_is_hardened_and_in_the_eu(rendered) -> None:
    _, _, objects = rendered
    pods = [p for o in objects for p in pod_specs(o)]
    assert len(pods) >= 3  # scheduler, worker, helm test (+ Job)
    problems = [p for where, spec in pods for p in pod_policy_violations(where, spec, EU_REGIONS)]
    assert not problems, "\n".join(problems)
    for where, spec in pods:
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["serviceAccountName"] == "fruits-fruitdask", where
        mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert {"/home/fruitdask", "/tmp"} <= mounts, where
        empty = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        assert {"home", "tmp"} <= empty, where


def test_labels_everywhere(rendered) -> None:
    _, _, objects = rendered
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert all(k in labels for k in LABELS), (obj["kind"], labels)
        template = obj.get("spec", {}).get("template", {})
        if obj["kind"] in ("Deployment", "Job"):
            assert all(k in template["metadata"]["labels"] for k in LABELS), obj["kind"]


def test_no_loadbalancer_no_nodeport(rendered) -> None:
    _, _, objects = rendered
    for svc in by_kind(objects, "Service"):
        assert svc["spec"]["type"] == "ClusterIP"
        assert all("nodePort" not in p for p in svc["spec"]["ports"])


def test_commands_are_dask_subcommands(rendered) -> None:
    _, _, objects = rendered
    assert container(one(objects, "Deployment", "-scheduler"))["command"] == ["dask", "scheduler"]
    assert container(one(objects, "Deployment", "-worker"))["command"] == ["dask", "worker"]
    for obj in objects:
        for _, spec in pod_specs(obj):
            for c in spec["containers"]:
                words = c.get("command", []) + c.get("args", [])
                assert not {"dask-scheduler", "dask-worker"} & set(words), words


def test_env_tf_and_amm_everywhere(rendered) -> None:
    _, _, objects = rendered
    for obj in objects:
        for where, spec in pod_specs(obj):
            env = env_of(spec["containers"][0])
            assert env[AMM] == "False", where
            for k, v in TF_ENV.items():
                assert env[k] == v, (where, k)
            assert env["HOME"] == "/home/fruitdask" and env["TMPDIR"] == "/tmp", where
            assert env["AWS_REGION"] in EU_REGIONS, where


def test_no_secret_objects_or_secret_values(rendered) -> None:
    _, _, objects = rendered
    assert not by_kind(objects, "Secret")
    text = yaml.safe_dump_all(objects)
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    for obj in objects:
        for _, spec in pod_specs(obj):
            for e in spec["containers"][0].get("env", []):
                assert not re.search(r"SECRET|PASSWORD|TOKEN", e["name"]), e["name"]


def test_scheduler_service_and_probes() -> None:
    objects = render({})
    svc = one(objects, "Service", "-scheduler")
    assert svc["metadata"]["name"] == "fruits-fruitdask-scheduler"  # README's port-forward
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"tcp-comm": 8786, "http-dashboard": 8787}
    c = container(one(objects, "Deployment", "-scheduler"))
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http-dashboard"}
    assert c["args"][c["args"].index("--dashboard-address") + 1] == ":8787"


@pytest.mark.parametrize(
    ("cpu", "memory", "fraction", "threads", "limit"),
    [
        ("2", "8Gi", 0.9, "2", str(int(8 * 2**30 * 0.9))),
        ("1500m", "3000Mi", 1.0, "1", str(3000 * 2**20)),
        ("500m", "2G", 0.5, "1", str(10**9)),
        (4, "16Gi", 0.9, "4", str(int(16 * 2**30 * 0.9))),
    ],
)
def test_worker_nthreads_and_memory_limit_from_resources(cpu, memory, fraction, threads, limit) -> None:
    res = {"cpu": cpu, "memory": memory}
    objects = render({"worker": {"resources": {"requests": res, "limits": res}, "memoryFraction": fraction}})
    args = container(one(objects, "Deployment", "-worker"))["args"]
    assert args[args.index("--nthreads") + 1] == threads
    assert args[args.index("--memory-limit") + 1] == limit
    assert args[0] == "tcp://fruits-fruitdask-scheduler:8786"


def test_worker_scratch_is_a_writable_emptydir() -> None:
    worker = one(render({}), "Deployment", "-worker")
    spec = worker["spec"]["template"]["spec"]
    args = container(worker)["args"]
    assert args[args.index("--local-directory") + 1] == "/scratch"
    (scratch,) = [v for v in spec["volumes"] if v["name"] == "scratch"]
    assert scratch["emptyDir"]["sizeLimit"] == "20Gi"
    assert {"name": "scratch", "mountPath": "/scratch"} in container(worker)["volumeMounts"]


def test_serviceaccount_irsa_annotation() -> None:
    assert "annotations" not in one(render({}), "ServiceAccount")["metadata"]
    sa = one(render(CI_VALUES["job-values"]), "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == "arn:aws:iam::123456789012:role/fruitdask-s3"
    assert sa["automountServiceAccountToken"] is False


def test_job_runs_fruitdask_against_the_release_scheduler() -> None:
    assert not by_kind(render({}), "Job")
    objects = render(CI_VALUES["job-values"])
    job = one(objects, "Job", "-run")
    c = container(job)
    assert c["command"] == ["python", "-m", "fruitdask", "run"]
    args = c["args"]
    assert args[:6] == [
        "--cluster", "tcp://fruits-fruitdask-scheduler:8786",
        "--input", "s3://fruits-eu-west-1/fruits-360/Training",
        "--output", "s3://fruits-eu-west-1/features/run-1",
    ]
    assert args[args.index("--weights") + 1] == "s3://fruits-eu-west-1/models/vgg16_notop.weights.h5"
    assert args[-3:] == ["--components", "50", "--overwrite"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["template"]["metadata"]["labels"]["fruitdask.io/client"] == "true"
    # A committed run with skipped files exits 0 in the Job (--skipped-ok); the run's own
    # failures (exit 1-3) fail the Job at once instead of being retried.
    assert "--skipped-ok" in args
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [1, 2, 3]


def test_tls_mounts_secret_and_uses_tls_addresses() -> None:
    objects = render(CI_VALUES["tls-values"])
    sched = one(objects, "Deployment", "-scheduler")
    args = container(sched)["args"]
    assert args[args.index("--protocol") + 1] == "tls"
    worker = container(one(objects, "Deployment", "-worker"))
    assert worker["args"][0] == "tls://fruits-fruitdask-scheduler:8786"
    for obj in objects:
        for where, spec in pod_specs(obj):
            (vol,) = [v for v in spec["volumes"] if v["name"] == "tls"]
            assert vol["secret"]["secretName"] == "fruitdask-dask-tls", where
            env = env_of(spec["containers"][0])
            assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
            for role in ("SCHEDULER", "WORKER", "CLIENT"):
                assert env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] == "/etc/dask/tls/tls.crt"
                assert env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] == "/etc/dask/tls/tls.key"
    test_pod = one(objects, "Pod")
    assert test_pod["spec"]["containers"][0]["args"][1].startswith("tls://")


def test_gpu_workers() -> None:
    objects = render(CI_VALUES["gpu-values"])
    worker = one(objects, "Deployment", "-worker")
    spec = worker["spec"]["template"]["spec"]
    c = container(worker)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"] == "ghcr.io/fruits/fruitdask:0.1.0-gpu"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"]["fruitdask.io/node-type"] == "gpu"
    # The scheduler stays on the CPU image and CPU nodes.
    sched = one(objects, "Deployment", "-scheduler")
    assert container(sched)["image"] == "ghcr.io/fruits/fruitdask:0.1.0"
    assert "tolerations" not in sched["spec"]["template"]["spec"]


def test_metrics_monitors() -> None:
    objects = render(CI_VALUES["metrics-values"])
    sm = one(objects, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert sm["spec"]["endpoints"][0]["port"] == "http-dashboard"
    assert sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "scheduler"
    pm = one(objects, "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_karpenter_nodepool_limited_to_region_zones() -> None:
    objects = render(CI_VALUES["karpenter-values"])
    pool = one(objects, "NodePool")
    reqs = {r["key"]: r for r in pool["spec"]["template"]["spec"]["requirements"]}
    assert reqs["topology.kubernetes.io/zone"]["values"] == ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
    node_class = one(objects, "EC2NodeClass")
    assert node_class["spec"]["metadataOptions"]["httpTokens"] == "required"
    assert node_class["spec"]["metadataOptions"]["httpPutResponseHopLimit"] == 1
    assert all(b["ebs"]["encrypted"] for b in node_class["spec"]["blockDeviceMappings"])
    worker = one(objects, "Deployment", "-worker")
    assert worker["spec"]["template"]["spec"]["nodeSelector"]["karpenter.sh/nodepool"] == pool["metadata"]["name"]
    with pytest.raises(helm.HelmError, match="not in region"):
        render({"karpenter": {"enabled": True, "zones": ["eu-west-3a"]}})


def test_network_policies() -> None:
    objects = render({})
    sched = one(objects, "NetworkPolicy", "-scheduler")
    comm, dash = sched["spec"]["ingress"]
    assert comm["ports"] == [{"port": "tcp-comm", "protocol": "TCP"}]
    selectors = [f["podSelector"]["matchLabels"] for f in comm["from"]]
    assert {"app.kubernetes.io/name": "fruitdask", "app.kubernetes.io/instance": "fruits",
            "app.kubernetes.io/component": "worker"} in selectors
    assert {"fruitdask.io/client": "true"} in selectors
    assert all("namespaceSelector" not in f for f in comm["from"])  # same namespace only
    assert dash["ports"] == [{"port": "http-dashboard", "protocol": "TCP"}]
    assert dash["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    worker = one(objects, "NetworkPolicy", "-worker")
    assert {p["port"] for p in worker["spec"]["ingress"][0]["ports"]} == {"tcp-worker", "tcp-nanny"}
    # The helm test pod carries the client labels, so the policy lets it in.
    assert one(objects, "Pod")["metadata"]["labels"]["fruitdask.io/client"] == "true"
    assert not by_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_pod_disruption_budgets() -> None:
    pdbs = {p["metadata"]["name"]: p["spec"] for p in by_kind(render({}), "PodDisruptionBudget")}
    assert pdbs["fruits-fruitdask-worker"]["maxUnavailable"] == 1
    assert pdbs["fruits-fruitdask-scheduler"]["minAvailable"] == 1


def test_helm_test_hook_checks_worker_count() -> None:
    pod = one(render({"worker": {"replicas": 5}}), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["python", "-c"]
    assert "wait_for_workers" in c["args"][0]
    assert c["args"][1:3] == ["tcp://fruits-fruitdask-scheduler:8786", "5"]
    compile(c["args"][0], "helm-test", "exec")  # the embedded script is valid Python


def test_notes_give_port_forward_commands() -> None:
    notes = render_notes({})
    assert "kubectl --namespace fruitdask port-forward svc/fruits-fruitdask-scheduler 8787" in notes
    assert "port-forward svc/fruits-fruitdask-scheduler 8786" in notes
    assert "helm test fruits" in notes


def test_tfenv_default_matches_package() -> None:
    with helm.Chart.load(CHART) as chart:
        assert chart.values["tfEnv"] == TF_ENV


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"region": "us-east-1"}, "/region"),
        ({"scheduler": {"service": {"type": "LoadBalancer"}}}, "/scheduler/service/type"),
        ({"scheduler": {"service": {"type": "NodePort"}}}, "/scheduler/service/type"),
        ({"image": {"tag": "latest"}}, "/image/tag"),
        ({"unknownKey": True}, "unknownKey"),
        ({"worker": {"gpu": {"enabled": True, "typo": 1}}}, "typo"),
        ({"job": {"enabled": True}}, "/job/"),
        # The Job never falls back to random weights: an explicit weights file is required.
        ({"job": {"enabled": True, "input": "s3://b-eu/in", "output": "s3://b-eu/out"}}, "/job/weights"),
        ({"job": {"weights": "auto"}}, "/job/weights"),
        ({"job": {"weights": "random"}}, "/job/weights"),
        ({"job": {"weights": "imagenet"}}, "/job/weights"),
        ({"job": {"weights": "https://example.com/vgg16_notop.weights.h5"}}, "/job/weights"),
        ({"tls": {"enabled": True}}, "/tls/existingSecret"),
        ({"podSecurity": {"runAsUser": 0}}, "/podSecurity/runAsUser"),
        ({"worker": {"resources": {"limits": {"memory": "lots"}}}}, "/worker/resources/limits/memory"),
        ({"karpenter": {"zones": ["us-east-1a"]}}, "/karpenter/zones"),
    ],
)
def test_schema_refuses(values: dict[str, Any], where: str) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
            chart.validate_schema(values)
    # helm install/template render refuse them too.
    with pytest.raises(helm.HelmError):
        render(values)


def test_schema_accepts_every_ci_file() -> None:
    with helm.Chart.load(CHART) as chart:
        for _name, values in CI_VALUES.items():
            chart.validate_schema(values)


def test_values_documented_key_by_key() -> None:
    """Every key of values.yaml has a comment above it, or sits inside a commented key
    (e.g. the entries of a documented ``resources`` block)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9._/-]*):(.*)$", line)
        if not m:
            continue
        indent, _key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = lines[i - 1].strip().startswith("#") or any(d for _, d in stack)
        is_parent = rest.strip() == "" and i + 1 < len(lines) and lines[i + 1].startswith(" " * (indent + 2))
        if not is_parent:
            assert documented, f"values.yaml line {i + 1} has no comment: {line!r}"
        stack.append((indent, documented))
