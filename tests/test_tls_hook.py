"""Issue 23, item 12: the chart's TLS hook (``helm/fruitdask/files/make_dask_tls.py``).

Its certificates against a real TLS Dask cluster: a client with the release's certificate
gets in; a client with a certificate of another release's CA (same host names) is refused,
because the CA trusts nothing but its own release. Its Kubernetes side against a stand-in
API: an existing Secret is kept, a missing one is created once, as ``kubernetes.io/tls``.
"""

from __future__ import annotations

import base64
import datetime
import importlib.util
import types
from pathlib import Path

import pytest
from k8s_validation import CHART

SCRIPT = CHART / "files" / "make_dask_tls.py"
SERVICE = "fruits-fruitdask-scheduler"


def _hook() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("make_dask_tls", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _security(material: dict[str, bytes], folder: Path):
    from distributed.security import Security

    folder.mkdir()
    for name, data in material.items():
        (folder / name).write_bytes(data)
    files = {"tls_ca_file": str(folder / "ca.crt")}
    for role in ("client", "scheduler", "worker"):
        files[f"tls_{role}_cert"], files[f"tls_{role}_key"] = str(folder / "tls.crt"), str(folder / "tls.key")
    return Security(require_encryption=True, **files)


def test_the_release_ca_signs_one_certificate_and_keeps_no_key() -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    material = _hook().make_material("fruits", 30, [SERVICE])
    assert sorted(material) == ["ca.crt", "tls.crt", "tls.key"]  # the CA's key is not kept
    ca, leaf = x509.load_pem_x509_certificate(material["ca.crt"]), x509.load_pem_x509_certificate(material["tls.crt"])
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert leaf.issuer == ca.subject and "fruits" in ca.subject.rfc4514_string()
    leaf.verify_directly_issued_by(ca)
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [SERVICE]
    days = (leaf.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).days
    assert 29 <= days <= 30
    # Two releases never share a CA, even with the same release name.
    assert x509.load_pem_x509_certificate(_hook().make_material("fruits", 30, [SERVICE])["ca.crt"]).subject != ca.subject


def test_dask_admits_the_release_s_certificate_and_refuses_another_ca_s(tmp_path, local_cluster) -> None:
    from distributed import Client

    hook = _hook()
    ours = _security(hook.make_material("fruits", 1, [SERVICE]), tmp_path / "ours")
    # Same host names, another CA: Dask does not check host names, only the chain.
    theirs = _security(hook.make_material("fruits", 1, [SERVICE]), tmp_path / "theirs")
    cluster, _ = local_cluster(1, 1, processes=False, client=False, protocol="tls://", security=ours)
    with Client(cluster.scheduler_address, security=ours, timeout="10s") as client:
        assert client.submit(sum, [1, 2]).result(timeout=10) == 3
    with pytest.raises((OSError, TimeoutError)):
        Client(cluster.scheduler_address, security=theirs, timeout="3s")


class _Api:
    """A stand-in for ``CoreV1Api``: the Secrets of one namespace."""

    def __init__(self, existing: dict | None = None) -> None:
        self.secrets = dict(existing or {})
        self.created: list = []

    def read_namespaced_secret(self, name, namespace):
        from kubernetes.client.rest import ApiException

        if (namespace, name) not in self.secrets:
            raise ApiException(status=404)
        return self.secrets[(namespace, name)]

    def create_namespaced_secret(self, namespace, body):
        self.created.append(body)
        self.secrets[(namespace, body.metadata.name)] = body


def test_the_hook_creates_the_secret_once_and_keeps_an_existing_one(monkeypatch, capsys) -> None:
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    hook = _hook()
    api = _Api()
    monkeypatch.setattr(config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(client, "CoreV1Api", lambda: api)
    args = ["fruitdask", "fruits-fruitdask-dask-tls", "fruits", "365", SERVICE]
    assert hook.main(args) == 0
    (secret,) = api.created
    assert secret.type == "kubernetes.io/tls" and secret.metadata.name == "fruits-fruitdask-dask-tls"
    assert sorted(secret.data) == ["ca.crt", "tls.crt", "tls.key"]
    assert base64.b64decode(secret.data["tls.key"]).startswith(b"-----BEGIN PRIVATE KEY-----")
    assert hook.main(args) == 0 and len(api.created) == 1  # an upgrade keeps it
    assert "exists: kept" in capsys.readouterr().out

    def forbidden(name, namespace):
        raise ApiException(status=403)

    monkeypatch.setattr(api, "read_namespaced_secret", forbidden)
    with pytest.raises(ApiException):  # the hook fails, and so does the install
        hook.main(args)
