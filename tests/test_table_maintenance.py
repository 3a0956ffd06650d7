"""Issue 31, item 5: ``fruitdask table compact`` and ``table vacuum`` take the output's lease
(a run meeting them, or they meeting a run, stop cleanly or wait with ``--wait-lock``); a
compaction carries the description of the newest version, read under the lease; vacuum
runs delta-rs' *full* mode, so the files a killed run left (named by no commit) go once
older than the retention; ``--retain-hours`` refuses a fraction instead of truncating it.

One real ``fruitdask run`` (32 px, 6 images, 3 data files) makes the table, copied for each
test; the commands run as a user types them, in a subprocess, from another folder, with a
relative path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED, REPO, SMALL_SIZE, copy_images, read_features

from fruitdask import storage
from fruitdask.config import TF_ENV
from fruitdask.lake import table as delta

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRUITDASK_STORAGE_LOCK")}
    return {**env, **TF_ENV, "PYTHONPATH": str(REPO)}


def fruitdask(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fruitdask", *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def made_by_a_run(tmp_path_factory, weights_file) -> Path:
    """The output of one real run: a table at version 0 with 3 data files."""
    root = tmp_path_factory.mktemp("table")
    copy_images(BUNDLED, root / "in", 2, 3)
    done = fruitdask(root, "run", "--input", "in", "--output", "out", "--image-size", str(SMALL_SIZE), "--weights",
                     str(weights_file), "--workers", "1", "--threads-per-worker", "1", "--partition-size", "2",
                     "--precision", "float32", "--quiet")
    assert done.returncode == 0, done.stderr
    assert len(delta.load(str(root / "out"), {}).file_uris()) == 3
    return root / "out"


@pytest.fixture
def out(made_by_a_run, tmp_path) -> Path:
    """A copy of the run's output in this test's folder (the tests change it)."""
    dest = tmp_path / "out"
    shutil.copytree(made_by_a_run, dest)
    return dest


def plant_orphan(out: Path, name: str, age_s: float) -> Path:
    """A data file no commit names, as a run killed before its commit leaves it, ``age_s`` old."""
    features = out / "features"
    orphan = features / f"part-{name}-p00000.parquet"
    shutil.copy(sorted(features.glob("part-*.parquet"))[0], orphan)
    then = time.time() - age_s
    os.utime(orphan, (then, then))
    return orphan


def committed_files(out: Path) -> set[str]:
    return {Path(u).name for u in delta.load(str(out), {}).file_uris()}


def test_vacuum_deletes_the_files_of_a_killed_run_once_older_than_the_retention(out, tmp_path):
    """Fails on the code before issue 31: delta-rs' default (lite) vacuum only deletes files
    a commit removed, so the killed run's files stayed for ever."""
    old, young = plant_orphan(out, "killedrun", 3 * 3600), plant_orphan(out, "younger", 600)
    kept, rows = committed_files(out), len(read_features(out))

    dry = fruitdask(tmp_path, "table", "vacuum", "out", "--retain-hours", "1", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {"dry_run": True, "retain_hours": 1, "files": [old.name]} and old.exists()

    done = fruitdask(tmp_path, "table", "vacuum", "out", "--retain-hours", "1", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"dry_run": False, "retain_hours": 1, "files": [old.name]}
    assert "deleted 1 files no version of the last 1 hours needs" in done.stderr
    assert not old.exists() and young.exists(), "older than the retention goes; younger stays (a live run's, maybe)"
    assert committed_files(out) == kept and all((out / "features" / f).exists() for f in kept)
    assert len(read_features(out)) == rows
    assert not (tmp_path / ".out.fruitdask-lock").exists(), "the lease is released"


def test_retain_hours_refuses_a_fraction_instead_of_truncating_it(out, tmp_path):
    """``--retain-hours 0.5`` became 0 (``int(0.5)``) before issue 31: exit 0, and with the
    full vacuum every file no version names would go, the 10-minute-old ones included. Now
    it is refused (exit 2, a configuration error) with the fix, and nothing is deleted.
    Fails on the code before issue 31 (exit 0)."""
    young = plant_orphan(out, "younger", 600)
    done = fruitdask(tmp_path, "table", "vacuum", "out", "--retain-hours", "0.5")
    assert done.returncode == 2, done.stderr  # a configuration error
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "--retain-hours must be a whole number of hours, 0 or more, got 0.5" in err[0]
    assert "pass 1" in err[0] and young.exists()
    assert not (tmp_path / ".out.fruitdask-lock").exists()


def _hold(out: Path, run_id: str) -> storage.OutputTarget:
    """The output's lock, held by a live "run" (this test's process) with its heartbeat."""
    target = storage.OutputTarget.for_update(str(out), {}, run_id=run_id)
    target.lock()
    return target


def test_compact_and_vacuum_stop_at_a_live_run_s_lock_and_name_wait_lock(out, tmp_path):
    """Fails on the code before issue 31: both ran beside the live run; the compaction's
    commit made the run's own commit fail (ConcurrentRunError), and its work was lost."""
    orphan = plant_orphan(out, "killedrun", 3 * 3600)
    holder = _hold(out, "live0run")
    try:
        for args in (("compact",), ("vacuum", "--retain-hours", "0")):
            done = fruitdask(tmp_path, "table", *args, "out")
            assert done.returncode == 1, (args, done.stdout, done.stderr)
            err = done.stderr.strip().splitlines()
            assert len(err) == 1 and "is being written by run live0run" in err[0], err
            assert "--wait-lock SECONDS waits for it" in err[0] and f"this run (table-{args[0]}-" in err[0]
        assert delta.load(str(out), {}).version() == 0 and orphan.exists()
    finally:
        holder.unlock()


def test_a_compaction_waiting_for_a_run_carries_that_run_s_description(out, tmp_path):
    """A run holds the lock and has read the table (version 0); ``table compact --wait-lock``
    waits; the run commits version 1 with its description and releases; the compaction then
    reads version 1 and commits version 2 carrying the run's description. Fails on the code
    before issue 31 (no --wait-lock; and without the lease the compaction committed first,
    with version 0's description, and the run's commit failed)."""
    holder = _hold(out, "run-two")
    state = delta.open_table(str(out), {})  # as a run reads the table right after taking the lock
    compact = subprocess.Popen([sys.executable, "-m", "fruitdask", "table", "compact", "out", "--json", "--wait-lock", "120"],
                               cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = compact.stderr.readline()
        assert "output out is locked by run run-two: waiting up to 120 s for it (--wait-lock)" in first, first
        assert delta.commit(state, [], [], {**state.meta, "run_id": "run-two"}, row_keys=np.zeros(0, "S16")) == 1
        holder.unlock()
        stdout, stderr = compact.communicate(timeout=300)
    finally:
        holder.unlock()
        if compact.poll() is None:
            compact.kill()
            compact.wait()
    assert compact.returncode == 0, first + stderr
    assert json.loads(stdout)["numFilesRemoved"] == 3
    newest, run_two = delta.history(str(out), {})[:2]
    assert (newest["version"], run_two["version"]) == (2, 1)
    assert newest["fruitdask"] == {**run_two["fruitdask"], "operation": "compact"}
    assert newest["fruitdask"]["run_id"] == "run-two" != state.meta["run_id"]
    assert not (tmp_path / ".out.fruitdask-lock").exists()


def test_on_s3_vacuum_waits_for_the_lease_then_deletes_what_no_version_names(made_by_a_run, s3, tmp_path):
    """The run's table uploaded to moto's S3 with an object no commit names (a killed run's
    part): ``table vacuum`` stops at a live holder's lease (the lock beside the output on S3),
    and once it is released deletes that object and nothing a version needs. Fails on the
    code before issue 31 (no lease taken; lite vacuum keeps the object)."""
    s3.bucket("fruits-table", "eu-west-3")
    url = s3.upload(made_by_a_run, "s3://fruits-table/features/run-1")
    kept = set(s3.objects())
    orphan = "fruits-table/features/run-1/features/part-killedrun-p00000.parquet"
    s3.fs.pipe_file(orphan, (made_by_a_run / "features" / sorted(
        p.name for p in (made_by_a_run / "features").glob("part-*.parquet"))[0]).read_bytes())
    vacuum = ("table", "vacuum", url, "--retain-hours", "0", "--json", "--s3-endpoint", s3.endpoint)
    holder = storage.OutputTarget.for_update(url, s3.storage_options, run_id="live0run")
    holder.lock()
    try:
        busy = fruitdask(tmp_path, *vacuum)
        assert busy.returncode == 1 and "is being written by run live0run" in busy.stderr, busy.stderr
        assert orphan in s3.objects()
    finally:
        holder.unlock()
    done = fruitdask(tmp_path, *vacuum)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"] == ["part-killedrun-p00000.parquet"]
    now = set(s3.objects())
    assert orphan not in now and kept <= now, "the orphan gone, every committed file kept"
    assert all("/_delta_log/" in o for o in now - kept), "only the vacuum's own commits added (no lock left)"
    assert len(read_features(url, s3.storage_options)) == len(read_features(made_by_a_run))
