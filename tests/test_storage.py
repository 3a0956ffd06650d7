"""fruitdask.storage against a real S3 protocol (moto's server): regions, listing, commit.

Fast: no cluster. The end-to-end S3 runs through the CLI live in ``test_s3.py``.
"""

from __future__ import annotations

import json
import socket
import time
from contextlib import closing

import pandas as pd
import pytest
from s3_server import TEST_SECRET, isolate_aws_env

from fruitdask import storage
from fruitdask.config import EU_REGIONS, StorageSettings
from fruitdask.errors import InputError, OutputError, RegionError, StorageError

pytestmark = pytest.mark.integration  # every test talks to the moto server

ALLOW_ALL_S3 = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}


def settings_for(s3, **kw) -> StorageSettings:
    return StorageSettings(endpoint_url=s3.endpoint, **kw)


def opts(s3) -> dict:
    return storage.storage_options(settings_for(s3))


# --- regions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "region"),
    [(None, "us-east-1"), ("", "us-east-1"), ("EU", "eu-west-1"), ("eu", "eu-west-1"), ("eu-west-3", "eu-west-3")],
)
def test_normalize_region(answer, region):
    assert storage.normalize_region(answer) == region


@pytest.mark.parametrize(
    ("created_in", "reported"),
    [("eu-west-1", "eu-west-1"), ("eu-west-3", "eu-west-3"), ("eu-west-2", "eu-west-2"),
     ("us-east-1", "us-east-1"), ("EU", "eu-west-1")],
)
def test_bucket_region_from_the_server(s3, created_in, reported):
    s3.bucket("fruits-bucket", created_in)
    assert storage.bucket_region("fruits-bucket", opts(s3)) == reported


def test_get_bucket_location_answers_are_normalized(s3):
    """GetBucketLocation answers nothing for us-east-1 and ``EU`` for old eu-west-1 buckets."""
    s3.bucket("east-bucket", "us-east-1")
    s3.bucket("old-eu-bucket", "EU")
    raw = {b: s3.client().get_bucket_location(Bucket=b).get("LocationConstraint") for b in ("east-bucket", "old-eu-bucket")}
    assert raw == {"east-bucket": None, "old-eu-bucket": "EU"}
    assert {b: storage.normalize_region(v) for b, v in raw.items()} == {"east-bucket": "us-east-1", "old-eu-bucket": "eu-west-1"}


def test_default_allow_list_is_the_eu_member_state_regions():
    assert set(StorageSettings().allowed_regions) == set(EU_REGIONS)
    assert {"eu-west-1", "eu-west-3", "eu-central-1", "eu-north-1", "eu-south-1", "eu-south-2"} == set(EU_REGIONS)
    assert "eu-west-2" not in EU_REGIONS and "eu-central-2" not in EU_REGIONS  # London, Zurich: not EU


def test_guard_passes_eu_buckets_and_skips_local_paths(s3, tmp_path):
    s3.bucket("in-euw1", "eu-west-1")
    s3.bucket("out-euw3", "eu-west-3")
    s3.bucket("old-eu", "EU")
    storage.guard_regions(
        ["s3://in-euw1/Training", "s3://out-euw3/run-1", "s3://old-eu/w.weights.h5", str(tmp_path), "random", None],
        settings_for(s3),
    )


@pytest.mark.parametrize(("region", "role"), [("us-east-1", 0), ("eu-west-2", 1), ("us-east-1", 2), ("eu-central-2", 2)])
def test_guard_refuses_non_eu_buckets_naming_bucket_region_and_flag(s3, region, role):
    s3.bucket("in-euw1", "eu-west-1")
    s3.bucket("far-bucket", region)
    urls = ["s3://in-euw1/Training", "s3://in-euw1/out", "random"]
    urls[role] = "s3://far-bucket/x/y.weights.h5" if role == 2 else "s3://far-bucket/data"
    with pytest.raises(RegionError) as e:
        storage.guard_regions(urls, settings_for(s3))
    msg = str(e.value)
    assert "'far-bucket'" in msg and region in msg and "--allowed-regions" in msg
    assert s3.objects() == []


