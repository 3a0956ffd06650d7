"""``fruitdask run`` on S3 end to end, through the CLI, against moto's S3 server.

Buckets live in eu-west-1 (input, weights), eu-west-3 (output), eu-west-2 and us-east-1
(refused). Full runs start a real ``LocalCluster`` of worker processes; with IAM checks
switched on in the server, a worker that did not get the storage options (endpoint,
profile) could not read a single image.
"""

from __future__ import annotations

import json
import socket
from contextlib import closing

import pytest
from conftest import read_features
from s3_server import isolate_aws_env

from fruitdask import cli
from fruitdask.config import StorageSettings
from fruitdask.storage.options import storage_options

IN, OUT = "fruits-eu-input", "fruits-eu-output"
TARGET = f"s3://{OUT}/features/run-1"
ALLOW_ALL_S3 = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
N_IMAGES = 12  # tiny_images: 3 labels x 4


@pytest.fixture
def eu(s3, tiny_images):
    """Input images in eu-west-1, an empty output bucket in eu-west-3."""
    s3.bucket(IN, "eu-west-1")
    s3.bucket(OUT, "eu-west-3")
    s3.upload(tiny_images, f"s3://{IN}/Training")
    s3.fs.pipe_file(f"{IN}/models/README.txt", b"weights live here")
    return s3


def run_args(s3, *extra: str, output: str = TARGET, input: str = f"s3://{IN}/Training") -> list[str]:
    return ["run", "--input", input, "--output", output, "--image-size", "32", "--weights", "random",
            "--s3-endpoint", s3.endpoint, *extra]


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("fruitdask: error: ")
    return err[0]


# --- refusals and errors: nothing starts, nothing is written ----------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    ("where", "region"),
    [("input", "us-east-1"), ("input", "eu-west-2"), ("output", "us-east-1"), ("output", "eu-west-2"), ("weights", "us-east-1")],
)
def test_non_eu_buckets_are_refused_before_anything_is_written(eu, tiny_images, capsys, where, region):
    far = eu.bucket(f"far-{region}", region)
    eu.upload(tiny_images, f"{far}/Training")
    eu.fs.pipe_file(f"{far.removeprefix('s3://')}/models/vgg16_notop.weights.h5", b"never read: refused first")
    before = eu.objects()
    locations = {"input": f"s3://{IN}/Training", "output": TARGET, "weights": "random"}
    locations[where] = {"input": f"{far}/Training", "output": f"{far}/features/run-1",
                        "weights": f"{far}/models/vgg16_notop.weights.h5"}[where]
    code = cli.main([*run_args(eu, "--quiet", input=locations["input"], output=locations["output"]),
                     "--weights", locations["weights"]])
    line = one_error_line(capsys)
    assert code == 1
    assert f"bucket 'far-{region}'" in line and f"is in {region}" in line and "--allowed-regions" in line
    assert eu.objects() == before  # listed across every bucket: not one object written


