"""Offline checks of k8s/ (eksctl, namespace, IAM, Karpenter) and the Dockerfile."""

from __future__ import annotations

import json
import re
import shlex

import dockerfile_parse
import jsonschema
import pytest
import yaml
from k8s_validation import K8S, REPO, custom_schema, load_documents, validate_object

from fruitdask.config import EU_REGIONS, TF_ENV

ZONES = {"eu-west-1a", "eu-west-1b", "eu-west-1c"}


@pytest.fixture(scope="module")
def eksctl() -> dict:
    return yaml.safe_load((K8S / "eksctl-cluster.yaml").read_text())


def test_eksctl_cluster_in_eu_west_1(eksctl) -> None:
    assert eksctl["apiVersion"] == "eksctl.io/v1alpha5"
    assert eksctl["kind"] == "ClusterConfig"
    assert eksctl["metadata"]["region"] == "eu-west-1"
    assert set(eksctl["availabilityZones"]) <= ZONES
    assert eksctl["secretsEncryption"]["keyARN"].startswith("arn:aws:kms:eu-west-1:")


def test_eksctl_oidc_and_irsa_service_account(eksctl) -> None:
    assert eksctl["iam"]["withOIDC"] is True
    sa, serve = eksctl["iam"]["serviceAccounts"]
    # The chart (release "fruits") creates these ServiceAccounts; eksctl only makes the roles.
    assert sa["metadata"] == {"name": "fruits-fruitdask", "namespace": "fruitdask",
                              "labels": {"app.kubernetes.io/part-of": "fruitdask"}}
    assert sa["roleOnly"] is True
    assert [a.rsplit("/", 1)[1] for a in sa["attachPolicyARNs"]] == ["fruitdask-s3-eu"]
    # The serve pods' own role: read the model, not the workers' write access (#23 item 5).
    assert serve["metadata"]["name"] == "fruits-fruitdask-serve" and serve["roleOnly"] is True
    assert [a.rsplit("/", 1)[1] for a in serve["attachPolicyARNs"]] == ["fruitdask-serve-read-model"]


def test_serve_policy_only_reads_the_model_and_weights() -> None:
    policy = json.loads((K8S / "iam-policy-serve.json").read_text())
    (allow,) = [s for s in policy["Statement"] if s["Effect"] == "Allow"]
    assert allow["Action"] == ["s3:GetObject"]
    assert allow["Resource"] == ["arn:aws:s3:::fruits-eu-west-1/models/*", "arn:aws:s3:::fruits-eu-west-1/weights/*"]
    (deny,) = [s for s in policy["Statement"] if s["Effect"] == "Deny"]
    assert sorted(deny["Condition"]["StringNotEquals"]["aws:RequestedRegion"]) == sorted(EU_REGIONS)