def test_allowed_regions_is_configurable(s3):
    s3.bucket("london", "eu-west-2")
    storage.guard_regions(["s3://london/x"], settings_for(s3, allowed_regions=("eu-west-2",)))
    s3.bucket("paris", "eu-west-3")
    with pytest.raises(RegionError, match="paris"):
        storage.guard_regions(["s3://paris/x"], settings_for(s3, allowed_regions=("eu-west-2",)))


def test_remote_locations_whose_region_is_unknowable_are_refused(s3):
    with pytest.raises(RegionError, match="cannot check the region"):
        storage.guard_regions(["gs://bucket/x"], settings_for(s3))


def test_missing_bucket(s3):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.guard_regions(["s3://no-such-bucket/x"], settings_for(s3))


def test_no_credentials(s3, monkeypatch):
    isolate_aws_env(monkeypatch, key=None)
    s3.bucket("in-euw1", "eu-west-1")
    with pytest.raises(StorageError, match="no AWS credentials found") as e:
        storage.guard_regions(["s3://in-euw1/x"], settings_for(s3))
    assert "--aws-profile" in str(e.value)


def test_unknown_profile(s3):
    with pytest.raises(StorageError, match="nope-profile") as e:
        storage.guard_regions(["s3://in-euw1/x"], settings_for(s3, profile="nope-profile"))
    assert "--aws-profile" in str(e.value)


def test_access_denied(s3, monkeypatch):
    s3.bucket("in-euw1", "eu-west-1")
    s3.bucket("other", "eu-west-1")
    key, secret = s3.iam_user("only-other", [{"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::other*"}])
    isolate_aws_env(monkeypatch, key, secret)
    s3.enforce_iam()
    storage.guard_regions(["s3://other/x"], settings_for(s3))
    with pytest.raises(StorageError, match="access denied to 's3://in-euw1'"):
        storage.guard_regions(["s3://in-euw1/x"], settings_for(s3))


def test_rejected_credentials(s3):
    s3.bucket("in-euw1", "eu-west-1")
    s3.enforce_iam()  # the dummy keys of the fixture are unknown to IAM
    with pytest.raises(StorageError, match="credentials were rejected"):
        storage.guard_regions(["s3://in-euw1/x"], settings_for(s3))


def test_irsa_web_identity_credentials(s3, monkeypatch, tmp_path):
    """EKS IRSA: only AWS_ROLE_ARN and a token file, as the pod identity webhook sets them.
    The chain trades the token for keys at STS (moto's, here) in this process, as in every
    worker; without the role there are no credentials at all."""
    s3.bucket("in-euw1", "eu-west-1")
    s3.fs.pipe_file("in-euw1/Training/Apple/a.jpg", b"\xff\xd8")
    trust = {"Effect": "Allow", "Action": "sts:AssumeRoleWithWebIdentity",
             "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/oidc.eks.eu-west-1.amazonaws.com/id/X"}}
    role = s3.client("iam").create_role(
        RoleName="fruitdask-irsa", AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [trust]})
    )["Role"]["Arn"]
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZnJ1aXRkYXNrIn0.sig")
    isolate_aws_env(monkeypatch, key=None)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", s3.endpoint)
    with pytest.raises(StorageError, match="no AWS credentials"):
        storage.guard_regions(["s3://in-euw1/Training"], settings_for(s3))
    monkeypatch.setenv("AWS_ROLE_ARN", role)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    storage.guard_regions(["s3://in-euw1/Training"], settings_for(s3))
    assert list(storage.list_images("s3://in-euw1/Training", opts(s3))["label"]) == ["Apple"]


def _free_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.mark.parametrize("listening", [False, True], ids=["refused", "silent"])
def test_unreachable_endpoint_fails_fast(listening, monkeypatch):
    """A closed port refuses at once; a port that accepts and never answers hits the timeout."""
    isolate_aws_env(monkeypatch)
    with closing(_free_port()) as sock:
        if listening:
            sock.listen(8)
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(StorageError, match="cannot reach") as e:
            storage.guard_regions(["s3://in-euw1/x"], StorageSettings(endpoint_url=endpoint, connect_timeout=1.0))
        elapsed = time.monotonic() - started
    assert endpoint in str(e.value) and "--s3-endpoint" in str(e.value)
    assert elapsed < 15, f"the region probe took {elapsed:.1f}s: it must fail fast, not hang"


