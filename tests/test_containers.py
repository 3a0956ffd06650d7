"""The production path for real: the image is built, and the chart's pods run as containers.

The chart is rendered with test values; every pod (the scheduler Deployment, the worker
Deployment's replicas, the run Job, the ``helm test`` pod) is started from its rendered
spec by :mod:`pods` (command, args, env, security context, volumes, limits: nothing is
written by hand here). S3 is moto's server on 127.0.0.1 holding an eu-west-1 bucket with
the bundled sample and a VGG16 weights file made by the test; the pods reach it through the
chart's ``s3.endpointUrl`` value and a Secret named by ``s3.credentialsSecret``, both given
at render time (no values file of the repository holds them).

Needs a Docker engine (started here as root when none runs: see :mod:`docker_engine`).
Where none can be had, these tests fail with the reason; they are never skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from chart_commands import in_container
from conftest import BUNDLED
from docker_engine import IMAGE_REPOSITORY, IMAGE_TAG, Engine, build_image, engine_session
from k8s_validation import render
from packaging.utils import canonicalize_name
from pods import FakeCluster, Pod, docker_run_args, probe_url
from s3_server import S3, TEST_KEY, TEST_SECRET

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RELEASE, NAMESPACE = "fruits", "fruitdask"
BUCKET = "fruits-containers"
CREDENTIALS_SECRET = "fruitdask-s3-test"
TLS_SECRET = "fruitdask-dask-tls-test"
#: Sized for a 2-core machine: the emulation enforces these limits with --cpus/--memory.
SMALL = {
    "scheduler": {"resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}},
    "worker": {
        "replicas": 2,
        "resources": {"requests": {"cpu": "1", "memory": "3Gi"}, "limits": {"cpu": "1", "memory": "3Gi"}},
        "scratchSize": "1Gi",
    },
}


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    yield from engine_session()


@pytest.fixture(scope="session")
def image(engine: Engine) -> str:
    return build_image(engine)


def test_image_ships_exactly_the_locked_versions(engine: Engine, image: str) -> None:
    from test_lock import REQUIREMENTS, pins

    def in_image(*cmd: str) -> str:
        return engine.run("run", "--rm", "--network", "host", "--entrypoint", cmd[0], image, *cmd[1:]).stdout.decode()

    assert "No broken requirements" in in_image("pip", "check")
    listed = json.loads(in_image("pip", "list", "--format", "json"))
    frozen = {canonicalize_name(d["name"]): d["version"] for d in listed}
    locked = pins(REQUIREMENTS / "cpu.txt")
    # pip itself comes from the base image's venv module, not the lock.
    assert {n: (v, frozen.get(n)) for n, v in locked.items() if frozen.get(n) != v} == {}
    assert set(frozen) - set(locked) == {"fruitdask", "pip"}
    assert frozen["fruitdask"] == metadata.version("fruitdask")
    # Runs as the numeric non-root user; the build machine's pip settings left no trace.
    assert in_image("id", "-u").strip() == "10001"
    assert in_image("sh", "-c", "ls -A /tmp; test ! -e /tmp/pip-settings && echo clean").split() == ["clean"]
    history = engine.run("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout.decode()
    assert "PIP_SETTINGS_URL" not in history and "127.0.0.1" not in history and "pip.conf" not in history


def chart_values(s3_endpoint: str, job: dict[str, Any] | None = None, tls: bool = False) -> dict[str, Any]:
    """Test values: the local image, the local S3, small resources (never committed)."""
    values: dict[str, Any] = {
        "image": {"repository": IMAGE_REPOSITORY, "tag": IMAGE_TAG, "pullPolicy": "Never"},
        "s3": {"endpointUrl": s3_endpoint, "credentialsSecret": CREDENTIALS_SECRET},
        "helmTest": {"timeoutSeconds": 120},
        **SMALL,
    }
    if job:
        values["job"] = {
            "enabled": True,
            "resources": {"requests": {"cpu": "1", "memory": "3Gi"}, "limits": {"cpu": "1", "memory": "3Gi"}},
            **job,
        }
    # TLS is the chart's default; the plain runs here turn it off (NetworkPolicies stay on).
    values["tls"] = {"enabled": True, "existingSecret": TLS_SECRET} if tls else {"enabled": False}
    return values


class ChartPods:
    """The rendered release on the fake cluster: start pods by component, wait, clean up."""

    def __init__(self, engine: Engine, values: dict[str, Any], secrets: dict[str, dict[str, bytes]]):
        self.engine = engine
        self.objects = render(values, name=RELEASE, namespace=NAMESPACE)
        self.cluster = FakeCluster(NAMESPACE, secrets=secrets)
        self.cluster.services = {o["metadata"]["name"]: o for o in self.objects if o["kind"] == "Service"}
        self.started: list[Pod] = []

    def template(self, kind: str, component: str) -> dict[str, Any]:
        (obj,) = [
            o for o in self.objects
            if o["kind"] == kind and o["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]  # fmt: skip
        if kind == "CronJob":
            return obj["spec"]["jobTemplate"]["spec"]["template"]
        return obj if kind == "Pod" else obj["spec"]["template"]

    def start(self, kind: str, component: str, name: str) -> Pod:
        return self.start_template(name, self.template(kind, component))

    def start_template(self, name: str, template: dict[str, Any], init_timeout: float = 420) -> Pod:
        """Start a pod from a pod template: its init containers first, each to exit 0 in
        order (as a kubelet does), then its container."""
        pod = self.cluster.add_pod(name, template)
        self.started.append(pod)
        for i, init in enumerate(pod.spec.get("initContainers", [])):
            init_name = f"{name}-{init['name']}"
            self.engine.run("rm", "--force", init_name, check=False)
            self.engine.run("run", *docker_run_args(pod, self.cluster, i, init=True))
            self.engine.containers.append(init_name)
            code = self.wait_exit(init_name, timeout=init_timeout)
            assert code == 0, f"init container {init_name} exited {code}: {self.logs(init_name)[-4000:]}"
        pod.init_done = True
        self.engine.run("rm", "--force", name, check=False)
        self.engine.run("run", *docker_run_args(pod, self.cluster))
        self.engine.containers.append(name)
        return pod

    def start_deployment(self, component: str, replicas: int | None = None) -> list[Pod]:
        (obj,) = [
            o for o in self.objects
            if o["kind"] == "Deployment" and o["metadata"]["labels"]["app.kubernetes.io/component"] == component
        ]  # fmt: skip
        n = obj["spec"]["replicas"] if replicas is None else replicas
        base = obj["metadata"]["name"]
        return [self.start("Deployment", component, f"{base}-{i}") for i in range(n)]

    def wait_exit(self, name: str, timeout: float) -> int:
        done = self.engine.run("wait", name, timeout=timeout)
        return int(done.stdout.decode().strip())

    def logs(self, name: str) -> str:
        done = self.engine.run("logs", name, check=False)
        return (done.stdout + done.stderr).decode(errors="replace")

    def remove(self, pod: Pod) -> None:
        names = [pod.name] + [f"{pod.name}-{c['name']}" for c in pod.spec.get("initContainers", [])]
        for name in names:
            self.engine.run("rm", "--force", name, check=False)
            if name in self.engine.containers:
                self.engine.containers.remove(name)

    def remove_all(self) -> None:
        for pod in self.started:
            self.remove(pod)


def wait_http(url: str, timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    last: Exception | int = 0
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = e
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s: {last}")


def s3_secret() -> dict[str, dict[str, bytes]]:
    return {CREDENTIALS_SECRET: {"AWS_ACCESS_KEY_ID": TEST_KEY.encode(), "AWS_SECRET_ACCESS_KEY": TEST_SECRET.encode()}}


@pytest.fixture(scope="module")
def plain_release(engine: Engine, image: str, s3_server: str) -> Iterator[ChartPods]:
    """Scheduler + 2 workers of the default (plain TCP) chart, running."""
    release = ChartPods(engine, chart_values(s3_server), s3_secret())
    try:
        (scheduler,) = release.start_deployment("scheduler")
        wait_http(probe_url(scheduler))
        release.start_deployment("worker")
        yield release
    finally:
        release.remove_all()


def stage_inputs(s3: S3, weights_file: Path) -> dict[str, str]:
    """An eu-west-1 bucket holding the bundled sample and the weights file."""
    bucket = s3.bucket(BUCKET, "eu-west-1")
    s3.upload(BUNDLED, f"{bucket}/Training")
    s3.upload(weights_file, f"{bucket}/models/vgg16_notop.weights.h5")
    return {"input": f"{bucket}/Training", "weights": f"{bucket}/models/vgg16_notop.weights.h5"}


def read_features(s3: S3, output: str) -> pd.DataFrame:
    key = output.removeprefix("s3://")
    assert s3.fs.exists(f"{key}/_SUCCESS"), s3.objects()
    parts = sorted(s3.fs.glob(f"{key}/features/*.parquet"))
    return pd.concat([pd.read_parquet(s3.fs.open(p, "rb")) for p in parts], ignore_index=True)


def table_state(s3: S3, output: str) -> dict[str, Any]:
    """The latest version of the Delta table at ``output``, read by deltalake in a fresh
    process: its version and rows. (delta-rs calls from this long-lived test process to the
    moto server can hang on a pooled connection; each command in a pod is a fresh process too.)"""
    code = ("import json, sys; from fruitdask.lake import table as d; so = json.loads(sys.argv[2]); "
            "dt = d.load(sys.argv[1], so); t = d.read_columns(dt, so, ['path']); paths = t.column('path').to_pylist(); "
            "print(json.dumps({'version': dt.version(), 'rows': len(paths), 'unique': len(set(paths)) == len(paths)}))")
    done = subprocess.run([sys.executable, "-c", code, output, json.dumps(s3.storage_options)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "AWS_ACCESS_KEY_ID": TEST_KEY,
                                                       "AWS_SECRET_ACCESS_KEY": TEST_SECRET})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def start_job(release: ChartPods, s3_server: str, job: dict[str, Any], suffix: str) -> Pod:
    """``helm upgrade`` with ``job`` values (scheduler and workers unchanged): start the Job's pod."""
    release.objects = render(chart_values(s3_server, job=job), name=RELEASE, namespace=NAMESPACE)
    (job_obj,) = [o for o in release.objects if o["kind"] == "Job"]
    return release.start("Job", "run", f"{job_obj['metadata']['name']}-{suffix}")


