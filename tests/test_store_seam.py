"""Issue 33, the storage seam: a store is one module implementing ``storage.base.Store`` plus
its registration. A tiny store for a new scheme (``memory://``, fsspec's in-process file
system), defined here in the tests and registered for a while, serves the input listing,
the output lock (create, busy, release, takeover of a dead run's lease), the region guard,
the protocol check, the error messages and the pods' environment, with no other change to
fruitdask. Every test here fails on the code before the seam (there was no
``fruitdask.storage.stores`` to register a store with: ``memory://`` was refused by the
guard, and the lock spoke S3 to any remote file system).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
import pytest
from conftest import BUNDLED
from fsspec.implementations.memory import MemoryFileSystem

from fruitdask import storage
from fruitdask.backends.dask.kube import make_cluster_spec
from fruitdask.config import KubeSettings, StorageSettings
from fruitdask.errors import FruitdaskError, OutputBusyError, OutputError, RegionError, StorageError, UntrustedReferenceError
from fruitdask.storage import base, lease, stores

#: Where each bucket of the test store "lives" (what its region answer says).
BUCKET_REGIONS = {"eu-bucket": "eu-west-3", "us-bucket": "us-east-1"}


class MemoryStore:
    """A store for ``memory://``: conditional writes under one process-wide mutex, versions
    from a generation counter, the clock of this process (it is the storage's here)."""

    name = "memory"
    schemes: tuple[str, ...] = ("memory",)

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._generation: dict[str, int] = {}
        self._written: dict[str, float] = {}

    def fsspec_options(self, settings: StorageSettings) -> dict[str, Any]:
        return {}

    def delta_uri(self, url: str) -> str:
        return url

    def delta_options(self, url: str, storage_options: Mapping[str, Any]) -> dict[str, str] | None:
        return None

    def region(self, url: str, storage_options: Mapping[str, Any]) -> str | None:
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        if bucket not in BUCKET_REGIONS:
            raise StorageError(f"memory bucket {bucket!r} does not exist")
        return BUCKET_REGIONS[bucket]

    def exceptions(self) -> tuple[type[BaseException], ...]:
        return (OSError,)

    def explain(self, e: BaseException, url: str, *, bucket_level: bool = False) -> FruitdaskError:
        return StorageError(f"the memory store failed on {url!r} ({type(e).__name__}): it lives in this process only")

    def _version(self, path: str) -> str:
        return f"g{self._generation.get(path, 0)}"

    def read_object(self, fs: fsspec.AbstractFileSystem, path: str) -> base.Snapshot | None:
        with self._mutex:
            if not fs.exists(path):
                return None
            return base.Snapshot(fs.cat_file(path), self._version(path), self._written[path], time.time())

    def _write(self, fs: fsspec.AbstractFileSystem, path: str, body: bytes) -> base.Written:
        fs.pipe_file(path, body)
        self._generation[path] = self._generation.get(path, 0) + 1
        self._written[path] = time.time()
        return base.Written(self._version(path), self._written[path])

    def put_if_absent(self, fs: fsspec.AbstractFileSystem, path: str, body: bytes) -> base.Written | None:
        with self._mutex:
            return None if fs.exists(path) else self._write(fs, path, body)

    def put_if_match(self, fs: fsspec.AbstractFileSystem, path: str, body: bytes, version: str) -> base.Written | None:
        with self._mutex:
            if not fs.exists(path) or self._version(path) != version:
                return None
            return self._write(fs, path, body)

    def delete_if_match(self, fs: fsspec.AbstractFileSystem, path: str, version: str) -> bool:
        with self._mutex:
            if not fs.exists(path) or self._version(path) != version:
                return False
            fs.rm_file(path)
            return True

    delete_permission = "nothing (it is this process's memory)"

    def delete_many(self, fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[str]:
        with self._mutex:
            fs.rm([p for p in paths if fs.exists(p)])
        return []

    def list_pages(self, fs: fsspec.AbstractFileSystem, folder: str) -> Iterator[list[base.Entry]]:
        return base.find_pages(fs, folder)

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        return None

    def pod_env(self, region: str) -> dict[str, str]:
        return {"MEMORY_STORE_REGION": region}


@pytest.fixture
def memory_store() -> Iterator[MemoryStore]:
    """The test store, registered for one test, over an empty in-process file system."""
    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]
    store = MemoryStore()
    stores.register(store)
    try:
        yield store
    finally:
        stores.unregister(store)
        MemoryFileSystem.store.clear()


def _upload_images(root: str, per_label: int = 3) -> dict[str, int]:
    """Copy ``per_label`` bundled images of two labels under ``root``; the count per label."""
    fs = fsspec.filesystem("memory")
    counts = {}
    for label_dir in sorted(p for p in BUNDLED.iterdir() if p.is_dir())[:2]:
        for image in sorted(label_dir.glob("*.jpg"))[:per_label]:
            fs.pipe_file(f"{root}/{label_dir.name}/{image.name}", image.read_bytes())
        counts[label_dir.name] = per_label
    return counts


def test_the_registry_serves_each_scheme_from_its_store(memory_store):
    assert stores.lookup("memory://eu-bucket/x") is memory_store
    assert stores.lookup("s3://b/k") is stores.lookup("s3a://b/k") is stores.S3
    assert stores.lookup("/tmp/x") is stores.lookup("file:///tmp/x") is stores.LOCAL
    assert stores.lookup("https://example.com/x") is None
    assert storage.is_remote("memory://eu-bucket/x") and not storage.is_remote("relative/path")
    assert stores.for_fs(fsspec.filesystem("memory")) is memory_store
    stores.unregister(memory_store)
    assert stores.lookup("memory://eu-bucket/x") is None


def test_a_listing_on_the_new_store_finds_every_image_by_label(memory_store):
    counts = _upload_images("memory://eu-bucket/in")
    fsspec.filesystem("memory").pipe_file("memory://eu-bucket/in/notes.txt", b"not an image")
    listing = storage.list_images("memory://eu-bucket/in")
    assert listing.groupby("label").size().to_dict() == counts
    # Full URLs (fsspec roots memory paths at "/", hence three slashes), read back by any process.
    assert all(p.startswith("memory:///eu-bucket/in/") and p.endswith(".jpg") for p in listing["path"])
    # The listed URLs are what workers read back, through the same store.
    first = listing["path"].iloc[0]
    assert storage.read_bytes(first, None)[:2] == b"\xff\xd8"  # a JPEG


def test_the_output_lock_is_the_stores_conditional_write(memory_store):
    first = storage.StagedOutput.open("memory://eu-bucket/out", None, overwrite=False, run_id="first", lease_ttl=30)
    first.lock()
    doc = json.loads(fsspec.filesystem("memory").cat_file(first.lock_url))
    assert doc["run_id"] == "first" and memory_store._generation  # written by the store
    second = storage.StagedOutput.open("memory://eu-bucket/out", None, overwrite=False, run_id="second", lease_ttl=30)
    with pytest.raises(OutputBusyError, match=r"being written by run first .*this run \(second\) stops"):
        second.lock()
    first.unlock()
    assert not fsspec.filesystem("memory").exists(first.lock_url)
    second.lock()
    assert json.loads(fsspec.filesystem("memory").cat_file(second.lock_url))["run_id"] == "second"
    second.unlock()


def test_of_two_takers_of_a_dead_lease_on_the_new_store_only_one_wins(memory_store):
    fs, path = storage.get_fs("memory://eu-bucket/out/.lock", None)
    dead = {**lease.document("dead-run", 1), "host": "node-7", "boot_id": "another-boot", "pid": 4242}
    assert lease.create(fs, path, memory_store, dead) is not None
    time.sleep(1 + 2 * lease.CLOCK_SLACK_S + 0.1)  # its 1 s lease runs out, by the store's clock
    seen_a, seen_b = lease.read(fs, path, memory_store), lease.read(fs, path, memory_store)
    assert seen_a is not None and seen_b is not None and seen_a.expired(1)
    assert lease.replace(fs, path, memory_store, seen_a, lease.document("taker-a", 30)) is not None
    assert lease.replace(fs, path, memory_store, seen_b, lease.document("taker-b", 30)) is None
    held = lease.read(fs, path, memory_store)
    assert held is not None and held.doc["run_id"] == "taker-a"


def test_the_region_guard_asks_the_new_store_where_its_data_lives(memory_store):
    settings = StorageSettings()
    storage.guard_regions(["memory://eu-bucket/in", "memory://eu-bucket/out", None], settings)
    with pytest.raises(RegionError, match=r"bucket 'us-bucket' \(memory://us-bucket/in\) is in us-east-1, outside"):
        storage.guard_regions(["memory://eu-bucket/out", "memory://us-bucket/in"], settings)
    storage.check_protocols(["memory://eu-bucket/weights.h5"])  # a store serves it: allowed
    stores.unregister(memory_store)
    with pytest.raises(UntrustedReferenceError, match="uses memory://, which fruitdask does not read"):
        storage.check_protocols(["memory://eu-bucket/weights.h5"])
    with pytest.raises(RegionError, match="cannot check the region of 'memory://eu-bucket/in'"):
        storage.guard_regions(["memory://eu-bucket/in"], settings)


def test_errors_on_the_new_store_are_worded_by_it(memory_store):
    with pytest.raises(StorageError, match=r"the memory store failed on 'memory://eu-bucket/nothing.jpg' "
                                           r"\(FileNotFoundError\)") as e:
        storage.url_sha256("memory://eu-bucket/nothing.jpg", None)
    assert isinstance(e.value.__cause__, FileNotFoundError)
    # S3's and the local disk's wordings are their own stores', untouched by the new one.
    assert "bucket 'b' does not exist (s3://b)" in str(stores.S3.explain(FileNotFoundError("b"), "s3://b", bucket_level=True))
    assert str(storage.translate(FileNotFoundError("x"), "/no/such")) == "'/no/such' does not exist: check the path or bucket name"


def test_the_pods_get_every_stores_environment(memory_store):
    spec = make_cluster_spec(KubeSettings(region="eu-west-3"), {})
    envs = [c["env"] for c in _containers(spec)]
    assert envs
    for env in envs:
        values = {e["name"]: e.get("value") for e in env}
        assert values["MEMORY_STORE_REGION"] == values["AWS_REGION"] == values["AWS_DEFAULT_REGION"] == "eu-west-3"


def test_the_storage_flags_are_each_stores_own():
    from fruitdask.commands.options import add_storage_options

    parser = argparse.ArgumentParser()
    add_storage_options(parser)
    args = parser.parse_args(["--s3-endpoint", "http://127.0.0.1:1", "--aws-profile", "p", "--aws-region", "eu-west-1",
                              "--allowed-regions", "eu-west-1"])
    assert (args.storage_endpoint_url, args.storage_profile, args.storage_region, args.storage_allowed_regions) == (
        "http://127.0.0.1:1", "p", "eu-west-1", ("eu-west-1",))
    assert "storage (s3://)" in parser.format_help()


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "containers" in node and isinstance(node["containers"], list):
                found.extend(node["containers"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    return found


def test_a_version_names_the_content_it_was_read_with_on_the_local_store(tmp_path):
    """The local store's conditional write: a version read before another write no longer matches."""
    fs, path = storage.get_fs(str(tmp_path / "doc.json"))
    first = stores.LOCAL.put_if_absent(fs, path, b"one")
    assert first is not None and stores.LOCAL.put_if_absent(fs, path, b"two") is None
    assert stores.LOCAL.put_if_match(fs, path, b"two", first.version) is not None
    assert stores.LOCAL.put_if_match(fs, path, b"three", first.version) is None
    assert (tmp_path / "doc.json").read_bytes() == b"two"
    snap = stores.LOCAL.read_object(fs, path)
    assert snap is not None and stores.LOCAL.delete_if_match(fs, path, snap.version) and not (tmp_path / "doc.json").exists()


def test_an_overwrite_on_the_new_store_replaces_the_old_dataset_through_its_bulk_delete(memory_store, monkeypatch):
    """The commit protocol of an object store (copy aside, delete, copy in, ``_SUCCESS``
    last) runs on the new store; the old parts go through the store's own bulk delete, and
    a part it refuses to delete rolls the commit back with the store's own advice."""
    fs = fsspec.filesystem("memory")
    old = {"features/part-0.parquet": b"old0", "features/part-1.parquet": b"old1", "_SUCCESS": b""}
    for rel, data in old.items():
        fs.pipe_file(f"memory://eu-bucket/run-1/{rel}", data)
    deleted: list[list[str]] = []
    real = memory_store.delete_many
    monkeypatch.setattr(memory_store, "delete_many", lambda fs_, paths: deleted.append(paths) or real(fs_, paths))
    target = storage.StagedOutput.open("memory://eu-bucket/run-1", None, overwrite=True, run_id="new")
    fs.pipe_file(target.staging_path("features/part-0.parquet"), b"new0")
    target.commit()
    assert sorted(fs.find("/eu-bucket/run-1")) == ["/eu-bucket/run-1/_SUCCESS", "/eu-bucket/run-1/features/part-0.parquet"]
    assert fs.cat_file("/eu-bucket/run-1/features/part-0.parquet") == b"new0"
    assert any("/eu-bucket/run-1/features/part-1.parquet" in batch for batch in deleted)

    monkeypatch.setattr(memory_store, "delete_many", lambda fs_, paths: [f"{p} (Refused)" for p in paths][:1])
    again = storage.StagedOutput.open("memory://eu-bucket/run-1", None, overwrite=True, run_id="again")
    fs.pipe_file(again.staging_path("features/part-9.parquet"), b"new9")
    with pytest.raises(OutputError, match=r"memory did not delete .*\(Refused\).*grant nothing \(it is this process's memory\)"):
        again.commit()
    assert fs.cat_file("/eu-bucket/run-1/features/part-0.parquet") == b"new0"  # the previous dataset, put back
    assert fs.exists("/eu-bucket/run-1/_SUCCESS") and not fs.exists("/eu-bucket/run-1/features/part-9.parquet")