# --- listing and reading ---------------------------------------------------------------


def test_list_images_on_s3(s3, tiny_images):
    s3.bucket("in-euw1", "eu-west-1")
    s3.upload(tiny_images, "s3://in-euw1/Training")
    s3.fs.pipe_file("in-euw1/Training/notes.txt", b"not an image")
    listing = storage.list_images("s3://in-euw1/Training", opts(s3))
    assert len(listing) == 12 and set(listing["label"]) == {p.name for p in tiny_images.iterdir()}
    assert all(p.startswith("s3://in-euw1/Training/") for p in listing["path"])
    assert storage.read_bytes(listing["path"][0], opts(s3))[:2] == b"\xff\xd8"  # a JPEG


def test_a_big_folder_is_listed_a_page_at_a_time(s3, tmp_path):
    """2,500 keys (S3, three ListObjectsV2 pages) and 2,500 local files under one label, plus
    a second label: every image once, in batches of at most a page, folders in order."""
    from concurrent.futures import ThreadPoolExecutor

    from fruitdask.storage import listing

    s3.bucket("in-big", "eu-west-1")
    names = [f"img_{i:05d}.jpg" for i in range(2500)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: s3.fs.pipe_file(f"in-big/T/Big/{n}", b"x"), names))
    s3.fs.pipe_file("in-big/T/Small/one.jpg", b"x")
    for label, files in (("Big", names), ("Small", ["one.jpg"])):
        (tmp_path / "T" / label).mkdir(parents=True)
        for n in files:
            (tmp_path / "T" / label / n).write_bytes(b"x")
    for url, so in (("s3://in-big/T", opts(s3)), (str(tmp_path / "T"), {})):
        batches = list(storage.iter_images(url, so, threads=2))
        assert max(len(b.images) for b in batches) <= listing.PAGE and len(batches) >= 4, url
        paths = [p for b in batches for p, *_ in b.images]
        assert len(paths) == len(set(paths)) == 2501, url
        assert [p.rsplit("/", 2)[-2] for p in paths] == ["Big"] * 2500 + ["Small"], url  # folder order kept


def test_a_listing_error_in_a_thread_reaches_the_caller_and_stops_the_others():
    from fruitdask.storage import listing

    def pages(folder):
        if folder == "bad":
            raise OSError("listing failed")
        for i in range(50):
            yield [(f"{folder}/{i}.jpg", 1, "t", None)]

    with pytest.raises(OSError, match="listing failed"):
        list(listing._stream(["ok", "bad", "ok2"], pages, [], threads=2))
    stream = listing._stream(["a", "b", "c"], pages, [], threads=2)
    assert next(stream)[0][0] == "a/0.jpg"
    stream.close()  # a consumer that stops early: the threads stop (the test would hang otherwise)


def test_prefix_without_images(s3):
    s3.bucket("in-euw1", "eu-west-1")
    s3.fs.pipe_file("in-euw1/Training/readme.txt", b"no images here")
    with pytest.raises(InputError, match="no images found under 's3://in-euw1/Training'"):
        storage.list_images("s3://in-euw1/Training", opts(s3))
    with pytest.raises(InputError, match="does not exist"):
        storage.list_images("s3://in-euw1/Nothing", opts(s3))


def test_read_without_credentials_fails_the_run_not_the_image(s3, monkeypatch):
    import s3fs

    s3.bucket("in-euw1", "eu-west-1")
    s3.fs.pipe_file("in-euw1/a/b.jpg", b"x")
    with pytest.raises(FileNotFoundError):  # a per-image failure stays an OSError, recorded on its row
        storage.read_bytes("s3://in-euw1/a/missing.jpg", opts(s3))
    isolate_aws_env(monkeypatch, key=None)
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StorageError, match="no AWS credentials"):  # every read would fail: the run fails
        storage.read_bytes("s3://in-euw1/a/b.jpg", opts(s3))


# --- safe output -----------------------------------------------------------------------