ERROR_CASES = {
    "bucket missing": (["--input", "s3://no-such-bucket/Training"], "bucket 'no-such-bucket' does not exist"),
    "prefix with no images": (["--input", f"s3://{IN}/models"], f"no images found under 's3://{IN}/models'"),
    "prefix missing": (["--input", f"s3://{IN}/Nothing"], "does not exist"),
    "no credentials": ([], "no AWS credentials found"),
    "unknown profile": (["--aws-profile", "no-such-profile"], "no-such-profile"),
    "access denied": ([], f"access denied to 's3://{IN}'"),
    "output from before the table": ([], "from before the features table"),
    "output is a bucket root": (["--output", f"s3://{OUT}"], "bucket root"),
    "endpoint unreachable": ([], "cannot reach http://127.0.0.1:"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_each_error_is_one_line_and_a_failed_exit(eu, capsys, monkeypatch, case):
    flags, expected = ERROR_CASES[case]
    args = run_args(eu, "--quiet")
    if case == "no credentials":
        isolate_aws_env(monkeypatch, key=None)
    elif case == "access denied":
        key, secret = eu.iam_user("output-only", [{"Effect": "Allow", "Action": "s3:*", "Resource": f"arn:aws:s3:::{OUT}*"}])
        isolate_aws_env(monkeypatch, key, secret)
        eu.enforce_iam()
    elif case == "output from before the table":
        eu.fs.pipe_file(f"{TARGET.removeprefix('s3://')}/_SUCCESS", b"")
    before = eu.objects() if case != "access denied" else None
    with closing(socket.socket()) as closed_port:
        if case == "endpoint unreachable":
            closed_port.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
            monkeypatch.setenv("FRUITDASK_STORAGE_CONNECT_TIMEOUT", "1")
            args[args.index("--s3-endpoint") + 1] = f"http://127.0.0.1:{closed_port.getsockname()[1]}"
        code = cli.main([*args, *flags])
    line = one_error_line(capsys)
    assert code != 0
    assert expected in line
    eu.enforce_iam(False)
    if before is not None:
        assert eu.objects() == before


# --- full runs through worker processes -------------------------------------------------


def _profile_credentials(tmp_path, monkeypatch, key: str, secret: str) -> StorageSettings:
    """Credentials only in an AWS profile file, none in the environment."""
    creds = tmp_path / "credentials"
    creds.write_text(f"[fruitdask-eu]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
    isolate_aws_env(monkeypatch, key=None)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    return StorageSettings(profile="fruitdask-eu")


@pytest.mark.integration
@pytest.mark.slow
def test_failed_write_leaves_nothing_then_full_run_eu_west_1_to_eu_west_3(eu, weights_file, tmp_path, monkeypatch, capsys):
    """One story, two real runs on a LocalCluster of two worker processes.

    1. S3 refuses one part file to the worker that writes it (an IAM deny on that key: the
       honest way to fail a write in another process). The run fails with one line; the
       target holds nothing and the staging prefix is gone.
    2. With the policy fixed, the same command succeeds: the dataset is readable with
       pandas and pyarrow from S3, ``_SUCCESS`` is there, and no credential was written or
       logged. Credentials live only in an AWS profile file and IAM checks are on, so the
       workers could read nothing had the storage options not reached them.
    """
    from fruitdask.lake import table as delta

    eu.upload(weights_file, f"s3://{IN}/models/vgg16_notop.weights.h5")
    deny_part_1 = {"Effect": "Deny", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{OUT}/*part-*-p00001.parquet"}
    key, secret = eu.iam_user("pipeline", [ALLOW_ALL_S3, deny_part_1])
    settings = _profile_credentials(tmp_path, monkeypatch, key, secret)
    args = run_args(eu, "--cluster", "local", "--workers", "2", "--threads-per-worker", "1", "--partition-size", "3",
                    "--aws-profile", "fruitdask-eu", "--weights", f"s3://{IN}/models/vgg16_notop.weights.h5")

    eu.enforce_iam()  # from here on, every request must be signed with the pipeline's key
    code = cli.main([*args, "--quiet"])
    line = one_error_line(capsys)
    assert code == 1 and "access denied" in line and "-p00001.parquet" in line
    eu.enforce_iam(False)
    assert [o for o in eu.objects() if o.startswith(f"{OUT}/features/run-1/")] == []  # no version, no file, no _SUCCESS
    assert not any(".fruitdask-tmp-" in o for o in eu.objects())  # staging removed
    # (featurized partitions stay in .run-1.fruitdask-checkpoint/ for --resume, by design)

    eu.client("iam").put_user_policy(UserName="pipeline", PolicyName="pipeline-policy",
                                     PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [ALLOW_ALL_S3]}))
    eu.enforce_iam()
    code = cli.main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err

    options = storage_options(StorageSettings(endpoint_url=eu.endpoint, profile=settings.profile))
    df = read_features(TARGET, options, arrow=False)
    assert len(df) == N_IMAGES and df["path"].str.startswith(f"s3://{IN}/Training/").all()
    assert {len(v) for v in df["features"]} == {512}
    table = delta.load(TARGET, options).to_pyarrow_dataset().to_table()  # the table, as deltalake reads it from S3
    assert table.num_rows == N_IMAGES and table.schema.field("pca").type.value_type.bit_width == 32

    eu.enforce_iam(False)
    out = [o for o in eu.objects() if o.startswith(f"{OUT}/")]
    assert f"{OUT}/features/run-1/_SUCCESS" in out
    assert all(o.startswith(f"{OUT}/features/run-1/") for o in out), "staging or checkpoints left beside the output"
    doc = json.loads(eu.read(f"{OUT}/features/run-1/run.json"))
    assert doc["counts"] == {"images_listed": N_IMAGES, "labels": 3, "rows_written": N_IMAGES, "errors": 0, "listed": N_IMAGES,
                             "added": N_IMAGES, "updated": 0, "removed": 0, "unchanged": 0, "featurized": N_IMAGES}
    assert doc["cluster"]["n_workers"] == 2
    assert doc["weights"]["kind"] == "file" and doc["weights"]["source"].startswith(f"s3://{IN}/")

    # No credential anywhere: not in run.json, the reports, any written object, or the logs.
    for obj in out:
        body = eu.read(obj)
        assert secret.encode() not in body and key.encode() not in body, obj
    assert secret not in captured.err + captured.out and key not in captured.err + captured.out
