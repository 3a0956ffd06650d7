"""The S3 of the tests: moto's server on 127.0.0.1, as s3fs's own suite runs it.

One server per session (:func:`s3_server`); :func:`s3` resets it before and after each
test through moto's reset API, clears s3fs' instance cache, and points the AWS credential
chain at dummy keys only (no profile files, no instance metadata), so no test can reach
a real account. Worker processes started by a test inherit that environment, exactly as
pods inherit their IRSA variables.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TEST_KEY = "AKIAFRUITDASKTEST0001"
TEST_SECRET = "fruitdask-test-secret-do-not-ship-3f9c"  # a marker to grep outputs and logs for


def _post(url: str, body: bytes = b"") -> None:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server on a free loopback port, stopped at the end."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO through the root logger, which the CLI points at
    # stderr: the tests check that an error is one line on stderr.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass
class S3:
    """Helpers over the test server: buckets in given regions, uploads, IAM users."""

    endpoint: str

    @property
    def storage_options(self) -> dict:
        return {"client_kwargs": {"endpoint_url": self.endpoint}}

    _clients: dict = field(default_factory=dict, repr=False)

    @property
    def fs(self):
        """The test's own s3fs client (not cached by s3fs, no listings cache): the view of
        another process, such as a worker."""
        if "fs" not in self._clients:
            import s3fs

            self._clients["fs"] = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.storage_options)
        return self._clients["fs"]

    def client(self, service: str = "s3"):
        if service not in self._clients:
            import boto3

            self._clients[service] = boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1")
        return self._clients[service]

    def bucket(self, name: str, region: str) -> str:
        """Create ``name`` in ``region`` (``EU`` makes an old-style eu-west-1 bucket)."""
        if region == "us-east-1":
            self.client().create_bucket(Bucket=name)
        else:
            self.client().create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})
        return f"s3://{name}"

    def upload(self, local: Path, url: str) -> str:
        """Upload a local folder or file to ``url``; return ``url``."""
        fs = self.fs
        local = Path(local)
        if local.is_dir():
            for f in sorted(p for p in local.rglob("*") if p.is_file()):
                fs.put_file(str(f), f"{url.removeprefix('s3://')}/{f.relative_to(local).as_posix()}")
        else:
            fs.put_file(str(local), url.removeprefix("s3://"))
        return url

    def objects(self) -> list[str]:
        """Every object of every bucket, as ``bucket/key``."""
        out = []
        s3 = self.client()
        for b in s3.list_buckets()["Buckets"]:
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=b["Name"])
            out += [f"{b['Name']}/{o['Key']}" for page in pages for o in page.get("Contents", [])]
        return sorted(out)

    def read(self, key: str) -> bytes:
        bucket, _, k = key.partition("/")
        return self.client().get_object(Bucket=bucket, Key=k)["Body"].read()

    def iam_user(self, name: str, statements: list[dict]) -> tuple[str, str]:
        """An IAM user with an inline policy; returns its ``(access key, secret)``."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        doc = {"Version": "2012-10-17", "Statement": statements}
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(doc))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def enforce_iam(self, on: bool = True) -> None:
        """Make the server check signatures and IAM policies (off again at reset)."""
        _post(f"{self.endpoint}/moto-api/reset-auth", b"0" if on else b"inf")

    def reset(self) -> None:
        import s3fs

        self.enforce_iam(False)
        _post(f"{self.endpoint}/moto-api/reset")
        s3fs.S3FileSystem.clear_instance_cache()


def isolate_aws_env(monkeypatch, key: str | None = TEST_KEY, secret: str | None = TEST_SECRET) -> None:
    """Leave only the given credentials to the AWS chain in this process and its children."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "FRUITDASK_STORAGE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    if key:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3:
    """A clean S3 for one test, dummy credentials in the environment."""
    isolate_aws_env(monkeypatch)
    server = S3(s3_server)
    server.reset()
    try:
        yield server
    finally:
        server.reset()