def _worker_fs(s3):
    """Another client, like a worker process: its writes are invisible to our listing cache."""
    return s3.fs


def _stage(target, s3, files: dict[str, bytes]) -> None:
    fs = _worker_fs(s3)
    for rel, data in files.items():
        fs.pipe_file(target.staging_path(rel).removeprefix("s3://"), data)


def _under(s3, prefix: str) -> list[str]:
    return [o for o in s3.objects() if o.startswith(prefix)]


def test_commit_on_s3_publishes_everything_then_success(s3):
    s3.bucket("out-euw3", "eu-west-3")
    target = storage.StagedOutput.open("s3://out-euw3/features/run-1", opts(s3), overwrite=False)
    target.fs_path[0].exists("out-euw3/features")  # fill the listing cache, as the pipeline does
    _stage(target, s3, {"features/part-00000.parquet": b"p0", "features/part-00001.parquet": b"p1"})
    target.write_json("run.json", {"ok": True})
    assert _under(s3, "out-euw3/features/run-1/") == []
    target.commit()
    assert _under(s3, "out-euw3/features/") == [
        "out-euw3/features/run-1/_SUCCESS",
        "out-euw3/features/run-1/features/part-00000.parquet",
        "out-euw3/features/run-1/features/part-00001.parquet",
        "out-euw3/features/run-1/run.json",
    ]


def test_existing_output_is_refused_without_overwrite(s3):
    s3.bucket("out-euw3", "eu-west-3")
    s3.fs.pipe_file("out-euw3/run-1/_SUCCESS", b"")
    with pytest.raises(OutputError, match="already exists: pass --overwrite"):
        storage.StagedOutput.open("s3://out-euw3/run-1", opts(s3), overwrite=False)
    s3.fs.pipe_file("out-euw3/run-2/features/part-00000.parquet", b"")
    with pytest.raises(OutputError, match="incomplete: no _SUCCESS"):
        storage.StagedOutput.open("s3://out-euw3/run-2/", opts(s3), overwrite=False)


def test_bucket_root_output_is_refused(s3):
    s3.bucket("out-euw3", "eu-west-3")
    with pytest.raises(OutputError, match="bucket root"):
        storage.StagedOutput.open("s3://out-euw3/", opts(s3), overwrite=True)


def test_overwrite_replaces_without_mixing(s3):
    s3.bucket("out-euw3", "eu-west-3")
    for rel in ("_SUCCESS", "features/part-00000.parquet", "features/part-00001.parquet", "features/part-00002.parquet", "old.txt"):
        s3.fs.pipe_file(f"out-euw3/run-1/{rel}", b"old")
    s3.fs.pipe_file("out-euw3/run-10/keep.txt", b"sibling")  # shares the prefix "run-1"
    target = storage.StagedOutput.open("s3://out-euw3/run-1", opts(s3), overwrite=True)
    _stage(target, s3, {"features/part-00000.parquet": b"new", "run.json": b"{}"})
    target.commit()
    assert _under(s3, "out-euw3/run-1/") == [
        "out-euw3/run-1/_SUCCESS", "out-euw3/run-1/features/part-00000.parquet", "out-euw3/run-1/run.json"
    ]
    assert s3.read("out-euw3/run-1/features/part-00000.parquet") == b"new"
    assert _under(s3, "out-euw3/run-10/") == ["out-euw3/run-10/keep.txt"]
    assert not any(".fruitdask-tmp-" in o for o in s3.objects())


def test_abort_removes_staging_written_by_other_processes(s3):
    s3.bucket("out-euw3", "eu-west-3")
    target = storage.StagedOutput.open("s3://out-euw3/features/run-1", opts(s3), overwrite=False)
    fs = target.fs_path[0]
    target.write_bytes("run.json", b"{}")
    fs.ls("out-euw3/features")  # cached now: the next writes come from "workers"
    _stage(target, s3, {"features/part-00000.parquet": b"p0"})
    target.abort()
    assert s3.objects() == []


