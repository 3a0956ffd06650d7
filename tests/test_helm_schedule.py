"""The chart's daily loop (issue #32): CronJobs, a Dask cluster per run, no idle cluster, alerts.

The chart is rendered with the Helm engine of helm-python-sdk (as in test_helm_chart.py);
every object is validated against the Kubernetes schemas there (``ci/schedule-values.yaml``
joins the parametrized checks). Here: what the schedule adds or removes, the daily pod's
command line as fruitdask parses it, the DaskCluster that command line builds (owned by the
pod, reachable through the NetworkPolicies), the Role it needs, the alert expressions.

Every test here fails on the chart before the schedule (no ``schedule`` value: the schema
refuses it), except the two that check the default rendering is unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml
from chart_commands import parse
from k8s_validation import CHART, ci_values, dask_cluster_schema, pod_policy_violations, pod_specs, render, render_notes
from pods import FakeCluster, container_env, docker_run_args, expand

from fruitdask.backends.dask.kube import SCHEDULER_PORT, WORKER_PORT
from fruitdask.backends.dask.kube_connect import cluster_resources
from fruitdask.config import EU_REGIONS, build_config

SCHEDULE = ci_values()["schedule-values"]
RELEASE, NAMESPACE = "fruits", "fruitdask"


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render(SCHEDULE, name=RELEASE, namespace=NAMESPACE)


def find(objects: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict[str, Any]]:
    return [
        o for o in objects
        if o["kind"] == kind and (component is None or o["metadata"]["labels"].get("app.kubernetes.io/component") == component)
    ]  # fmt: skip


def cronjob(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (obj,) = find(objects, "CronJob", component)
    return obj


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["jobTemplate"]["spec"]["template"]


def pairs(args: list[str]) -> dict[str, str | None]:
    """``--flag value`` pairs of an argument list (a flag followed by a flag has ``None``)."""
    out: dict[str, str | None] = {}
    for i, a in enumerate(args):
        if a.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[a] = None if nxt is None or nxt.startswith("--") else nxt
    return out


# -- what the schedule renders, and what it removes ---------------------------------------


def test_without_schedule_no_cronjob_and_the_static_cluster_stays() -> None:
    objects = render({})
    assert not find(objects, "CronJob") and not find(objects, "Role", "daily") and not find(objects, "PrometheusRule")
    assert {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in find(objects, "Deployment")} == {"scheduler", "worker"}
    assert find(objects, "Pod", "test")


def test_schedule_renders_two_cronjobs_and_no_idle_cluster(objects) -> None:
    """Done when (issue #32): ``helm template`` with the schedule on renders a CronJob and no
    idle workers: no scheduler or worker Deployment, Service, PDB, monitor or helm test."""
    assert {o["metadata"]["name"] for o in find(objects, "CronJob")} == {"fruits-fruitdask-daily", "fruits-fruitdask-maintenance"}
    components = {(o["kind"], o["metadata"]["labels"].get("app.kubernetes.io/component")) for o in objects}
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "PodMonitor", "NetworkPolicy", "ServiceAccount"):
        assert (kind, "scheduler") not in components and (kind, "worker") not in components, kind
    assert not find(objects, "Pod", "test")  # the helm test waits for static workers
    assert {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in find(objects, "Deployment")} == {"serve"}


def test_keep_static_cluster_keeps_it_beside_the_schedule() -> None:
    values = {**SCHEDULE, "schedule": {**SCHEDULE["schedule"], "keepStaticCluster": True}}
    objects = render(values)
    assert {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in find(objects, "Deployment")} == {"scheduler", "worker", "serve"}
    assert len(find(objects, "CronJob")) == 2 and find(objects, "Pod", "test")


@pytest.mark.parametrize("component", ["daily", "maintenance"])
def test_cronjob_fields(objects, component: str) -> None:
    cj = cronjob(objects, component)
    spec = cj["spec"]
    assert spec["schedule"] == {"daily": "30 2 * * *", "maintenance": "30 4 * * 0"}[component]
    assert spec["timeZone"] == "Europe/Paris"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] == 3600
    assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (3, 3)
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 1 and job["ttlSecondsAfterFinished"] == 3600 and job["activeDeadlineSeconds"] == 43200
    rules = job["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [1, 2, 3]}}
    pod = pod_template(cj)
    assert pod["spec"]["restartPolicy"] == "Never"
    labels = pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == RELEASE and labels["app.kubernetes.io/component"] == component
    assert labels["fruitdask.io/client"] == "true"
    # The same hardened pod as the run Job: restricted profile, EU placement, limits.
    (where, pspec), = pod_specs(cj)
    assert not pod_policy_violations(where, pspec, EU_REGIONS)
    assert len(cj["metadata"]["name"]) <= 52  # the Job controller appends 11 characters


def test_cronjob_names_fit_with_the_longest_release_name() -> None:
    values = {**SCHEDULE, "fullnameOverride": "f" * 52}
    names = [o["metadata"]["name"] for o in find(render(values), "CronJob")]
    assert sorted(names) == sorted(["f" * 46 + "-daily", "f" * 40 + "-maintenance"]), names


def test_default_time_zone_and_schedules() -> None:
    with helm.Chart.load(CHART) as chart:
        s = chart.values["schedule"]
    assert s["enabled"] is False and s["timeZone"] == "Europe/Paris"
    assert s["maintenanceCron"].split()[-1] == "0"  # weekly: Sundays
    assert s["keepStaticCluster"] is False and 0 < s["maxRemoveFraction"] < 1


# -- the daily pod's command line -----------------------------------------------------------


def daily_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = pod_template(cronjob(objects, "daily"))["spec"]["containers"]
    return c


def test_daily_command_line(objects) -> None:
    c = daily_container(objects)
    assert c["command"] == ["python", "-m", "fruitdask", "daily"]
    args = pairs(c["args"])
    assert args["--input"] == "s3://fruits-eu-west-1/fruits-360/Training"
    assert args["--output"] == "s3://fruits-eu-west-1/features/daily"
    assert args["--models"] == "s3://fruits-eu-west-1/models/registry"
    assert args["--weights"] == "s3://fruits-eu-west-1/models/vgg16_notop.weights.h5"
    assert args["--max-remove-fraction"] == "0.05"
    assert args["--wait-lock"] == "3600"
    assert "--skipped-ok" in args
    # Its own cluster, sized like the static workers would be, in the TLS of the release.
    assert args["--cluster"] == "kubernetes"
    assert args["--kube-name"] == "fd-$(FRUITDASK_KUBE_OWNER_POD_UID)"
    assert args["--kube-workers"] == "3"
    assert (args["--kube-worker-cpu"], args["--kube-worker-memory"]) == ("4", "16Gi")
    assert args["--kube-service-account"] == "fruits-fruitdask"
    assert args["--kube-tls-secret"] == "fruits-fruitdask-dask-tls"
    assert args["--kube-region"] == "eu-west-1"
    assert c["args"][-2:] == ["--components", "50"]


def test_daily_pod_builds_a_cluster_owned_by_itself(objects) -> None:
    """The daily pod's own command line and environment, resolved as the kubelet would
    (downward API, ``$(VAR)``), give fruitdask a DaskCluster named after the pod's uid,
    owned by the pod, in its namespace, with the release's TLS Secret and IRSA account; its
    NetworkPolicies admit the daily pod, and the daily pod's policy lets it reach them."""
    cluster = FakeCluster(NAMESPACE)
    pod = cluster.add_pod("fruits-fruitdask-daily-29412345-x7k2p", pod_template(cronjob(objects, "daily")))
    c = daily_container(objects)
    env = container_env(c, pod, cluster)
    args = [expand(a, env) for a in c["args"]]
    ns, _ = parse("daily", args)
    flags = {k: v for k, v in vars(ns).items() if k not in ("command", "func")}
    cfg = build_config(flags, env)
    assert cfg.cluster == "kubernetes"
    kube = cfg.kube
    assert (kube.name, kube.namespace) == (f"fd-{pod.uid}", NAMESPACE)
    assert (kube.owner_pod_name, kube.owner_pod_uid) == (pod.name, pod.uid)
    assert (kube.tls_secret, kube.service_account, kube.n_workers) == ("fruits-fruitdask-dask-tls", "fruits-fruitdask", 3)
    resources = cluster_resources(kube, {})
    for obj in resources:
        assert obj["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": pod.name, "uid": pod.uid}]
        assert obj["metadata"]["namespace"] == pod.namespace
    dask_cluster = resources[-1]
    jsonschema.validate(dask_cluster, dask_cluster_schema())
    assert len(f"{kube.name}-scheduler") <= 63  # the operator's Service name is a DNS label
    # The DaskCluster's policies admit the daily pod (its labels carry what they select).
    for policy in resources[1:3]:
        clients = policy["spec"]["ingress"][0]["from"][-1]["podSelector"]["matchLabels"]
        assert clients.items() <= pod.labels.items(), clients
    # The daily pod's own policy lets it reach the operator's pods on the Dask ports.
    (daily_policy,) = find(objects, "NetworkPolicy", "daily")
    assert daily_policy["spec"]["podSelector"]["matchLabels"].items() <= pod.labels.items()
    (to_api, to_dask) = daily_policy["spec"]["egress"]
    assert {(p["port"], p["protocol"]) for p in to_api["ports"]} == {(443, "TCP")}
    assert {p["port"] for p in to_dask["ports"]} == {SCHEDULER_PORT, WORKER_PORT}
    selector = to_dask["to"][0]["podSelector"]["matchLabels"]
    for role in ("scheduler", "worker"):
        assert selector.items() <= dask_cluster["spec"][role]["metadata"]["labels"].items(), role


