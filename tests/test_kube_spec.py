"""The DaskCluster spec for ``--cluster kubernetes``, built and checked without a cluster."""

from __future__ import annotations

import copy
import datetime
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import dask
import jsonschema
import kubernetes_validate
import pytest
from k8s_validation import KUBE_VERSION, REPO, dask_cluster_schema, pod_policy_violations, pod_specs

from fruitdask.backends.dask.kube import make_cluster_spec, parse_quantity, worker_threads
from fruitdask.backends.dask.kube_connect import KubeConnection, client_security, cluster_resources, open_kube_cluster
from fruitdask.backends.dask.kube_pods import tls_env
from fruitdask.backends.dask.kube_policies import make_network_policies, make_scheduler_service_account
from fruitdask.config import EU_REGIONS, TF_ENV, KubeSettings
from fruitdask.errors import ClusterError

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
        assert all(port in mine["ports"] for port in theirs["ports"])  # + fixed worker/nanny ports


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
        assert AMM not in env, role  # Dask's default: a run needs no scattered replica
        for k, v in TF_ENV.items():
            assert env[k] == v, (role, k)  # TF_ENV wins over a caller's value
        assert env["FRUITDASK_STORAGE_REGION"] == "eu-west-1"
        assert env["HOME"] == "/home/fruitdask" and env["TMPDIR"] == "/tmp"
        assert env["AWS_REGION"] == "eu-west-1"


def test_service_account_security_and_region(spec) -> None:
    problems = [p for where, s in pod_specs(spec) for p in pod_policy_violations(where, s, EU_REGIONS)]
    assert not problems, "\n".join(problems)
    # Only the workers carry the S3 role (IRSA); the scheduler runs under its own account.
    assert spec["spec"]["worker"]["spec"]["serviceAccountName"] == "fruits-fruitdask"
    assert spec["spec"]["scheduler"]["spec"]["serviceAccountName"] == "fruits-run-scheduler"
    for _, pod_spec in pod_specs(spec):
        assert pod_spec["automountServiceAccountToken"] is False
        terms = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["eu-west-1"]
        mounts = {m["mountPath"] for m in pod_spec["containers"][0]["volumeMounts"]}
        assert {"/home/fruitdask", "/tmp"} <= mounts
    worker = spec["spec"]["worker"]["spec"]
    assert {"name": "scratch", "emptyDir": {"sizeLimit": "16Gi"}} in worker["volumes"]
    assert spec["spec"]["scheduler"]["service"]["type"] == "ClusterIP"


def test_no_worker_service_account_when_none() -> None:
    spec = make_cluster_spec(replace(SETTINGS, service_account=None), {})
    assert "serviceAccountName" not in spec["spec"]["worker"]["spec"]
    assert spec["spec"]["scheduler"]["spec"]["serviceAccountName"] == "fruits-run-scheduler"


def test_scheduler_service_account_has_no_role() -> None:
    sa = make_scheduler_service_account(SETTINGS)
    kubernetes_validate.validate(sa, KUBE_VERSION, strict=True)
    assert sa["metadata"]["name"] == "fruits-run-scheduler"
    assert sa["metadata"]["namespace"] == "fruitdask"
    assert "annotations" not in sa["metadata"]  # no eks.amazonaws.com/role-arn
    assert sa["automountServiceAccountToken"] is False


# -- TLS ---------------------------------------------------------------------------------


def test_every_pod_speaks_tls_with_the_secret(spec) -> None:
    c = containers(spec)
    sched_args, worker_args = c["scheduler"]["args"], c["worker"]["args"]
    assert sched_args[sched_args.index("--protocol") + 1] == "tls"
    assert worker_args[worker_args.index("--protocol") + 1] == "tls"
    # The operator sets a tcp:// DASK_SCHEDULER_ADDRESS unless the container has one.
    assert env_of(c["worker"])["DASK_SCHEDULER_ADDRESS"] == "tls://fruits-run-scheduler.fruitdask.svc.cluster.local:8786"
    for where, pod_spec in pod_specs(spec):
        (vol,) = [v for v in pod_spec["volumes"] if v["name"] == "tls"]
        assert vol["secret"] == {"secretName": "fruitdask-dask-tls", "defaultMode": 0o440}, where
        container = pod_spec["containers"][0]
        assert {"name": "tls", "mountPath": "/etc/dask/tls", "readOnly": True} in container["volumeMounts"]
        env = env_of(container)
        assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True", where
        assert env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"] == "/etc/dask/tls/ca.crt", where
        for role in ("SCHEDULER", "WORKER", "CLIENT"):
            assert env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] == "/etc/dask/tls/tls.crt"
            assert env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] == "/etc/dask/tls/tls.key"