def test_interrupt_leaves_no_dataset_and_no_staging(s3):
    s3.bucket("out-euw3", "eu-west-3")
    target = storage.StagedOutput.open("s3://out-euw3/run-1", opts(s3), overwrite=False)
    with pytest.raises(KeyboardInterrupt), storage.committed(target):
        _stage(target, s3, {"features/part-00000.parquet": b"p0"})
        raise KeyboardInterrupt
    assert s3.objects() == []


def test_failed_commit_leaves_no_dataset_without_success(s3, monkeypatch):
    """The copy of one file into the target is denied: what was copied goes away again."""
    s3.bucket("out-euw3", "eu-west-3")
    for rel in ("_SUCCESS", "features/part-00000.parquet"):
        s3.fs.pipe_file(f"out-euw3/run-1/{rel}", b"old")
    key, secret = s3.iam_user("flaky", [
        ALLOW_ALL_S3,
        {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::out-euw3/run-1/features/part-00001.parquet"},
    ])
    target = storage.StagedOutput.open("s3://out-euw3/run-1", opts(s3), overwrite=True)
    _stage(target, s3, {f"features/part-0000{i}.parquet": b"new" for i in range(3)})
    isolate_aws_env(monkeypatch, key, secret)
    s3.enforce_iam()
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(OutputError, match="could not commit") as e:
        target.commit()
    assert "access denied" in str(e.value)
    s3.enforce_iam(False)
    # No half-new, no staging, no copy aside: the old dataset is back, marker included.
    assert s3.objects() == ["out-euw3/run-1/_SUCCESS", "out-euw3/run-1/features/part-00000.parquet"]
    assert s3.read("out-euw3/run-1/features/part-00000.parquet") == b"old"


def test_local_commit_and_overwrite(tmp_path):
    out = tmp_path / "out"
    (out / "features").mkdir(parents=True)
    (out / "features" / "part-00009.parquet").write_bytes(b"old")
    (out / "_SUCCESS").write_bytes(b"")
    target = storage.StagedOutput.open(str(out), None, overwrite=True)
    target.write_bytes("features/part-00000.parquet", b"new")
    target.commit()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "_SUCCESS", "features/part-00000.parquet"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_parquet_part_round_trip_on_s3(s3):
    import pyarrow as pa

    s3.bucket("out-euw3", "eu-west-3")
    schema = pa.schema([("path", pa.string()), ("n", pa.int64())])
    df = pd.DataFrame({"path": ["a", "b"], "n": [1, 2]})
    assert storage.write_parquet_part(df, "s3://out-euw3/t/part-0.parquet", schema, opts(s3)) == 2
    back = pd.read_parquet("s3://out-euw3/t/part-0.parquet", storage_options=opts(s3))
    assert back["n"].tolist() == [1, 2]
    assert TEST_SECRET not in repr(opts(s3))


# --- overwrite safety, the run lock (issue 13, items 1-3) ------------------------------

OLD = {"_SUCCESS": b"", "run.json": b'{"old": true}', "features/part-00000.parquet": b"old0", "features/part-00001.parquet": b"old1"}


def _old_dataset(s3, prefix: str = "out-euw3/run-1") -> None:
    s3.bucket("out-euw3", "eu-west-3")
    for rel, data in OLD.items():
        s3.fs.pipe_file(f"{prefix}/{rel}", data)


def _failing_copy(fs, monkeypatch, fail_when, seen: list, snapshot) -> None:
    """Make ``fs.copy`` copy the first file of a matching batch, then fail (a copy that
    breaks midway); ``seen`` gets the bucket's objects at that moment."""
    real = fs.copy

    def copy(src, dst, **kw):
        srcs, dsts = (src, dst) if isinstance(src, list) else ([src], [dst])
        if fail_when(srcs, dsts):
            real(srcs[:1], dsts[:1], **kw)
            seen.append(snapshot())
            raise OSError("simulated failure midway through the copy")
        return real(src, dst, **kw)

    monkeypatch.setattr(fs, "copy", copy)


def test_overwrite_failing_midway_keeps_the_old_dataset_recoverable_then_restores_it(s3, monkeypatch):
    _old_dataset(s3)
    target = storage.StagedOutput.open("s3://out-euw3/run-1", opts(s3), overwrite=True)
    _stage(target, s3, {"features/part-00000.parquet": b"new0", "features/part-00001.parquet": b"new1", "run.json": b"{}"})
    seen: list = []
    _failing_copy(target.fs_path[0], monkeypatch, lambda srcs, dsts: ".fruitdask-tmp-" in srcs[0], seen, s3.objects)
    with pytest.raises(OutputError, match=r"could not commit.*simulated failure"):
        target.commit()
    # At the failure: the target had no _SUCCESS (readers could tell), and the old dataset
    # was complete, marker included, in the copy aside.
    during = seen[0]
    assert "out-euw3/run-1/_SUCCESS" not in during
    backup = target.backup.removeprefix("s3://")
    assert sorted(o[len(backup) + 1:] for o in during if o.startswith(backup + "/")) == sorted(OLD)
    # Afterwards: the old dataset is back at the target, byte for byte, and nothing else.
    assert s3.objects() == sorted(f"out-euw3/run-1/{rel}" for rel in OLD)
    for rel, data in OLD.items():
        assert s3.read(f"out-euw3/run-1/{rel}") == data


def test_overwrite_whose_restore_fails_too_leaves_the_old_dataset_aside_and_says_where(s3, monkeypatch, caplog):
    _old_dataset(s3)
    target = storage.StagedOutput.open("s3://out-euw3/run-1", opts(s3), overwrite=True)
    _stage(target, s3, {"features/part-00000.parquet": b"new0", "run.json": b"{}"})
    backup = target.backup.removeprefix("s3://")
    _failing_copy(target.fs_path[0], monkeypatch,
                  lambda srcs, dsts: ".fruitdask-tmp-" in srcs[0] or srcs[0].startswith(backup + "/"), [], s3.objects)
    with pytest.raises(OutputError, match="could not commit"):
        target.commit()
    assert target.backup in caplog.text and "aws s3 sync" in caplog.text
    assert "out-euw3/run-1/_SUCCESS" not in s3.objects()
    assert sorted(o[len(backup) + 1:] for o in s3.objects() if o.startswith(backup + "/")) == sorted(OLD)
    # The next run is told where the old dataset is.
    with pytest.raises(OutputError, match=r"incomplete: no _SUCCESS.*kept at s3://out-euw3/\.run-1\.fruitdask-old-"):
        storage.StagedOutput.open("s3://out-euw3/run-1", opts(s3), overwrite=False)


def _deny_delete(s3, bucket: str, key: str) -> None:
    """A bucket policy that denies deleting one key: S3's bulk delete (``DeleteObjects``)
    then answers 200 with a per-key ``AccessDenied`` and deletes the others."""
    statement = {"Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObject", "Resource": f"arn:aws:s3:::{bucket}/{key}"}
    s3.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [statement]}))