def test_daily_pod_runs_as_a_container(objects) -> None:
    """The container emulation of test_containers.py accepts every field of the daily and
    maintenance pods (it refuses any field it cannot honour), as it does the run Job's."""
    cluster = FakeCluster(NAMESPACE, secrets={"fruits-fruitdask-dask-tls": {"ca.crt": b"x", "tls.crt": b"x", "tls.key": b"x"}})
    daily = cluster.add_pod("daily-1", pod_template(cronjob(objects, "daily")))
    run = docker_run_args(daily, cluster)
    assert run[run.index("--entrypoint") + 1: run.index("--entrypoint") + 2] == ["python"]
    assert f"fd-{daily.uid}" in run and "--read-only" in run
    maintenance = cluster.add_pod("maintenance-1", pod_template(cronjob(objects, "maintenance")))
    compact = docker_run_args(maintenance, cluster, init=True)
    assert compact[compact.index("--name") + 1] == "maintenance-1-compact"
    with pytest.raises(AssertionError, match="initContainers not run"):
        docker_run_args(maintenance, cluster)
    maintenance.init_done = True
    assert "vacuum" in docker_run_args(maintenance, cluster)


def test_maintenance_compacts_then_vacuums_under_the_lease(objects) -> None:
    spec = pod_template(cronjob(objects, "maintenance"))["spec"]
    (compact,), (vacuum,) = spec["initContainers"], spec["containers"]
    output = "s3://fruits-eu-west-1/features/daily"
    assert compact["command"] == ["python", "-m", "fruitdask", "table", "compact"]
    # --json: one JSON document per step in the pod's log, for log pipelines (text is for people).
    assert compact["args"] == [output, "--json", "--wait-lock", "3600"]
    assert vacuum["command"] == ["python", "-m", "fruitdask", "table", "vacuum"]
    assert vacuum["args"] == [output, "--json", "--wait-lock", "3600", "--retain-hours", "336"]
    for c in (compact, vacuum):
        ns, left_out = parse("table", [c["command"][-1], *c["args"]])
        assert ns.output == output and ns.json and ns.storage_lock_wait == 3600 and left_out == set()
    # No Dask, no Kubernetes API: no TLS key, no token.
    assert spec["automountServiceAccountToken"] is False
    assert all(m["mountPath"] != "/etc/dask/tls" for c in (compact, vacuum) for m in c["volumeMounts"])