def test_scheduler_dashboard_and_helm_test_pod(plain_release: ChartPods) -> None:
    plain = plain_release
    scheduler = plain.cluster.pods[0]
    assert wait_http(probe_url(scheduler)) == 200
    with urllib.request.urlopen(f"http://{scheduler.ip}:8787/status", timeout=10) as r:
        assert r.status == 200 and b"Dask" in r.read()
    test_pod = plain.start("Pod", "test", plain.template("Pod", "test")["metadata"]["name"])
    code = plain.wait_exit(test_pod.name, timeout=240)
    assert code == 0, plain.logs(test_pod.name)
    assert "2 workers connected" in plain.logs(test_pod.name)


def test_job_pod_commits_every_row(plain_release: ChartPods, s3: S3, weights_file: Path, s3_server: str) -> None:
    plain = plain_release
    inputs = stage_inputs(s3, weights_file)
    output = f"s3://{BUCKET}/features/run-1"
    job = start_job(plain, s3_server, {**inputs, "output": output, "imageSize": 32}, "1")
    try:
        code = plain.wait_exit(job.name, timeout=420)
        assert code == 0, plain.logs(job.name)[-4000:]
        df = read_features(s3, output)
        assert len(df) == 120 and df["path"].is_unique
        assert sorted(df["label"].unique()) == sorted(p.name for p in BUNDLED.iterdir() if p.is_dir())
        run = json.loads(s3.read(f"{BUCKET}/features/run-1/run.json"))
        assert run["cluster"]["n_workers"] == 2, run["cluster"]
    finally:
        plain.remove(job)