def test_overwrite_whose_old_part_cannot_be_deleted_rolls_back_instead_of_mixing(s3):
    """Issue 23, item 8: an old part that the bulk delete failed to remove must not end up
    under a new ``_SUCCESS`` beside the new parts."""
    _old_dataset(s3)
    _deny_delete(s3, "out-euw3", "run-1/features/part-00001.parquet")
    target = storage.StagedOutput.open("s3://out-euw3/run-1", opts(s3), overwrite=True)
    _stage(target, s3, {"features/part-00000.parquet": b"new0", "run.json": b"{}"})
    with pytest.raises(OutputError, match=r"could not commit.*part-00001\.parquet.*AccessDenied"):
        target.commit()
    # The old dataset, whole and alone, under its own _SUCCESS; no staging left.
    assert [o for o in s3.objects() if ".fruitdask-old-" not in o] == sorted(f"out-euw3/run-1/{rel}" for rel in OLD)
    for rel, data in OLD.items():
        assert s3.read(f"out-euw3/run-1/{rel}") == data
    assert not any(".fruitdask-tmp-" in o for o in s3.objects())


def test_commit_rolls_back_when_the_target_holds_objects_it_did_not_write(s3, monkeypatch, caplog):
    """The target is listed again before ``_SUCCESS``: an object another writer put there
    while the commit copied is never vouched for by a marker, neither the new nor the old."""
    _old_dataset(s3)
    target = storage.StagedOutput.open("s3://out-euw3/run-1", opts(s3), overwrite=True)
    _stage(target, s3, {"features/part-00000.parquet": b"new0", "run.json": b"{}"})
    fs = target.fs_path[0]
    real = fs.copy

    def copy_then_stray(src, dst, **kw):
        real(src, dst, **kw)
        if ".fruitdask-tmp-" in str(src):
            s3.fs.pipe_file("out-euw3/run-1/features/part-00009.parquet", b"stray")

    monkeypatch.setattr(fs, "copy", copy_then_stray)
    with pytest.raises(OutputError, match=r"could not commit.*1 objects this run did not write.*part-00009"):
        target.commit()
    assert "out-euw3/run-1/_SUCCESS" not in s3.objects()
    backup = target.backup.removeprefix("s3://")
    assert sorted(o[len(backup) + 1:] for o in s3.objects() if o.startswith(backup + "/")) == sorted(OLD)
    assert target.backup in caplog.text