# -- who may do what ----------------------------------------------------------------------


def test_only_the_daily_pod_holds_an_api_token_and_its_role_covers_its_calls(objects) -> None:
    tokens = {
        where: spec.get("automountServiceAccountToken")
        for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component") != "tls-setup"
        for where, spec in pod_specs(o)
    }  # fmt: skip
    assert [w for w, t in tokens.items() if t is not False] == ["CronJob/fruits-fruitdask-daily"]
    (role,) = find(objects, "Role", "daily")
    (binding,) = find(objects, "RoleBinding", "daily")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    sa = pod_template(cronjob(objects, "daily"))["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    allowed = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    # Every object fruitdask creates for the cluster (kube_connect.cluster_resources): create, delete.
    plural = {"ServiceAccount": "serviceaccounts", "NetworkPolicy": "networkpolicies", "DaskCluster": "daskclusters"}
    for obj in cluster_resources(build_config({"input": "i", "output": "o"}, {}).kube, {}):
        group = obj["apiVersion"].rpartition("/")[0]
        for verb in ("create", "delete"):
            assert (group, plural[obj["kind"]], verb) in allowed, (obj["kind"], verb)
    # dask-kubernetes waits for the scheduler pod and reads its Service.
    assert {("", "pods", "list"), ("", "pods", "get"), ("", "services", "get")} <= allowed
    assert not any(v in ("*", "escalate", "bind", "impersonate") for _, _, v in allowed)
    assert not any(r in ("*", "secrets", "roles", "rolebindings") for _, r, _ in allowed)


# -- alerts ---------------------------------------------------------------------------------


def rules_of(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    (rule,) = find(objects, "PrometheusRule")
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def balanced(expr: str) -> bool:
    depth = 0
    for ch in re.sub(r'"[^"]*"', '""', expr):
        depth += {"(": 1, ")": -1, "{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def test_prometheus_rule_structure(objects) -> None:
    """The PrometheusRule by hand (its CRD schema here is hand-written: k8s_schemas/README.md)."""
    (rule,) = find(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # so Prometheus selects it
    (group,) = rule["spec"]["groups"]
    assert group["name"] and set(rules_of(objects)) == {"FruitdaskDailyStalled", "FruitdaskChampionTooOld"}
    for r in group["rules"]:
        assert set(r) == {"alert", "expr", "for", "labels", "annotations"}, r
        assert re.fullmatch(r"[0-9]+[smh]", r["for"]) and r["labels"]["severity"] == "warning"
        assert balanced(r["expr"]), r["expr"]
        assert {"summary", "description"} <= set(r["annotations"])


def test_daily_stalled_alert_reads_the_cronjobs_last_success(objects) -> None:
    expr = rules_of(objects)["FruitdaskDailyStalled"]["expr"]
    selector = '{namespace="fruitdask", cronjob="fruits-fruitdask-daily"}'
    name = cronjob(objects, "daily")["metadata"]["name"]
    assert f'cronjob="{name}"' in selector
    # The last success older than 36 h ...
    assert f"(time() - max by (namespace, cronjob) (kube_cronjob_status_last_successful_time{selector}) > {36 * 3600})" in expr
    # ... or none since the CronJob was created 36 h ago, or no series at all.
    assert f"kube_cronjob_created{selector}) > {36 * 3600}" in expr
    assert f"unless on (namespace, cronjob) kube_cronjob_status_last_successful_time{selector}" in expr
    assert f"absent(kube_cronjob_created{selector})" in expr
    assert expr.count("\nor\n") == 2, expr


def test_champion_age_alert_reads_the_service_metric() -> None:
    values = {**SCHEDULE, "metrics": {**SCHEDULE["metrics"], "prometheusRule": {"enabled": True, "championMaxAgeHours": 48}}}
    objects = render(values)
    expr = rules_of(objects)["FruitdaskChampionTooOld"]["expr"]
    assert re.fullmatch(
        r'max by \(namespace, pod\) \(fruitdask_model_champion_age_seconds\{namespace="fruitdask", '
        r'pod=~"fruits-fruitdask-serve-\.\+"\}\) > 172800', expr
    ), expr
    # The pods it reads are the serve Deployment's (named <deployment>-<hash>-<id>), no other.
    (pods,) = re.findall(r'pod=~"([^"]+)"', expr)
    (serve,) = find(objects, "Deployment", "serve")
    assert re.fullmatch(pods, serve["metadata"]["name"] + "-7d4b9c-x2x9z")
    assert not re.fullmatch(pods, cronjob(objects, "daily")["metadata"]["name"] + "-29412345-x7k2p")


def test_rules_follow_their_switches() -> None:
    assert not find(render({**SCHEDULE, "metrics": {"prometheusRule": {"enabled": False}}}), "PrometheusRule")
    no_serve = {k: v for k, v in SCHEDULE.items() if k != "serve"}
    assert set(rules_of(render({**no_serve, "metrics": {"prometheusRule": {"enabled": True}}}))) == {"FruitdaskDailyStalled"}
    serve_only = {k: v for k, v in SCHEDULE.items() if k != "schedule"}
    assert set(rules_of(render(serve_only))) == {"FruitdaskChampionTooOld"}


# -- values the schema refuses ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"schedule": {"enabled": True, "input": "s3://b-eu/in", "output": "s3://b-eu/out",
                       "weights": "s3://b-eu/w.weights.h5"}}, "/schedule/models"),
        ({"schedule": {"models": "/models"}}, "/schedule/models"),
        ({"schedule": {"output": "features"}}, "/schedule/output"),
        ({"schedule": {"weights": "auto"}}, "/schedule/weights"),
        ({"schedule": {"cron": "every day"}}, "/schedule/cron"),
        ({"schedule": {"maintenanceCron": "TZ=UTC 0 4 * * 0 x"}}, "/schedule/maintenanceCron"),
        ({"schedule": {"maxRemoveFraction": 1.5}}, "/schedule/maxRemoveFraction"),
        ({"schedule": {"extraArgs": ["--kube-workers", "50"]}}, "/schedule/extraArgs/0"),
        ({"schedule": {"extraArgs": ["--cluster", "tcp://x:8786"]}}, "/schedule/extraArgs/0"),
        ({"schedule": {"vacuumArgs": ["--wait-lock", "0"]}}, "/schedule/vacuumArgs/0"),
        ({"schedule": {"vacuumArgs": ["--dry-run"]}}, "/schedule/vacuumArgs/0"),
        ({"schedule": {"enabled": True}, "tls": {"enabled": False}}, "/tls/enabled"),
        ({"schedule": {"enabled": True}, "job": {"enabled": True}}, "/job/enabled"),
        ({"metrics": {"prometheusRule": {"dailyStaleHours": 0}}}, "/metrics/prometheusRule/dailyStaleHours"),
    ],
)
def test_schema_refuses(values: dict[str, Any], where: str) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
            chart.validate_schema(values)