def _busy_worker(scheduler_ip: str, timeout: float = 240) -> str:
    """Address of a worker that is featurizing right now (polled from the scheduler)."""
    import warnings

    from distributed import Client

    # The test's Python (3.11.x of the machine) and the image's (Debian's 3.11.2) differ in
    # their patch version only: Dask warns, harmlessly, for this observer client.
    with warnings.catch_warnings(), Client(f"tcp://{scheduler_ip}:8786", timeout=30) as client:
        warnings.simplefilter("ignore")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for worker, keys in client.processing().items():
                if any("featurize" in str(k) for k in keys):
                    return worker
            time.sleep(0.2)
    raise AssertionError("no featurization task was seen processing")


def test_worker_sigkill_mid_run_keeps_every_row_once(plain_release: ChartPods, s3: S3, weights_file: Path, s3_server: str) -> None:
    plain = plain_release
    inputs = stage_inputs(s3, weights_file)
    output = f"s3://{BUCKET}/features/run-kill"
    job_values = {**inputs, "output": output, "imageSize": 96, "extraArgs": ["--partition-size", "6"]}
    job = start_job(plain, s3_server, job_values, "kill")
    try:
        busy = _busy_worker(plain.cluster.pods[0].ip)
        (victim,) = [p for p in plain.cluster.pods if f"//{p.ip}:" in busy]
        plain.engine.run("kill", "--signal", "KILL", victim.name)
        # The Deployment's ReplicaSet replaces a dead pod: a new pod from the same template.
        plain.start("Deployment", "worker", f"{victim.name}-replacement")
        code = plain.wait_exit(job.name, timeout=420)
        assert code == 0, plain.logs(job.name)[-4000:]
        df = read_features(s3, output)
        assert len(df) == 120 and df["path"].is_unique
    finally:
        plain.remove(job)