def test_successful_overwrite_leaves_no_copy_aside_and_no_lock(s3):
    _old_dataset(s3)
    target = storage.StagedOutput.open("s3://out-euw3/run-1", opts(s3), overwrite=True)
    with storage.committed(target):
        _stage(target, s3, {"features/part-00000.parquet": b"new0", "run.json": b"{}"})
    assert s3.objects() == ["out-euw3/run-1/_SUCCESS", "out-euw3/run-1/features/part-00000.parquet", "out-euw3/run-1/run.json"]


@pytest.mark.parametrize("where", ["s3", "local"])
def test_overwrite_refuses_a_target_that_is_not_a_fruitdask_output(s3, tmp_path, where):
    if where == "s3":
        s3.bucket("out-euw3", "eu-west-3")
        for rel in ("holiday.jpg", "taxes/2025.pdf"):
            s3.fs.pipe_file(f"out-euw3/mine/{rel}", b"precious")
        url, o = "s3://out-euw3/mine", opts(s3)
    else:
        (tmp_path / "mine" / "taxes").mkdir(parents=True)
        (tmp_path / "mine" / "holiday.jpg").write_bytes(b"precious")
        (tmp_path / "mine" / "taxes" / "2025.pdf").write_bytes(b"precious")
        url, o = str(tmp_path / "mine"), None
    with pytest.raises(OutputError, match=r"--overwrite refuses to replace .*mine.*holiday\.jpg, taxes.*not a fruitdask output"):
        storage.StagedOutput.open(url, o, overwrite=True)
    if where == "s3":
        assert s3.objects() == ["out-euw3/mine/holiday.jpg", "out-euw3/mine/taxes/2025.pdf"]
    else:
        assert (tmp_path / "mine" / "holiday.jpg").read_bytes() == b"precious"


@pytest.mark.parametrize("marker", ["_SUCCESS", "run.json", "bundle.json"])
def test_overwrite_accepts_a_fruitdask_output_even_incomplete(tmp_path, marker):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / marker).write_bytes(b"{}")
    (tmp_path / "out" / "other.bin").write_bytes(b"x")
    target = storage.StagedOutput.open(str(tmp_path / "out"), None, overwrite=True)
    with storage.committed(target):
        target.write_bytes("run.json", b"{}")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_SUCCESS", "run.json"]


def _run_1(where: str, s3, tmp_path) -> tuple[str, dict | None]:
    """An output location ``run-1`` on S3 (eu-west-3 bucket) or in a local folder."""
    if where == "s3":
        s3.bucket("out-euw3", "eu-west-3")
        return "s3://out-euw3/run-1", opts(s3)
    return str(tmp_path / "run-1"), None


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_second_run_on_the_same_output_fails_clearly(s3, tmp_path, where):
    from fruitdask.errors import OutputBusyError

    url, o = _run_1(where, s3, tmp_path)
    first = storage.StagedOutput.open(url, o, overwrite=False, run_id="first")
    second = storage.StagedOutput.open(url, o, overwrite=False, run_id="second")
    with storage.committed(first):
        first.write_bytes("run.json", b'{"run": "first"}')
        with pytest.raises(OutputBusyError, match=r"being written by run first \(host .*, pid \d+, since .*\); this run \(second\)"):
            with storage.committed(second):
                second.write_bytes("run.json", b'{"run": "second"}')
    got = storage.read_bytes(storage.join(url, "run.json"), o)
    assert json.loads(got) == {"run": "first"}
    # Both runs are over: the lock is gone, the next run may go.
    third = storage.StagedOutput.open(url, o, overwrite=True, run_id="third")
    with storage.committed(third):
        third.write_bytes("run.json", b"{}")