def test_caller_env_cannot_turn_tls_off() -> None:
    env = {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "False", "DASK_SCHEDULER_ADDRESS": "tcp://x:8786"}
    c = containers(make_cluster_spec(SETTINGS, env))
    assert env_of(c["worker"])["DASK_SCHEDULER_ADDRESS"].startswith("tls://")
    for container in c.values():
        assert env_of(container)["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"


def test_operator_keeps_our_tls_scheduler_address(spec) -> None:
    """The operator's own worker Deployment builder, fed our worker pod spec."""
    controller = pytest.importorskip("dask_kubernetes.operator.controller.controller")
    worker = spec["spec"]["worker"]
    deployment = controller.build_worker_deployment_spec(
        "fruits-run-default", "fruitdask", "fruits-run", "abc12", worker["spec"], {}, worker["metadata"]["labels"]
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    addresses = [e["value"] for e in container["env"] if e["name"] == "DASK_SCHEDULER_ADDRESS"]
    assert addresses == ["tls://fruits-run-scheduler.fruitdask.svc.cluster.local:8786"]


def test_tls_env_names_are_the_ones_dask_reads() -> None:
    """The variables, read back through Dask's own env parsing, fill a Security object."""
    from distributed.security import Security

    config = dask.config.update(copy.deepcopy(dask.config.config), dask.config.collect_env(tls_env()))
    with dask.config.set(config):
        sec = Security()
    assert sec.require_encryption is True
    assert sec.tls_ca_file == "/etc/dask/tls/ca.crt"
    for role in ("client", "scheduler", "worker"):
        assert getattr(sec, f"tls_{role}_cert") == "/etc/dask/tls/tls.crt"
        assert getattr(sec, f"tls_{role}_key") == "/etc/dask/tls/tls.key"


def test_no_tls_secret_is_refused() -> None:
    with pytest.raises(ClusterError, match="--kube-tls-secret"):
        make_cluster_spec(replace(SETTINGS, tls_secret=""), {})


def _write_certificates(folder: Path) -> dict[str, str]:
    """A CA and one certificate signed by it (client and server use), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("fruitdask-test-ca", ca_key, "fruitdask-test-ca", ca_key, True)
    leaf = cert("fruits-run-scheduler", key, "fruitdask-test-ca", ca_key, False)
    paths = {"ca": folder / "ca.crt", "cert": folder / "tls.crt", "key": folder / "tls.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return {k: str(v) for k, v in paths.items()}


def _tls_config(files: dict[str, str], roles=("client", "scheduler", "worker")) -> dict[str, Any]:
    config: dict[str, Any] = {"distributed.comm.require-encryption": True, "distributed.comm.tls.ca-file": files["ca"]}
    for role in roles:
        config[f"distributed.comm.tls.{role}.cert"] = files["cert"]
        config[f"distributed.comm.tls.{role}.key"] = files["key"]
    return config


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict[str, str]:
    return _write_certificates(tmp_path_factory.mktemp("tls"))


def test_client_security_connects_to_a_tls_scheduler(tls_files, local_cluster) -> None:
    """A real TLS scheduler: the client's Security from Dask config gets in; a plain-TCP
    client does not."""
    from distributed import Client
    from distributed.security import Security

    with dask.config.set(_tls_config(tls_files)):
        server, client_sec = Security(), client_security()
    cluster, _ = local_cluster(1, 1, processes=False, client=False, protocol="tls://", security=server)
    assert cluster.scheduler_address.startswith("tls://")
    with Client(cluster.scheduler_address, security=client_sec, timeout="10s") as client:
        assert client.submit(sum, [1, 2]).result(timeout=10) == 3
    with pytest.raises((OSError, TimeoutError)):
        Client(cluster.scheduler_address.replace("tls://", "tcp://"), timeout="3s")


def test_dask_client_connects_with_the_kube_connection(monkeypatch, tls_files, local_cluster) -> None:
    """``--cluster kubernetes`` end to end from cluster.py: the address and Security that
    open_kube_cluster yields reach the Client (a TLS LocalCluster stands in for the pods)."""
    from contextlib import contextmanager

    from distributed.security import Security

    import fruitdask.backends.dask.kube_connect
    from fruitdask.backends.dask.cluster import dask_client
    from fruitdask.config import RunConfig

    with dask.config.set(_tls_config(tls_files)):
        server, client_sec = Security(), client_security()
    cluster, _ = local_cluster(1, 1, processes=False, client=False, protocol="tls://", security=server)

    @contextmanager
    def fake_open(settings, env):
        assert settings == SETTINGS
        yield KubeConnection(cluster.scheduler_address, client_sec, None)

    monkeypatch.setattr(fruitdask.backends.dask.kube_connect, "open_kube_cluster", fake_open)
    cfg = RunConfig(input="in", output="out", cluster="kubernetes", kube=SETTINGS, cluster_timeout=10)
    with dask_client(cfg) as client:
        assert client.scheduler.address == cluster.scheduler_address
        assert client.submit(sum, [2, 3]).result(timeout=10) == 5


def test_client_without_certificates_is_refused(tls_files) -> None:
    config = _tls_config(tls_files, roles=())
    with dask.config.set({**config, "distributed.comm.tls.ca-file": None}):
        with pytest.raises(ClusterError, match="DASK_DISTRIBUTED__COMM__TLS__CA_FILE"):
            client_security()
    with dask.config.set(config):
        with pytest.raises(ClusterError, match="DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT"):
            client_security()


# -- NetworkPolicy -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def policies() -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in make_network_policies(SETTINGS)}


def _ports(rule: dict[str, Any]) -> set[tuple[int, str]]:
    return {(p["port"], p["protocol"]) for p in rule["ports"]}


def test_network_policies_are_valid_with_numeric_ports(policies) -> None:
    assert set(policies) == {"fruits-run-scheduler", "fruits-run-worker"}
    for policy in policies.values():
        kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
        assert policy["metadata"]["namespace"] == "fruitdask"
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        for direction in ("ingress", "egress"):
            for rule in policy["spec"][direction]:
                assert all(type(p["port"]) is int for p in rule["ports"]), rule


def test_network_policies_select_the_operators_pods(spec, policies) -> None:
    """The podSelectors match the labels the operator's controller puts on its pods."""
    controller = pytest.importorskip("dask_kubernetes.operator.controller.controller")
    sched = controller.build_scheduler_deployment_spec(
        "fruits-run", spec["spec"]["scheduler"]["spec"], {}, spec["spec"]["scheduler"]["metadata"]["labels"]
    )
    worker = controller.build_worker_deployment_spec(
        "fruits-run-default", "fruitdask", "fruits-run", "abc12", spec["spec"]["worker"]["spec"], {},
        spec["spec"]["worker"]["metadata"]["labels"],
    )
    for policy, deployment in ((policies["fruits-run-scheduler"], sched), (policies["fruits-run-worker"], worker)):
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    other = worker["spec"]["template"]["metadata"]["labels"] | {"dask.org/cluster-name": "someone-else"}
    assert not policies["fruits-run-worker"]["spec"]["podSelector"]["matchLabels"].items() <= other.items()


def test_network_policy_rules(policies) -> None:
    cluster = {"dask.org/cluster-name": "fruits-run"}
    scheduler = {"podSelector": {"matchLabels": {**cluster, "dask.org/component": "scheduler"}}}
    workers = {"podSelector": {"matchLabels": {**cluster, "dask.org/component": "worker"}}}
    clients = {"podSelector": {"matchLabels": {"fruitdask.io/client": "true", "app.kubernetes.io/instance": "fruits-run"}}}
    dns = {(53, "UDP"), (53, "TCP")}
    sp, wp = policies["fruits-run-scheduler"]["spec"], policies["fruits-run-worker"]["spec"]
    (ingress,) = sp["ingress"]
    assert ingress["from"] == [workers, clients] and _ports(ingress) == {(8786, "TCP")}
    (ingress,) = wp["ingress"]
    assert ingress["from"] == [scheduler, workers, clients] and _ports(ingress) == {(9000, "TCP"), (9001, "TCP")}
    # Egress: the scheduler reaches DNS and its workers only; it has no S3 role and no HTTPS.
    assert [_ports(r) for r in sp["egress"]] == [dns, {(9000, "TCP"), (9001, "TCP")}]
    assert sp["egress"][1]["to"] == [workers]
    assert sp["egress"][0]["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    egress = {frozenset(_ports(r)): r["to"] for r in wp["egress"]}
    assert egress[frozenset(dns)][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}
    assert egress[frozenset({(443, "TCP")})] == [{"ipBlock": {"cidr": "0.0.0.0/0"}}]
    assert egress[frozenset({(8786, "TCP")})] == [scheduler]
    assert egress[frozenset({(9000, "TCP")})] == [workers]
    # The workers listen where the policy opens.
    args = make_cluster_spec(SETTINGS, {})["spec"]["worker"]["spec"]["containers"][0]["args"]
    assert args[args.index("--worker-port") + 1] == "9000" and args[args.index("--nanny-port") + 1] == "9001"


def test_cluster_resources_policies_before_pods() -> None:
    objects = cluster_resources(SETTINGS, ENV)
    assert [o["kind"] for o in objects] == ["ServiceAccount", "NetworkPolicy", "NetworkPolicy", "DaskCluster"]
    assert objects[-1] == make_cluster_spec(SETTINGS, ENV)


# -- a cluster owned by the run's pod (the chart's daily CronJob) ------------------------

OWNER = {"owner_pod_name": "fruits-fruitdask-daily-29412345-x7k2p", "owner_pod_uid": "0f6c5a3e-7d1b-4c2a-9e8f-123456789abc"}


def test_owned_cluster_names_its_pod_in_every_object() -> None:
    """Every object created for the cluster is owned by the run's pod, so Kubernetes' garbage
    collector deletes them (and the operator's pods, owned by the DaskCluster) when the pod
    goes, whether or not the run's ``finally:`` ran. Fails before the owner settings existed."""
    objects = cluster_resources(replace(SETTINGS, **OWNER), ENV)
    assert [o["kind"] for o in objects] == ["ServiceAccount", "NetworkPolicy", "NetworkPolicy", "DaskCluster"]
    expected = [{"apiVersion": "v1", "kind": "Pod", "name": OWNER["owner_pod_name"], "uid": OWNER["owner_pod_uid"]}]
    for obj in objects:
        assert obj["metadata"]["ownerReferences"] == expected, obj["kind"]
        assert obj["metadata"]["namespace"] == SETTINGS.namespace  # an owner lives in its objects' namespace
        if obj["kind"] == "DaskCluster":
            jsonschema.validate(obj, dask_cluster_schema())
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    # Apart from the owner, the objects are those of an unowned cluster.
    for owned, plain in zip(objects, cluster_resources(SETTINGS, ENV), strict=True):
        meta = {k: v for k, v in owned["metadata"].items() if k != "ownerReferences"}
        assert {**owned, "metadata": meta} == plain
        assert "ownerReferences" not in plain["metadata"]


def test_owner_references_satisfy_the_api_servers_rules() -> None:
    """What the API server and the garbage collector require of an owner reference: the four
    fields, and no blockOwnerDeletion (it would need update rights on the pod's finalizers)."""
    from fruitdask.backends.dask.kube import owner_references

    (ref,) = owner_references(replace(SETTINGS, **OWNER))
    assert set(ref) == {"apiVersion", "kind", "name", "uid"}
    assert not ref.get("blockOwnerDeletion") and not ref.get("controller")
    assert owner_references(SETTINGS) == []


@pytest.mark.parametrize("half", [{"owner_pod_name": "run-pod"}, {"owner_pod_uid": "0f6c5a3e-7d1b-4c2a-9e8f-123456789abc"}])
def test_owner_needs_both_name_and_uid(half: dict[str, str]) -> None:
    with pytest.raises(ClusterError, match="FRUITDASK_KUBE_OWNER_POD_NAME and FRUITDASK_KUBE_OWNER_POD_UID"):
        cluster_resources(replace(SETTINGS, **half), {})


def test_owner_and_client_instance_come_from_the_environment() -> None:
    """The chart's daily pod sets these from the downward API; build_config carries them."""
    from fruitdask.config import build_config

    env = {
        "FRUITDASK_KUBE_OWNER_POD_NAME": OWNER["owner_pod_name"],
        "FRUITDASK_KUBE_OWNER_POD_UID": OWNER["owner_pod_uid"],
        "FRUITDASK_KUBE_CLIENT_INSTANCE": "fruits",
        "FRUITDASK_KUBE_NAME": "fd-0f6c5a3e-7d1b-4c2a-9e8f-123456789abc",
    }
    kube = build_config({"input": "in", "output": "out"}, env).kube
    objects = cluster_resources(kube, {})
    assert objects[-1]["metadata"]["ownerReferences"][0]["uid"] == OWNER["owner_pod_uid"]
    assert objects[-1]["metadata"]["name"] == "fd-0f6c5a3e-7d1b-4c2a-9e8f-123456789abc"
    # The cluster's name is per pod; its clients are the release's pods (the daily pod).
    for policy in make_network_policies(kube):
        clients = policy["spec"]["ingress"][0]["from"][-1]["podSelector"]["matchLabels"]
        assert clients == {"fruitdask.io/client": "true", "app.kubernetes.io/instance": "fruits"}
    assert build_config({"input": "in", "output": "out"}, {}).kube.owner_pod_uid is None


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
        "import sys; from fruitdask.config import KubeSettings; from fruitdask.backends.dask.kube_connect import cluster_resources;"
        "cluster_resources(KubeSettings(), {});"
        "assert not {'dask_kubernetes', 'kr8s'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


# -- open_kube_cluster -----------------------------------------------------------------


class FakeApi:
    """Records the Kubernetes calls; the scheduler answers like dask-kubernetes (tcp://)."""

    def __init__(self, fail_on: str | None = None, ready: bool = True):
        self.calls: list[tuple[str, str, str]] = []
        self.fail_on, self.ready = fail_on, ready

    def create(self, obj):
        if obj["kind"] == self.fail_on:
            raise RuntimeError(f"admission webhook denied {obj['kind']}")
        self.calls.append(("create", obj["kind"], obj["metadata"]["name"]))

    def delete(self, obj):
        self.calls.append(("delete", obj["kind"], obj["metadata"]["name"]))

    def scheduler_endpoints(self, name, namespace, timeout):
        self.calls.append(("wait", "scheduler", name))
        if not self.ready:
            raise TimeoutError("scheduler never became ready")
        return "tcp://localhost:51234", "http://localhost:51235/status"


@pytest.fixture
def client_tls(tls_files):
    with dask.config.set(_tls_config(tls_files)):
        yield


CREATED = [
    ("create", "ServiceAccount", "fruits-run-scheduler"),
    ("create", "NetworkPolicy", "fruits-run-scheduler"),
    ("create", "NetworkPolicy", "fruits-run-worker"),
    ("create", "DaskCluster", "fruits-run"),
]
DELETED = [("delete", kind, name) for _, kind, name in reversed(CREATED)]


def test_open_creates_policies_first_and_deletes_everything(client_tls) -> None:
    api = FakeApi()
    with open_kube_cluster(SETTINGS, ENV, api=api) as conn:
        assert isinstance(conn, KubeConnection)
        assert conn.scheduler_address == "tls://localhost:51234"
        assert conn.security.require_encryption and conn.security.tls_client_cert
        assert conn.dashboard_link == "http://localhost:51235/status"
        assert api.calls == [*CREATED, ("wait", "scheduler", "fruits-run")]
    assert api.calls[len(CREATED) + 1:] == DELETED


def test_open_connects_to_existing_without_creating_or_deleting(client_tls) -> None:
    api = FakeApi()
    with open_kube_cluster(replace(SETTINGS, connect_existing=True), ENV, api=api) as conn:
        assert conn.scheduler_address.startswith("tls://")
    assert api.calls == [("wait", "scheduler", "fruits-run")]


def test_open_deletes_on_error(client_tls) -> None:
    api = FakeApi()
    with pytest.raises(RuntimeError, match="pipeline failed"):
        with open_kube_cluster(SETTINGS, ENV, api=api):
            raise RuntimeError("pipeline failed")
    assert api.calls[-len(DELETED):] == DELETED


def test_open_failing_midway_deletes_what_it_created(client_tls) -> None:
    api = FakeApi(fail_on="DaskCluster")
    with pytest.raises(ClusterError, match="admission webhook denied DaskCluster"):
        with open_kube_cluster(SETTINGS, ENV, api=api):
            pass
    assert api.calls == [*CREATED[:3], *DELETED[1:]]
    api = FakeApi(ready=False)
    with pytest.raises(ClusterError, match="never became ready"):
        with open_kube_cluster(SETTINGS, ENV, api=api):
            pass
    assert api.calls[-len(DELETED):] == DELETED


def test_open_without_client_certificates_creates_nothing(tls_files) -> None:
    api = FakeApi()
    with dask.config.set(_tls_config(tls_files, roles=())):
        with pytest.raises(ClusterError, match="CLIENT__CERT"):
            with open_kube_cluster(SETTINGS, ENV, api=api):
                pass
    assert api.calls == []


def test_missing_dask_kubernetes_says_how_to_fix(monkeypatch, client_tls) -> None:
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    with pytest.raises(ClusterError, match="pip install dask-kubernetes"):
        with open_kube_cluster(SETTINGS, ENV):
            pass


def test_unreachable_cluster_api_is_a_cluster_error(monkeypatch, tmp_path, client_tls) -> None:
    """The real kr8s calls with no kubeconfig and no in-cluster credentials."""
    import dask_kubernetes.operator  # noqa: F401 - a [dev] dependency: missing, the test fails loudly
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ClusterError, match="KUBECONFIG"):
        with open_kube_cluster(SETTINGS, ENV):
            pass