# --- the schedule's CronJob pods (issue #32) -------------------------------------------------


def schedule_values(s3_endpoint: str, output: str, inputs: dict[str, str]) -> dict[str, Any]:
    """The test values with the schedule on (it needs TLS: the test's own Secret)."""
    values = chart_values(s3_endpoint, tls=True)
    values["schedule"] = {
        "enabled": True, "input": inputs["input"], "output": output, "models": f"s3://{BUCKET}/models/registry",
        "weights": inputs["weights"], "imageSize": 32, "workers": 2, "waitLockSeconds": 60,
        "resources": {"requests": {"cpu": "1", "memory": "3Gi"}, "limits": {"cpu": "1", "memory": "3Gi"}},
        "maintenanceResources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
    }
    return values


def scheduled_pod(release: ChartPods, component: str) -> dict[str, Any]:
    """The CronJob's pod template, its fruitdask command lines as far as this checkout's CLI
    knows their flags (chart_commands: unchanged once issue #32's branches are merged)."""
    template = release.template("CronJob", component)
    spec = dict(template["spec"])
    for key in ("initContainers", "containers"):
        if key in spec:
            spec[key] = [in_container(c) for c in spec[key]]
    return {**template, "spec": spec}


def test_maintenance_cronjob_pod_compacts_then_vacuums(plain_release: ChartPods, s3: S3, weights_file: Path,
                                                       s3_server: str, tmp_path: Path) -> None:
    """The maintenance CronJob's pod, as rendered: `table compact` (init container) then
    `table vacuum` on the table a run Job wrote; every row is still there once, at the
    table's newest version."""
    plain = plain_release
    inputs = stage_inputs(s3, weights_file)
    output = f"s3://{BUCKET}/features/daily"
    job = start_job(plain, s3_server, {**inputs, "output": output, "imageSize": 32, "extraArgs": ["--partition-size", "30"]}, "maint")
    try:
        assert plain.wait_exit(job.name, timeout=420) == 0, plain.logs(job.name)[-4000:]
    finally:
        plain.remove(job)
    before = table_state(s3, output)
    release = ChartPods(plain.engine, schedule_values(s3_server, output, inputs), {**s3_secret(), TLS_SECRET: make_tls_secret(tmp_path)})
    pod = release.start_template("fruits-fruitdask-maintenance-29412345-abcde", scheduled_pod(release, "maintenance"))
    try:
        code = release.wait_exit(pod.name, timeout=300)
        assert code == 0, release.logs(pod.name)[-4000:]
        compact_log, vacuum_log = release.logs(f"{pod.name}-compact"), release.logs(pod.name)
        # Each command prints its result as JSON on stdout (the logs have stderr after it).
        compacted, _ = json.JSONDecoder().raw_decode(compact_log[compact_log.index("{"):])
        assert compacted["numFilesRemoved"] >= 2 and compacted["numFilesAdded"] >= 1, compacted
        vacuumed, _ = json.JSONDecoder().raw_decode(vacuum_log[vacuum_log.index("{"):])
        assert vacuumed["dry_run"] is False, vacuumed
        after = table_state(s3, output)
        assert after["version"] > before["version"]  # compaction committed a version
        assert after["rows"] == before["rows"] == 120 and after["unique"], (before, after)
    finally:
        release.remove_all()