def test_eksctl_node_groups(eksctl) -> None:
    groups = {g["name"]: g for g in eksctl["managedNodeGroups"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert g["privateNetworking"] is True
        assert g["volumeEncrypted"] is True
        assert g["disableIMDSv1"] is True
        assert g["disablePodIMDS"] is True
        assert "ssh" not in g  # no SSH access to nodes
    gpu = groups["gpu"]
    assert gpu["minSize"] == 0
    assert {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"} in gpu["taints"]
    assert gpu["labels"]["fruitdask.io/node-type"] == "gpu"
    assert groups["cpu"]["minSize"] >= 1


def test_eksctl_vpc_cni_enforces_network_policies(eksctl) -> None:
    addons = {a["name"]: a for a in eksctl["addons"]}
    config = json.loads(addons["vpc-cni"]["configurationValues"])
    assert config["enableNetworkPolicy"] == "true"
    assert eksctl["vpc"]["clusterEndpoints"]["privateAccess"] is True


def test_namespace_enforces_restricted_pod_security() -> None:
    (ns,) = load_documents((K8S / "namespace.yaml").read_text())
    validate_object(ns)
    labels = ns["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    assert ns["metadata"]["name"] == yaml.safe_load((K8S / "eksctl-cluster.yaml").read_text())[
        "iam"]["serviceAccounts"][0]["metadata"]["namespace"]


def test_iam_policy_is_bucket_scoped_with_region_deny() -> None:
    policy = json.loads((K8S / "iam-policy-s3.json").read_text())
    assert policy["Version"] == "2012-10-17"
    allows = [s for s in policy["Statement"] if s["Effect"] == "Allow"]
    denies = [s for s in policy["Statement"] if s["Effect"] == "Deny"]
    for s in allows:
        actions = s["Action"] if isinstance(s["Action"], list) else [s["Action"]]
        assert all(a.startswith("s3:") and "*" not in a for a in actions), s
        resources = s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
        assert all(re.fullmatch(r"arn:aws:s3:::fruits-eu-west-1(/.*)?", r) for r in resources), s
    (deny,) = denies
    assert deny["Action"] == "*" and deny["Resource"] == "*"
    assert sorted(deny["Condition"]["StringNotEquals"]["aws:RequestedRegion"]) == sorted(EU_REGIONS)


def test_karpenter_manifests_valid_and_in_eu_west_1_zones() -> None:
    docs = load_documents((K8S / "karpenter-nodepools.yaml").read_text())
    assert {d["kind"] for d in docs} == {"EC2NodeClass", "NodePool"}
    for d in docs:
        validate_object(d)
    for pool in (d for d in docs if d["kind"] == "NodePool"):
        reqs = {r["key"]: r for r in pool["spec"]["template"]["spec"]["requirements"]}
        assert set(reqs["topology.kubernetes.io/zone"]["values"]) <= ZONES
        assert reqs["topology.kubernetes.io/zone"]["operator"] == "In"
    (gpu,) = [d for d in docs if d["metadata"]["name"].endswith("gpu")]
    assert gpu["spec"]["template"]["spec"]["taints"][0]["key"] == "nvidia.com/gpu"
    (node_class,) = [d for d in docs if d["kind"] == "EC2NodeClass"]
    assert node_class["spec"]["metadataOptions"]["httpTokens"] == "required"
    assert node_class["spec"]["metadataOptions"]["httpPutResponseHopLimit"] == 1


def test_vendored_crd_schemas_are_strict() -> None:
    """The custom resource validation really rejects typos and bad values."""
    (pool,) = [d for d in load_documents((K8S / "karpenter-nodepools.yaml").read_text())
               if d["metadata"]["name"] == "fruitdask-cpu"]
    schema = custom_schema("karpenter.sh/v1", "NodePool")
    jsonschema.validate(pool, schema)
    typo = json.loads(json.dumps(pool))
    typo["spec"]["template"]["spec"]["requirement"] = []
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)
    bad_op = json.loads(json.dumps(pool))
    bad_op["spec"]["template"]["spec"]["requirements"][0]["operator"] = "Within"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_op, schema)
    with pytest.raises(AssertionError, match="no schema"):
        custom_schema("example.com/v1", "Widget")


def test_core_validation_is_strict() -> None:
    import kubernetes_validate

    (ns,) = load_documents((K8S / "namespace.yaml").read_text())
    ns["metadata"]["lables"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(ns)


# -- Dockerfile (static; tests/test_containers.py builds and runs it) -------------------


@pytest.fixture(scope="module")
def dockerfile():
    parser = dockerfile_parse.DockerfileParser(path=str(REPO / "Dockerfile"))
    return parser


def _stages(parser) -> dict[str, list[dict]]:
    stages: dict[str, list[dict]] = {}
    current = None
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            current = ins["value"].split()[-1]
            stages[current] = [ins]
        elif current is not None:
            stages[current].append(ins)
    return stages


def test_dockerfile_builds_with_the_legacy_builder(dockerfile) -> None:
    # A `# syntax=` line makes BuildKit pull a frontend image from a registry; the legacy
    # builder builds every stage it reads, so the GPU variant is a build argument, not a
    # second target that every CPU build would pay for.
    assert not dockerfile.content.lstrip().startswith("# syntax"), "no # syntax= line"
    stages = _stages(dockerfile)
    assert list(stages) == ["build", "runtime"]
    arg = re.search(r"ARG PYTHON_IMAGE=(\S+)", dockerfile.content).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", arg), arg  # a pinned base, not latest
    assert re.search(r"^ARG VARIANT=cpu$", dockerfile.content, re.M)
    assert "--mount" not in dockerfile.content  # BuildKit-only


def test_dockerfile_installs_only_the_lock_with_hashes(dockerfile) -> None:
    stages = _stages(dockerfile)
    installs = [i["value"] for i in stages["build"] if i["instruction"] == "RUN" and "pip install" in i["value"]]
    assert any('--require-hashes -r "requirements/${VARIANT}.txt"' in r and "--no-deps" in r for r in installs), installs
    # The project itself, in a small layer of the final stage: no dependency resolution,
    # no build isolation, then pip check.
    (project,) = [i["value"] for i in stages["runtime"] if i["instruction"] == "RUN" and "pip install" in i["value"]]
    assert "install --no-deps --no-build-isolation" in project and "pip check" in project
    for variant in ("cpu", "gpu"):
        assert (REPO / "requirements" / f"{variant}.txt").exists()


def test_dockerfile_runs_as_numeric_non_root_user(dockerfile) -> None:
    users = [i["value"] for i in _stages(dockerfile)["runtime"] if i["instruction"] == "USER"]
    assert users == ["10001:10001"]
    with (REPO / "helm/fruitdask/values.yaml").open() as f:
        assert yaml.safe_load(f)["podSecurity"]["runAsUser"] == 10001


def test_dockerfile_keeps_build_settings_out_of_the_final_image(dockerfile) -> None:
    runtime = _stages(dockerfile)["runtime"]
    # Build arguments of the build stage never reach the runtime stage's history.
    assert not [i for i in runtime if i["instruction"] == "ARG"]
    (fetch,) = [i["value"] for i in _stages(dockerfile)["build"] if "pip_settings.py fetch" in i["value"]]
    assert "rm -rf /tmp/pip-settings" in fetch  # used and deleted in the same layer


def test_dockerfile_installs_nothing_at_start(dockerfile) -> None:
    final = [i for i in dockerfile.structure if i["instruction"] in ("CMD", "ENTRYPOINT")]
    for ins in final:
        assert "pip" not in ins["value"] and "apt" not in ins["value"]
        assert "dask-scheduler" not in ins["value"] and "dask-worker" not in ins["value"]
    env = dict(
        word.split("=", 1)
        for ins in _stages(dockerfile)["runtime"]
        if ins["instruction"] == "ENV"
        for word in shlex.split(ins["value"])
    )
    for k, v in TF_ENV.items():
        assert env[k] == v


def test_dockerignore_keeps_secrets_and_venv_out() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    assert lines[lines.index("**")] == "**"  # deny by default
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "requirements/", "tools/pip_settings.py", "fruitdask/"}
