"""Make the Dask TLS Secret of one Helm release: the chart's pre-install/pre-upgrade hook.

A CA dedicated to this release signs one certificate (client and server use) that the
scheduler, the workers and the release's clients present to each other. Dask checks only
that a peer's certificate chains to ``ca.crt``, never the host name, so the CA must trust
nothing but this release: it is made here, fresh, and its private key is thrown away as
soon as the certificate is signed (nobody can issue another certificate it trusts).

An existing Secret is kept (upgrades do not rotate; delete the Secret and upgrade to
rotate, then restart the pods). Run with the release's namespace, Secret name, release
name, validity in days and the scheduler's Service name as arguments.
"""

from __future__ import annotations

import base64
import datetime
import sys
import uuid


def make_material(release: str, days: int, dns_names: list[str]) -> dict[str, bytes]:
    """``ca.crt``, ``tls.crt`` and ``tls.key`` (PEM) for ``release``; the CA key is not kept."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fruitdask {release} Dask CA {uuid.uuid4().hex[:8]}")])
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5), "not_valid_after": now + datetime.timedelta(days=days)}
    ca = (
        x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, public_key=ca_key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder(subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{release} dask")]),
                                issuer_name=ca_name, public_key=key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "tls.crt": leaf.public_bytes(serialization.Encoding.PEM),
        "tls.key": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()),
    }


def main(argv: list[str]) -> int:
    namespace, name, release, days, service = argv[0], argv[1], argv[2], int(argv[3]), argv[4]
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    config.load_incluster_config()
    api = client.CoreV1Api()
    try:
        api.read_namespaced_secret(name, namespace)
        print(f"Secret {namespace}/{name} exists: kept (delete it and upgrade to rotate the certificates)")
        return 0
    except ApiException as e:
        if e.status != 404:
            raise
    dns = [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]
    data = {k: base64.b64encode(v).decode() for k, v in make_material(release, days, dns).items()}
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=name, namespace=namespace,
                                     labels={"app.kubernetes.io/instance": release, "app.kubernetes.io/part-of": "fruitdask"}),
        type="kubernetes.io/tls", data=data,
    )
    try:
        api.create_namespaced_secret(namespace, body)
    except ApiException as e:
        if e.status != 409:  # made meanwhile by another hook run: that one is kept
            raise
    print(f"Secret {namespace}/{name} created: a CA dedicated to release {release}, valid {days} days")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