@pytest.mark.parametrize("where", ["s3", "local"])
def test_commit_checks_the_lock_again(s3, tmp_path, where):
    """A run whose lock was taken over (a store that ignored the conditional write, or a
    lock deleted by hand) commits nothing."""
    from fruitdask.errors import OutputBusyError

    url, o = _run_1(where, s3, tmp_path)
    target = storage.StagedOutput.open(url, o, overwrite=False, run_id="mine")
    with pytest.raises(OutputBusyError, match="being written by run intruder"):
        with storage.committed(target):
            target.write_bytes("run.json", b"{}")
            storage.write_file(target.lock_url, json.dumps({"run_id": "intruder"}).encode(), o)
    assert storage.list_files(url, o) == []
    # The intruder's lock is not this run's to delete.
    assert json.loads(storage.read_bytes(target.lock_url, o))["run_id"] == "intruder"


def test_hidden_siblings_of_an_output():
    from fruitdask.storage import paths

    assert paths.staging_url("s3://b/out/run-1/", "abc") == "s3://b/out/.run-1.fruitdask-tmp-abc"
    assert paths.lock_url("s3://b/out/run-1") == "s3://b/out/.run-1.fruitdask-lock"
    assert paths.backup_url("/data/run-1", "abc") == "/data/.run-1.fruitdask-old-abc"
    assert paths.checkpoint_root("run-1/") == "./.run-1.fruitdask-checkpoint"
    assert paths.join("s3://b/out/", "/features/", "x.parquet") == "s3://b/out/features/x.parquet"


def test_markers_and_hidden_siblings_are_named_in_storage_paths_only():
    """``_SUCCESS`` and the ``.<name>.fruitdask-*`` suffixes: one definition (issue 25)."""
    import ast
    from pathlib import Path

    package = Path(storage.__file__).resolve().parents[1]
    names = ("_SUCCESS", "fruitdask-tmp", "fruitdask-lock", "fruitdask-old", "fruitdask-checkpoint")
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path == package / "storage" / "paths.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and ast.get_docstring(n, clean=False) is not None}
        offenders += [f"{path.relative_to(package.parent)}:{n.lineno}" for n in ast.walk(tree)
                      if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
                      and any(name in n.value for name in names)]
    assert not offenders, f"import these names from fruitdask.storage.paths: {offenders}"


def test_a_run_folder_is_updated_in_place_and_its_staging_only_holds_the_runs_inputs(tmp_path):
    """The two lifecycles of an output: a run's folder (``OutputTarget``) keeps what its table
    and publishing wrote at their final paths and drops its staging at the end, it has no
    commit that moves staging over it; a bundle (``StagedOutput``) appears only at its commit.
    Fails before the split: one class had both, and ``OutputTarget.open`` was the bundle's."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.json").write_text("{}")  # an earlier run's record, kept in place
    run = storage.OutputTarget.for_update(str(tmp_path / "out"), None, run_id="r1")
    run.lock()
    try:
        manifest = run.write_bytes("manifest.parquet", b"rows")
        storage.write_file(run.final_path("errors.parquet"), b"errors", None)
        assert storage.read_bytes(manifest) == b"rows"
        run.abort()
    finally:
        run.unlock()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "the run's staging and lock are gone"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["errors.parquet", "run.json"]
    assert not hasattr(run, "commit") and not hasattr(storage.StagedOutput, "for_update")

    bundle = storage.StagedOutput.open(str(tmp_path / "model"), None, overwrite=False, run_id="b1")
    with storage.committed(bundle):
        bundle.write_bytes("bundle.json", b"{}")
        assert not (tmp_path / "model").exists(), "a staged dataset is invisible until its commit"
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["_SUCCESS", "bundle.json"]
