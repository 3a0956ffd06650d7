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


def dask_pods(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The pods that run fruitdask and Dask: every workload but the TLS setup hook Job,
    which has a test of its own (:func:`test_tls_setup_hook_is_minimal_and_hardened`)."""
    if obj["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "tls-setup":
        return []
    return pod_specs(obj)


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
    assert {"tls-values", "plain-tcp-values", "gpu-values", "metrics-values", "job-values", "karpenter-values", "serve-values",
            "schedule-values"} <= set(CI_VALUES)


def test_every_object_is_valid_kubernetes(rendered) -> None:
    _name, _, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    # The schedule's CronJobs replace the static cluster and its helm test Pod.
    assert {"CronJob", "Role", "RoleBinding"} <= kinds if _name == "schedule-values" else "Pod" in kinds
    for obj in objects:
        validate_object(obj)  # raises on any schema error or unknown kind


def test_custom_resources_are_validated_not_skipped(rendered) -> None:
    name, _, objects = rendered
    custom = {o["kind"] for o in objects if is_custom(o)}
    expected = {
        "metrics-values": {"ServiceMonitor", "PodMonitor"},
        "karpenter-values": {"NodePool", "EC2NodeClass"},
        "schedule-values": {"PodMonitor", "PrometheusRule"},
    }.get(name, set())
    assert custom == expected


def test_every_pod_is_hardened_and_in_the_eu(rendered) -> None:
    _, _, objects = rendered
    pods = [p for o in objects for p in dask_pods(o)]
    assert len(pods) >= 3  # scheduler, worker, helm test (+ Job); or daily, maintenance, serve
    problems = [p for where, spec in pods for p in pod_policy_violations(where, spec, EU_REGIONS)]
    assert not problems, "\n".join(problems)
    for where, spec in pods:
        # Only the daily pod talks to the Kubernetes API (it creates its DaskCluster).
        assert spec["automountServiceAccountToken"] is (where == "CronJob/fruits-fruitdask-daily"), where
        # The IRSA account everywhere but on the scheduler (see test_scheduler_has_no_s3_role)
        # and the serve pods (their own, read-only: see test_serve_pods_have_their_own_identity).
        expected = {"-scheduler": "fruits-fruitdask-scheduler", "-serve": "fruits-fruitdask-serve"}.get(
            where[where.rfind("-"):], "fruits-fruitdask")
        assert spec["serviceAccountName"] == expected, where
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
        if obj["kind"] == "CronJob":
            job = obj["spec"]["jobTemplate"]
            for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
                assert all(k in labels for k in LABELS), obj["metadata"]["name"]


def test_no_loadbalancer_no_nodeport(rendered) -> None:
    _, _, objects = rendered
    for svc in by_kind(objects, "Service"):
        assert svc["spec"]["type"] == "ClusterIP"
        assert all("nodePort" not in p for p in svc["spec"]["ports"])


def test_commands_are_dask_subcommands(rendered) -> None:
    name, _, objects = rendered
    if name != "schedule-values":  # the schedule's clusters come from fruitdask's DaskCluster spec
        assert container(one(objects, "Deployment", "-scheduler"))["command"] == ["dask", "scheduler"]
        assert container(one(objects, "Deployment", "-worker"))["command"] == ["dask", "worker"]
    for obj in objects:
        for _, spec in dask_pods(obj):
            for c in spec["containers"]:
                words = c.get("command", []) + c.get("args", [])
                assert not {"dask-scheduler", "dask-worker"} & set(words), words


def test_env_tf_and_amm_everywhere(rendered) -> None:
    _, _, objects = rendered
    for obj in objects:
        for where, spec in dask_pods(obj):
            env = env_of(spec["containers"][0])
            assert AMM not in env, where  # Dask's default: a run needs no scattered replica
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
        for _, spec in dask_pods(obj):
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
    assert args[0] == "tls://fruits-fruitdask-scheduler:8786"


def test_worker_scratch_is_a_writable_emptydir() -> None:
    worker = one(render({}), "Deployment", "-worker")
    spec = worker["spec"]["template"]["spec"]
    args = container(worker)["args"]
    assert args[args.index("--local-directory") + 1] == "/scratch"
    (scratch,) = [v for v in spec["volumes"] if v["name"] == "scratch"]
    assert scratch["emptyDir"]["sizeLimit"] == "20Gi"
    assert {"name": "scratch", "mountPath": "/scratch"} in container(worker)["volumeMounts"]


def test_serviceaccount_irsa_annotation() -> None:
    assert "annotations" not in one(render({}), "ServiceAccount", "-fruitdask")["metadata"]
    sa = one(render(CI_VALUES["job-values"]), "ServiceAccount", "-fruitdask")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == "arn:aws:iam::123456789012:role/fruitdask-s3"
    assert sa["automountServiceAccountToken"] is False


def test_scheduler_has_no_s3_role() -> None:
    """Any client of the scheduler can run code on it: it never runs with the IRSA role."""
    objects = render(CI_VALUES["job-values"])
    sched = one(objects, "Deployment", "-scheduler")["spec"]["template"]["spec"]
    sa = one(objects, "ServiceAccount", "-scheduler")
    assert sched["serviceAccountName"] == sa["metadata"]["name"] == "fruits-fruitdask-scheduler"
    assert "annotations" not in sa["metadata"]
    assert sa["automountServiceAccountToken"] is False
    # Workers and the Job keep the role.
    for kind, suffix in (("Deployment", "-worker"), ("Job", "-run")):
        assert one(objects, kind, suffix)["spec"]["template"]["spec"]["serviceAccountName"] == "fruits-fruitdask"
    # A user-managed scheduler account, by name.
    objects = render({"scheduler": {"serviceAccount": {"create": False, "name": "dask-no-role"}}})
    assert not by_kind(objects, "ServiceAccount", "-scheduler")
    assert one(objects, "Deployment", "-scheduler")["spec"]["template"]["spec"]["serviceAccountName"] == "dask-no-role"


def test_job_runs_fruitdask_against_the_release_scheduler() -> None:
    assert not by_kind(render({}), "Job", "-run")
    objects = render(CI_VALUES["job-values"])
    job = one(objects, "Job", "-run")
    c = container(job)
    assert c["command"] == ["python", "-m", "fruitdask", "run"]
    args = c["args"]
    assert args[:6] == [
        "--cluster", "tls://fruits-fruitdask-scheduler:8786",
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
        for where, spec in dask_pods(obj):
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


DIGEST = "sha256:" + "a" * 64
GPU_DIGEST = "sha256:" + "b" * 64


def test_gpu_workers_never_use_the_cpu_digest() -> None:
    values = {**CI_VALUES["gpu-values"], "image": {"repository": "ghcr.io/fruits/fruitdask", "tag": "0.1.0",
                                                   "digest": DIGEST}}
    objects = render(values)
    assert container(one(objects, "Deployment", "-worker"))["image"] == "ghcr.io/fruits/fruitdask:0.1.0-gpu"
    # Everything else is pinned by the CPU digest.
    assert container(one(objects, "Deployment", "-scheduler"))["image"] == f"ghcr.io/fruits/fruitdask@{DIGEST}"
    values["image"]["gpuDigest"] = GPU_DIGEST
    objects = render(values)
    assert container(one(objects, "Deployment", "-worker"))["image"] == f"ghcr.io/fruits/fruitdask@{GPU_DIGEST}"
    assert container(one(objects, "Deployment", "-scheduler"))["image"] == f"ghcr.io/fruits/fruitdask@{DIGEST}"
    # CPU workers use the CPU digest; the GPU digest is for GPU workers only.
    cpu = render({"image": {"repository": "r.example/fruitdask", "tag": "1", "digest": DIGEST, "gpuDigest": GPU_DIGEST}})
    assert container(one(cpu, "Deployment", "-worker"))["image"] == f"r.example/fruitdask@{DIGEST}"


ALL_EU = "eu-west-1,eu-west-3,eu-central-1,eu-north-1,eu-south-1,eu-south-2"


def test_s3_settings_reach_every_pod_and_fruitdask_reads_them() -> None:
    from fruitdask.config import build_config

    values = {"s3": {"endpointUrl": "http://moto:5000", "allowedRegions": ["eu-west-1", "eu-central-1"]},
              **CI_VALUES["job-values"]}
    pods = [p for o in render(values) for p in dask_pods(o)]
    assert len(pods) == 4  # scheduler, worker, Job, helm test
    for where, spec in pods:
        env = env_of(spec["containers"][0])
        assert env["FRUITDASK_STORAGE_ENDPOINT_URL"] == "http://moto:5000", where
        assert env["AWS_ENDPOINT_URL_S3"] == "http://moto:5000", where
        assert env["FRUITDASK_STORAGE_ALLOWED_REGIONS"] == "eu-west-1,eu-central-1", where
        storage = build_config({"input": "s3://b/in", "output": "s3://b/out"}, env).storage
        assert storage.endpoint_url == "http://moto:5000", where
        assert storage.allowed_regions == ("eu-west-1", "eu-central-1"), where
    for where, spec in (p for o in render({}) for p in dask_pods(o)):
        env = env_of(spec["containers"][0])
        assert env["FRUITDASK_STORAGE_ALLOWED_REGIONS"] == ALL_EU, where
        assert not {"FRUITDASK_STORAGE_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"} & set(env), where


def test_chart_region_env_comes_after_extra_env() -> None:
    """Kubernetes keeps the last of two same-named variables: the chart's region, allow-list
    and endpoint follow tfEnv/extraEnv, so they win even where the schema was skipped."""
    for _, spec in (p for o in render({"extraEnv": {"MY_SETTING": "1"}}) for p in dask_pods(o)):
        names = [e["name"] for e in spec["containers"][0]["env"]]
        last_free = max(names.index(k) for k in ("MY_SETTING", *TF_ENV))
        for guarded in ("AWS_REGION", "AWS_DEFAULT_REGION", "FRUITDASK_STORAGE_ALLOWED_REGIONS"):
            assert names.index(guarded) > last_free, names


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


RELEASE = {"app.kubernetes.io/name": "fruitdask", "app.kubernetes.io/instance": "fruits"}
CLIENT = {**RELEASE, "fruitdask.io/client": "true"}


def rule_ports(rule: dict[str, Any]) -> set[tuple[int, str]]:
    return {(p["port"], p["protocol"]) for p in rule["ports"]}


def egress_to(policy: dict[str, Any], labels: dict[str, str]) -> set[tuple[int, str]]:
    """Ports a policy's egress opens towards pods with exactly these matchLabels."""
    return {
        port
        for rule in policy["spec"]["egress"]
        if any(peer.get("podSelector", {}).get("matchLabels") == labels and "namespaceSelector" not in peer
               for peer in rule["to"])
        for port in rule_ports(rule)
    }


def test_network_policies_ingress() -> None:
    objects = render({})
    sched = one(objects, "NetworkPolicy", "-scheduler")
    comm, dash = sched["spec"]["ingress"]
    assert comm["ports"] == [{"port": 8786, "protocol": "TCP"}]
    selectors = [f["podSelector"]["matchLabels"] for f in comm["from"]]
    assert {**RELEASE, "app.kubernetes.io/component": "worker"} in selectors
    # Clients must belong to this release: the client label alone (another release's Job)
    # does not open the scheduler.
    assert CLIENT in selectors
    assert {"fruitdask.io/client": "true"} not in selectors
    assert all("namespaceSelector" not in f for f in comm["from"])  # same namespace only
    assert dash["ports"] == [{"port": 8787, "protocol": "TCP"}]
    assert dash["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    worker = one(objects, "NetworkPolicy", "-worker")
    assert rule_ports(worker["spec"]["ingress"][0]) == {(9000, "TCP"), (9001, "TCP")}
    assert CLIENT in [f["podSelector"]["matchLabels"] for f in worker["spec"]["ingress"][0]["from"]]
    # The helm test pod and the Job carry every label of the client selector.
    pods = [one(objects, "Pod"), one(render(CI_VALUES["job-values"]), "Job", "-run")]
    for pod in pods:
        labels = pod["metadata"]["labels"] if pod["kind"] == "Pod" else pod["spec"]["template"]["metadata"]["labels"]
        assert CLIENT.items() <= labels.items(), labels
    assert not by_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_network_policy_ports_are_numbers() -> None:
    """The AWS VPC CNI policy agent has mishandled named ports: every port is an int."""
    values = {"worker": {"port": 9100, "nannyPort": 9101, "dashboardPort": 9102},
              "scheduler": {"service": {"port": 8800, "dashboardPort": 8801}}}
    policies = by_kind(render(values), "NetworkPolicy")
    assert len(policies) == 3
    seen = set()
    for policy in policies:
        for direction in ("ingress", "egress"):
            for rule in policy["spec"].get(direction, []):
                for port in rule["ports"]:
                    assert type(port["port"]) is int, (policy["metadata"]["name"], port)
                    seen.add(port["port"])
    assert {8800, 8801, 9100, 9101, 9102, 53, 443} <= seen


def test_network_policy_egress() -> None:
    policies = {p["metadata"]["name"].rsplit("-", 1)[1]: p for p in by_kind(render({}), "NetworkPolicy")}
    assert set(policies) == {"scheduler", "worker", "client"}
    scheduler = {**RELEASE, "app.kubernetes.io/component": "scheduler"}
    worker = {**RELEASE, "app.kubernetes.io/component": "worker"}
    dns_peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
    for name, policy in policies.items():
        spec = policy["spec"]
        assert "Egress" in spec["policyTypes"], name
        (dns,) = [r for r in spec["egress"] if r["to"] == [dns_peer]]
        assert rule_ports(dns) == {(53, "UDP"), (53, "TCP")}, name
    https = {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    # Only the pods with the S3 role reach HTTPS; the scheduler has no way out but DNS
    # and its workers.
    assert https in policies["worker"]["spec"]["egress"]
    assert https in policies["client"]["spec"]["egress"]
    assert https not in policies["scheduler"]["spec"]["egress"]
    assert all("ipBlock" not in peer for r in policies["scheduler"]["spec"]["egress"] for peer in r["to"])
    assert egress_to(policies["scheduler"], worker) == {(9000, "TCP"), (9001, "TCP")}
    assert egress_to(policies["worker"], scheduler) == {(8786, "TCP")}
    assert egress_to(policies["worker"], worker) == {(9000, "TCP")}
    assert egress_to(policies["client"], scheduler) == {(8786, "TCP")}
    assert egress_to(policies["client"], worker) == {(9000, "TCP")}
    # Clients are the release's labelled pods, and nothing may connect to them.
    assert policies["client"]["spec"]["podSelector"]["matchLabels"] == CLIENT
    assert policies["client"]["spec"]["ingress"] == []
    # The HTTPS egress can be narrowed to the S3 prefix list / VPC endpoint.
    narrowed = render({"networkPolicy": {"s3Egress": {"cidrs": ["10.0.0.0/16"], "ports": [443, 9000]}}})
    w = one(narrowed, "NetworkPolicy", "-worker")
    (s3,) = [r for r in w["spec"]["egress"] if "ipBlock" in r["to"][0]]
    assert s3["to"] == [{"ipBlock": {"cidr": "10.0.0.0/16"}}]
    assert rule_ports(s3) == {(443, "TCP"), (9000, "TCP")}


def test_pod_disruption_budgets_never_block_drains_forever() -> None:
    pdbs = {p["metadata"]["name"]: p["spec"] for p in by_kind(render({}), "PodDisruptionBudget")}
    # No scheduler budget by default: with one replica it would allow no eviction at all.
    assert set(pdbs) == {"fruits-fruitdask-worker"}
    worker = pdbs["fruits-fruitdask-worker"]
    assert worker["maxUnavailable"] == 1 and "minAvailable" not in worker
    assert worker["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    # Opt-in scheduler budget: a scheduler that is not Ready can still be evicted.
    pdbs = {p["metadata"]["name"]: p["spec"]
            for p in by_kind(render({"scheduler": {"pdb": {"enabled": True}}}), "PodDisruptionBudget")}
    assert pdbs["fruits-fruitdask-scheduler"]["minAvailable"] == 1
    assert pdbs["fruits-fruitdask-scheduler"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_helm_test_hook_checks_worker_count() -> None:
    pod = one(render({"worker": {"replicas": 5}}), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["python", "-c"]
    assert "wait_for_workers" in c["args"][0]
    assert c["args"][1:3] == ["tls://fruits-fruitdask-scheduler:8786", "5"]
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
        ({"image": {"tag": "LATEST"}}, "/image/tag"),
        ({"image": {"tag": "Latest"}}, "/image/tag"),
        ({"image": {"gpuDigest": "sha256:short"}}, "/image/gpuDigest"),
        ({"extraEnv": {"AWS_ENDPOINT_URL": "http://evil:9000"}}, "'AWS_ENDPOINT_URL'"),
        ({"extraEnv": {"AWS_ENDPOINT_URL_S3": "http://evil:9000"}}, "'AWS_ENDPOINT_URL_S3'"),
        ({"extraEnv": {"AWS_REGION": "us-east-1"}}, "'AWS_REGION'"),
        ({"extraEnv": {"AWS_DEFAULT_REGION": "us-east-1"}}, "'AWS_DEFAULT_REGION'"),
        ({"extraEnv": {"AWS_ACCESS_KEY_ID": "AKIA"}}, "'AWS_ACCESS_KEY_ID'"),
        ({"extraEnv": {"FRUITDASK_STORAGE_ALLOWED_REGIONS": "us-east-1"}}, "'FRUITDASK_STORAGE_ALLOWED_REGIONS'"),
        ({"extraEnv": {"FRUITDASK_STORAGE_REGION": "us-east-1"}}, "'FRUITDASK_STORAGE_REGION'"),
        ({"extraEnv": {"FRUITDASK_STORAGE_ENDPOINT_URL": "http://x"}}, "'FRUITDASK_STORAGE_ENDPOINT_URL'"),
        ({"tfEnv": {"AWS_REGION": "us-east-1"}}, "'AWS_REGION'"),
        ({"job": {"extraArgs": ["--allowed-regions", "us-east-1"]}}, "/job/extraArgs/0"),
        ({"job": {"extraArgs": ["--components", "5", "--allowed-regions=us-east-1"]}}, "/job/extraArgs/2"),
        ({"job": {"extraArgs": ["--allowed", "us-east-1"]}}, "/job/extraArgs/0"),  # argparse prefix
        ({"job": {"extraArgs": ["--s3-endpoint", "http://evil"]}}, "/job/extraArgs/0"),
        ({"job": {"extraArgs": ["--s3", "http://evil"]}}, "/job/extraArgs/0"),
        ({"job": {"extraArgs": ["--aws-region", "us-east-1"]}}, "/job/extraArgs/0"),
        ({"job": {"extraArgs": ["--kube-region", "us-east-1"]}}, "/job/extraArgs/0"),
        ({"job": {"extraArgs": ["--cluster", "tcp://elsewhere:8786"]}}, "/job/extraArgs/0"),
        ({"s3": {"allowedRegions": ["us-east-1"]}}, "/s3/allowedRegions/0"),
        ({"s3": {"allowedRegions": ["eu-west-2"]}}, "/s3/allowedRegions/0"),  # London: not in the EU
        ({"s3": {"allowedRegions": []}}, "/s3/allowedRegions"),
        ({"s3": {"endpointUrl": "file:///etc/passwd"}}, "/s3/endpointUrl"),
        ({"networkPolicy": {"s3Egress": {"ports": ["https"]}}}, "/networkPolicy/s3Egress/ports/0"),
        ({"unknownKey": True}, "unknownKey"),
        ({"worker": {"gpu": {"enabled": True, "typo": 1}}}, "typo"),
        ({"job": {"enabled": True}}, "/job/"),
        # The Job never falls back to random weights: an explicit weights file is required.
        ({"job": {"enabled": True, "input": "s3://b-eu/in", "output": "s3://b-eu/out"}}, "/job/weights"),
        ({"job": {"weights": "auto"}}, "/job/weights"),
        ({"job": {"weights": "random"}}, "/job/weights"),
        ({"job": {"weights": "imagenet"}}, "/job/weights"),
        ({"job": {"weights": "https://example.com/vgg16_notop.weights.h5"}}, "/job/weights"),
        ({"tls": {"enabled": False}, "networkPolicy": {"enabled": False}}, "/networkPolicy/enabled"),
        ({"tls": {"existingSecret": "Not_A_Name"}}, "/tls/existingSecret"),
        ({"tls": {"validityDays": 0}}, "/tls/validityDays"),
        ({"podSecurity": {"runAsUser": 0}}, "/podSecurity/runAsUser"),
        ({"worker": {"resources": {"limits": {"memory": "lots"}}}}, "/worker/resources/limits/memory"),
        ({"karpenter": {"zones": ["us-east-1a"]}}, "/karpenter/zones"),
        ({"serve": {"enabled": True}}, "/serve/model"),
        ({"serve": {"model": "gs://fruits/model"}}, "/serve/model"),
        ({"serve": {"model": "/models/fruit"}}, "/serve/model"),
        ({"serve": {"weights": "https://example.com/w.h5"}}, "/serve/weights"),
        ({"serve": {"service": {"type": "LoadBalancer"}}}, "/serve/service/type"),
        ({"serve": {"autoscaling": {"enabled": True, "maxReplica": 3}}}, "maxReplica"),
        ({"serve": {"resources": {"limits": {"memory": "lots"}}}}, "/serve/resources/limits/memory"),
        ({"serve": {"extraArgs": ["--allowed-regions", "us-east-1"]}}, "/serve/extraArgs/0"),
        ({"serve": {"extraArgs": ["--top", "5", "--s3-endpoint=http://evil"]}}, "/serve/extraArgs/2"),
        ({"serve": {"extraArgs": ["--aws-region", "us-east-1"]}}, "/serve/extraArgs/0"),
        ({"serve": {"extraArgs": ["--probe-port", "9090"]}}, "/serve/extraArgs/0"),
        ({"serve": {"networkPolicy": {"egressCidrs": ["::/0"]}}}, "/serve/networkPolicy/egressCidrs/0"),
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


def test_schema_guards_are_not_too_broad() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({
            "image": {"repository": "r.example/fruitdask", "tag": "latest-2026.1", "gpuDigest": GPU_DIGEST},
            "extraEnv": {"FRUITDASK_STORAGE_CONNECT_TIMEOUT": "30", "MY_AWS_NOTE": "x"},
            "job": {"extraArgs": ["--components", "50", "--cluster-timeout", "60", "--overwrite"]},
            "s3": {"endpointUrl": "https://bucket.vpce-0a1b.s3.eu-west-1.vpce.amazonaws.com",
                   "allowedRegions": ["eu-west-1"]},
        })


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


# -- serve ---------------------------------------------------------------------------


def test_serve_is_off_by_default() -> None:
    objects = render({})
    assert not [o for o in objects if o["metadata"]["name"].endswith("-serve")]
    assert not by_kind(objects, "HorizontalPodAutoscaler")


def test_serve_deployment_reads_the_eu_bucket_and_probes_readiness() -> None:
    objects = render(CI_VALUES["serve-values"])
    deploy = one(objects, "Deployment", "-serve")
    c = container(deploy)
    assert c["command"] == ["python", "-m", "fruitdask", "serve"]
    args = c["args"]
    assert args[args.index("--model") + 1] == "s3://fruits-eu-west-1/models/fruit-classifier-1"
    assert args[args.index("--weights") + 1] == "s3://fruits-eu-west-1/weights/vgg16_notop.weights.h5"
    assert args[args.index("--host") + 1] == "0.0.0.0" and args[args.index("--port") + 1] == "8080"
    assert args[args.index("--threads") + 1] == "4"  # limits.cpu of the ci file
    assert args[args.index("--max-body-bytes") + 1] == "10485760"
    assert args[args.index("--decode-threads") + 1] == "4"
    assert args[args.index("--max-pixels") + 1] == "16777216"
    # Probes on their own port, outside the API's connection cap (#23 item 2).
    assert args[args.index("--probe-port") + 1] == "8081"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "probes"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "probes"}
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "probes", "containerPort": 8081, "protocol": "TCP"}]
    # --memory-limit is the container's limit, from the downward API.
    assert args[args.index("--memory-limit") + 1] == "$(SERVE_MEMORY_LIMIT)"
    (memory,) = [e for e in c["env"] if e["name"] == "SERVE_MEMORY_LIMIT"]
    assert memory["valueFrom"]["resourceFieldRef"] == {"containerName": "serve", "resource": "limits.memory"}
    # The region guard of the command needs the pod's S3 identity and region.
    assert env_of(c)["AWS_REGION"] == "eu-west-1"
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # The whole fruitdask CLI checks the flags: every one the chart passes exists, and the
    # settings they make fit the memory limit (4Gi in the ci file).
    from fruitdask.cli import build_parser
    from fruitdask.commands.serve import settings_from_args

    args = [str(4 * 2**30) if a == "$(SERVE_MEMORY_LIMIT)" else a for a in args]
    settings = settings_from_args(build_parser().parse_args(["serve", *args]))
    assert settings.probe_port == 8081 and settings.decode_threads == 4 and settings.max_connections >= 1024


def test_serve_drains_before_it_stops() -> None:
    """#23 item 4: the preStop hook fails readiness and waits drainSeconds; the grace period covers
    it and the 30 s uvicorn gives open requests. #31 item 8: the hook is an ``exec`` that calls
    the probe port on 127.0.0.1 from inside the pod, not an ``httpGet`` from the kubelet over the
    network (fails on the former chart, whose hook was ``httpGet``); test_serve_hardening.py runs
    this very command against the server."""
    deploy = one(render(CI_VALUES["serve-values"]), "Deployment", "-serve")
    c = container(deploy)
    (hook,) = c["lifecycle"]["preStop"].values()
    assert list(c["lifecycle"]["preStop"]) == ["exec"]
    python, flag, code = hook["command"]
    assert (python, flag) == ("python", "-c")
    assert "'http://127.0.0.1:8081/drain'" in code and "timeout=45" in code  # drainSeconds + 30
    assert c["args"][c["args"].index("--drain-seconds") + 1] == "15"
    assert 15 >= c["readinessProbe"]["periodSeconds"] * c["readinessProbe"]["failureThreshold"]  # unready by then
    assert deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 15 + 30 + 10


def test_serve_pods_have_their_own_identity_and_no_dask_key() -> None:
    """#23 item 5: not the workers' IRSA role nor their credentials Secret; no Dask TLS key."""
    values = {**CI_VALUES["serve-values"], "tls": {"enabled": True, "existingSecret": "fruitdask-dask-tls"},
              "s3": {"credentialsSecret": "workers-keys"}}
    objects = render(values)
    spec = one(objects, "Deployment", "-serve")["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "fruits-fruitdask-serve"
    account = one(objects, "ServiceAccount", "-serve")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == "arn:aws:iam::123456789012:role/fruitdask-serve"
    assert account["automountServiceAccountToken"] is False
    c = spec["containers"][0]
    assert "envFrom" not in c  # s3.credentialsSecret is the workers'
    assert not [e for e in c["env"] if e["name"].startswith("DASK_")]
    assert {v["name"] for v in spec["volumes"]} == {"home", "tmp"}
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/home/fruitdask", "/tmp"}
    # The workers keep theirs.
    worker = container(one(objects, "Deployment", "-worker"))
    assert worker["envFrom"] == [{"secretRef": {"name": "workers-keys"}}]
    # Stores without IRSA: the serve pods' own read-only keys.
    values["serve"] = {**values["serve"], "credentialsSecret": "serve-read-only"}
    c = container(one(render(values), "Deployment", "-serve"))
    assert c["envFrom"] == [{"secretRef": {"name": "serve-read-only"}}]


def test_serve_service_hpa_pdb_select_the_serve_pods() -> None:
    objects = render(CI_VALUES["serve-values"])
    deploy = one(objects, "Deployment", "-serve")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deploy["spec"]  # the HPA owns the replica count
    svc = one(objects, "Service", "-serve")
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["ports"][0]["targetPort"] == "http"
    hpa = one(objects, "HorizontalPodAutoscaler", "-serve")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deploy["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    pdb = one(objects, "PodDisruptionBudget", "-serve")
    policy = one(objects, "NetworkPolicy", "-serve")
    for selector in (svc["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"], policy["spec"]["podSelector"]["matchLabels"],
                     deploy["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items() and selector["app.kubernetes.io/component"] == "serve"
    # Other components' selectors do not catch the serve pods.
    worker_pdb = one(objects, "PodDisruptionBudget", "-worker")
    assert not worker_pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    api, probes = policy["spec"]["ingress"]
    assert api["from"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"fruitdask.io/serve-client": "true"}}}]
    # The probe port: the monitoring namespace only (the kubelet needs no rule on the VPC CNI).
    assert probes["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    # Numeric ports (the VPC CNI policy agent and named ports do not mix).
    assert api["ports"] == [{"port": 8080, "protocol": "TCP"}] and probes["ports"] == [{"port": 8081, "protocol": "TCP"}]
    # Egress: DNS, and HTTPS to the S3 (and STS) CIDRs given, never the whole internet.
    dns, s3 = policy["spec"]["egress"]
    assert dns["ports"][0]["port"] == 53
    assert s3 == {"to": [{"ipBlock": {"cidr": c}} for c in ("52.218.0.0/17", "3.5.64.0/21", "3.5.72.0/23", "10.0.128.0/20")],
                  "ports": [{"port": 443, "protocol": "TCP"}]}
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_serve_egress_must_be_narrowed_and_kubelet_cidrs_reach_the_probe_port_only() -> None:
    serve = {"enabled": True, "model": "s3://fruits-eu-west-1/models/m"}
    with pytest.raises(helm.HelmError, match=re.escape("serve.networkPolicy.egressCidrs is required")):
        render({"serve": serve})
    with pytest.raises(helm.HelmValuesError, match="egressCidrs"):
        render({"serve": {**serve, "networkPolicy": {"egressCidrs": ["0.0.0.0/0"]}}})
    render({"serve": serve, "networkPolicy": {"enabled": False}})  # no policy: nothing to narrow
    objects = render({"serve": {**serve, "networkPolicy": {"egressCidrs": ["10.0.0.0/16"], "kubeletCidrs": ["10.0.0.0/16"]}}})
    api, probes = one(objects, "NetworkPolicy", "-serve")["spec"]["ingress"]
    assert {"ipBlock": {"cidr": "10.0.0.0/16"}} in probes["from"] and {"ipBlock": {"cidr": "10.0.0.0/16"}} not in api["from"]


def test_serve_budget_that_blocks_drains_is_refused() -> None:
    """#31 item 9: a serve PodDisruptionBudget must allow an eviction at the fewest pods the
    release runs (replicas, or the autoscaler's minReplicas). One pod is refused by the schema;
    minAvailable at or above the pods by the template. Fails on the former chart, which
    rendered every one of these."""
    serve = {"enabled": True, "model": "s3://fruits-eu-west-1/models/m", "networkPolicy": {"egressCidrs": ["10.0.0.0/16"]}}
    with pytest.raises(helm.HelmValuesError, match=r"/serve/replicas.*minimum: got 1, want 2"):
        render({"serve": {**serve, "replicas": 1}})
    with pytest.raises(helm.HelmValuesError, match=r"/serve/autoscaling/minReplicas.*minimum: got 1, want 2"):
        render({"serve": {**serve, "autoscaling": {"enabled": True, "minReplicas": 1}}})
    with pytest.raises(helm.HelmError, match=r"serve.pdb.minAvailable 3 with serve.replicas 3 allows no eviction"):
        render({"serve": {**serve, "replicas": 3, "pdb": {"minAvailable": 3}}})
    with pytest.raises(helm.HelmError, match=r"minAvailable 2 with serve.autoscaling.minReplicas 2 allows no eviction"):
        render({"serve": {**serve, "autoscaling": {"enabled": True, "minReplicas": 2}, "pdb": {"minAvailable": 2}}})
    # What still renders: a budget below the pods, and one pod without a budget.
    pdb = one(render({"serve": {**serve, "replicas": 3, "pdb": {"minAvailable": 2}}}), "PodDisruptionBudget", "-serve")
    assert pdb["spec"]["minAvailable"] == 2
    objects = render({"serve": {**serve, "replicas": 1, "pdb": {"enabled": False}}})
    assert one(objects, "Deployment", "-serve")["spec"]["replicas"] == 1 and not by_kind(objects, "PodDisruptionBudget", "-serve")
    render({"serve": {"replicas": 1}})  # serve off: its budget is not rendered, nothing to refuse


def test_serve_uploads_per_client_and_trusted_proxies_reach_the_command() -> None:
    """#31 item 7: the chart passes --max-uploads-per-client, and --trusted-proxies when the
    ingress's CIDRs are given; trusting every address is refused."""
    from fruitdask.cli import build_parser
    from fruitdask.commands.serve import settings_from_args

    serve = {"enabled": True, "model": "s3://fruits-eu-west-1/models/m", "networkPolicy": {"egressCidrs": ["10.0.0.0/16"]}}
    args = container(one(render({"serve": serve}), "Deployment", "-serve"))["args"]
    assert args[args.index("--max-uploads-per-client") + 1] == "4" and "--trusted-proxies" not in args
    values = {"serve": {**serve, "maxUploadsPerClient": 8, "trustedProxies": ["10.0.0.0/16", "100.64.0.0/10"]}}
    args = container(one(render(values), "Deployment", "-serve"))["args"]
    assert args[args.index("--trusted-proxies") + 1] == "10.0.0.0/16,100.64.0.0/10"
    args = [str(4 * 2**30) if a == "$(SERVE_MEMORY_LIMIT)" else a for a in args]
    settings = settings_from_args(build_parser().parse_args(["serve", *args]))
    assert settings.max_uploads_per_client == 8 and [str(n) for n in settings.trusted_proxies] == ["10.0.0.0/16", "100.64.0.0/10"]
    with pytest.raises(helm.HelmValuesError, match="trustedProxies"):
        render({"serve": {**serve, "trustedProxies": ["0.0.0.0/0"]}})


def test_serve_model_poll_seconds_reaches_the_command() -> None:
    """#32: the serve pods read a registry's champion alias every serve.modelPollSeconds
    (--model-poll-seconds, default 60); a poll of 0 is refused by the schema."""
    from fruitdask.cli import build_parser
    from fruitdask.commands.serve import settings_from_args

    serve = {"enabled": True, "model": "s3://fruits-eu-west-1/models", "networkPolicy": {"egressCidrs": ["10.0.0.0/16"]}}
    args = container(one(render({"serve": serve}), "Deployment", "-serve"))["args"]
    assert args[args.index("--model-poll-seconds") + 1] == "60"
    args = container(one(render({"serve": {**serve, "modelPollSeconds": 5}}), "Deployment", "-serve"))["args"]
    args = [str(4 * 2**30) if a == "$(SERVE_MEMORY_LIMIT)" else a for a in args]
    assert settings_from_args(build_parser().parse_args(["serve", *args])).model_poll_s == 5
    with pytest.raises(helm.HelmValuesError, match="modelPollSeconds"):
        render({"serve": {**serve, "modelPollSeconds": 0}})


def test_serve_without_autoscaling_has_fixed_replicas() -> None:
    objects = render({"serve": {"enabled": True, "model": "s3://fruits-eu-west-1/models/m", "replicas": 3,
                                "pdb": {"enabled": False}, "networkPolicy": {"egressCidrs": ["10.0.0.0/16"]}}})
    deploy = one(objects, "Deployment", "-serve")
    assert deploy["spec"]["replicas"] == 3
    assert "--weights" not in container(deploy)["args"]
    assert not by_kind(objects, "HorizontalPodAutoscaler")
    assert not by_kind(objects, "PodDisruptionBudget", "-serve")


def test_notes_show_how_to_call_the_serve_api() -> None:
    assert "-serve" not in render_notes({})
    notes = render_notes(CI_VALUES["serve-values"])
    assert "port-forward svc/fruits-fruitdask-serve 8080" in notes
    assert "http://localhost:8080/v1/predict" in notes
    assert "port-forward deploy/fruits-fruitdask-serve 8081" in notes and "localhost:8081/readyz" in notes


# --- issue 23, item 12: TLS on by default, with a CA the chart makes for the release ---------


def test_tls_is_on_by_default_with_the_secret_of_the_hook() -> None:
    objects = render({})
    sched = container(one(objects, "Deployment", "-scheduler"))
    assert sched["args"][sched["args"].index("--protocol") + 1] == "tls"
    assert container(one(objects, "Deployment", "-worker"))["args"][0] == "tls://fruits-fruitdask-scheduler:8786"
    for obj in objects:
        for where, spec in dask_pods(obj):
            (vol,) = [v for v in spec["volumes"] if v["name"] == "tls"]
            assert vol["secret"]["secretName"] == "fruits-fruitdask-dask-tls", where
            assert env_of(spec["containers"][0])["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True", where
    job = one(objects, "Job", "-tls-setup")
    assert container(job)["args"] == ["fruitdask", "fruits-fruitdask-dask-tls", "fruits", "365", "fruits-fruitdask-scheduler"]
    # An existing Secret replaces the hook; TLS off (with NetworkPolicies on) has neither.
    with_secret = render({"tls": {"existingSecret": "mine"}})
    assert not [o for o in with_secret if o["metadata"]["name"].endswith("-tls-setup")]
    assert {v["secret"]["secretName"] for o in with_secret for _, s in dask_pods(o) for v in s["volumes"] if v["name"] == "tls"} == {"mine"}
    plain = render({"tls": {"enabled": False}})
    assert container(one(plain, "Deployment", "-worker"))["args"][0] == "tcp://fruits-fruitdask-scheduler:8786"
    assert not [o for o in plain if "tls" in o["metadata"]["name"]] and by_kind(plain, "NetworkPolicy")


def test_tls_setup_hook_is_minimal_and_hardened() -> None:
    objects = [o for o in render({}) if o["metadata"]["name"] == "fruits-fruitdask-tls-setup"]
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "Job", "Role", "RoleBinding", "ServiceAccount"]
    weights = {}
    for obj in objects:
        ann = obj["metadata"]["annotations"]
        assert ann["helm.sh/hook"] == "pre-install,pre-upgrade", obj["kind"]
        assert ann["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded", obj["kind"]
        weights[obj["kind"]] = int(ann["helm.sh/hook-weight"])
        validate_object(obj)
    assert weights["Job"] > max(w for k, w in weights.items() if k != "Job")  # RBAC and script first
    (role,) = [o for o in objects if o["kind"] == "Role"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["fruits-fruitdask-dask-tls"], "verbs": ["get"]},
    ]
    (job,) = [o for o in objects if o["kind"] == "Job"]
    (where, spec), = pod_specs(job)
    assert not pod_policy_violations(where, spec, EU_REGIONS)
    assert spec["serviceAccountName"] == "fruits-fruitdask-tls-setup" and spec["automountServiceAccountToken"] is True
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap"]
    assert cm["data"]["make_dask_tls.py"].strip() == (CHART / "files" / "make_dask_tls.py").read_text().strip()
    # Every other pod keeps automountServiceAccountToken false (checked in the hardening test).


def test_serve_metrics_are_scraped_on_the_probe_port() -> None:
    objects = render({**CI_VALUES["serve-values"], "metrics": {"podMonitor": {"enabled": True}}})
    monitor = one(objects, "PodMonitor", "-serve")
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "probes"
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "serve"
    assert not by_kind(render(CI_VALUES["metrics-values"]), "PodMonitor", "-serve")