def test_job_beside_the_schedule_needs_the_static_cluster() -> None:
    job = yaml.safe_load((CHART / "ci" / "job-values.yaml").read_text())["job"]
    values = {**SCHEDULE, "job": job, "schedule": {**SCHEDULE["schedule"], "keepStaticCluster": True}}
    (run,) = find(render(values), "Job", "run")
    assert run["spec"]["template"]["spec"]["containers"][0]["args"][1] == "tls://fruits-fruitdask-scheduler:8786"


def test_notes_say_how_to_start_and_follow_a_day() -> None:
    notes = render_notes(SCHEDULE)
    assert "kubectl --namespace fruitdask create job --from=cronjob/fruits-fruitdask-daily" in notes
    assert "helm test" not in notes and "port-forward svc/fruits-fruitdask-scheduler" not in notes
    assert "port-forward svc/fruits-fruitdask-scheduler" in render_notes({})


def test_only_the_pending_flags_of_issue_32_may_be_left_out() -> None:
    """The parse helper leaves out nothing but the flags other branches add (and fails on a
    typo), so the tests above check every other word of the rendered command lines."""
    from chart_commands import as_far_as_known

    command, kept, left_out = as_far_as_known("run", ["--input", "s3://b/in", "--wait-lock", "60", "--skipped-ok"])
    assert command == "run" and kept[:2] == ["--input", "s3://b/in"] and "--skipped-ok" in kept
    assert left_out <= {"--wait-lock"}
    with pytest.raises(AssertionError, match="--kube-wrokers"):
        as_far_as_known("run", ["--kube-wrokers", "3"])


def test_chart_lints_strictly_with_the_schedule() -> None:
    report = helm.lint(str(CHART), SCHEDULE, strict=True, kube_version="v1.33.0")
    assert not [m for m in report["messages"] if m["severity"] >= 1] and not report["errors"], report