def test_daily_cronjob_pod_asks_kubernetes_for_a_cluster_owned_by_itself(engine: Engine, image: str, s3: S3,
                                                                       weights_file: Path, s3_server: str, tmp_path: Path) -> None:
    """The daily CronJob's pod, as rendered, in the image: it reads its owner from the
    downward API and asks for DaskCluster fd-<its uid> in its namespace. No Kubernetes API
    runs here, so it must stop there with the error that says what to check, not earlier."""
    inputs = stage_inputs(s3, weights_file)
    release = ChartPods(engine, schedule_values(s3_server, f"s3://{BUCKET}/features/daily-k8s", inputs),
                        {**s3_secret(), TLS_SECRET: make_tls_secret(tmp_path)})
    pod = release.start_template("fruits-fruitdask-daily-29412345-x7k2p", scheduled_pod(release, "daily"))
    try:
        code = release.wait_exit(pod.name, timeout=300)
        logs = release.logs(pod.name)
        assert code == 1, logs[-4000:]
        assert f"could not create DaskCluster 'fd-{pod.uid}' in namespace 'fruitdask'" in logs, logs[-4000:]
        assert "dask-kubernetes operator is installed" in logs
    finally:
        release.remove_all()


# --- TLS ---------------------------------------------------------------------------------


def make_tls_secret(tmp: Path) -> dict[str, bytes]:
    """A CA and one certificate for client and server use (what cert-manager would issue)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fruitdask-test-ca")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fruitdask")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{RELEASE}-fruitdask-scheduler")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    secret = {
        "ca.crt": ca.public_bytes(pem),
        "tls.crt": cert.public_bytes(pem),
        "tls.key": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }
    for name, data in secret.items():
        (tmp / name).write_bytes(data)
    return secret


def _client_refused(address: str, **security: Any) -> str:
    """Connect from a fresh process (no TLS settings of the tests leak in); return the error."""
    code = (
        "import sys\nfrom distributed import Client\nfrom distributed.security import Security\n"
        f"kw = {security!r}\n"
        "sec = Security(**kw) if kw else None\n"
        "try:\n"
        f"    Client({address!r}, timeout=8, security=sec).close()\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n    sys.exit(3)\n"
        "print('connected')\n"
    )
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, f"a client without certificates connected: {done.stdout} {done.stderr[-1000:]}"
    return done.stdout


def test_tls_cluster_forms_and_refuses_clients_without_certificates(engine: Engine, image: str, s3_server: str, tmp_path: Path) -> None:
    secrets = {**s3_secret(), TLS_SECRET: make_tls_secret(tmp_path)}
    release = ChartPods(engine, chart_values(s3_server, tls=True), secrets)
    try:
        scheduler_args = release.template("Deployment", "scheduler")["spec"]["containers"][0]["args"]
        assert "tls" in scheduler_args
        (scheduler,) = release.start_deployment("scheduler")
        wait_http(probe_url(scheduler))
        release.start_deployment("worker")
        # The helm test pod connects with the chart's TLS settings and sees both workers.
        test_pod = release.start("Pod", "test", release.template("Pod", "test")["metadata"]["name"])
        code = release.wait_exit(test_pod.name, timeout=240)
        logs = release.logs(test_pod.name)
        assert code == 0 and "2 workers connected to tls://" in logs, logs[-3000:]
        # Without a client certificate (trusting the CA) the scheduler refuses the handshake;
        # plain TCP to the TLS port is refused too.
        _client_refused(f"tls://{scheduler.ip}:8786", tls_ca_file=str(tmp_path / "ca.crt"), require_encryption=True)
        _client_refused(f"tcp://{scheduler.ip}:8786")
    finally:
        release.remove_all()
