"""Issue 23, item 10: the output lock is a lease. A live run renews it; a run killed with
SIGKILL stops renewing, and the next run takes it over (with a log line naming the dead
holder) once it runs out; of two runs taking over together only one wins. On moto's S3
(conditional ``PutObject``) and on local disk (``O_EXCL`` claims and ``os.replace``)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import BUNDLED, REPO, SMALL_SIZE, copy_images

from fruitdask import storage
from fruitdask.config import TF_ENV, build_config
from fruitdask.errors import ConfigError, OutputBusyError
from fruitdask.storage import lease, safety

TTL = 3.0  # the shortest lease the configuration allows


def _where(where: str, s3, tmp_path) -> tuple[str, dict | None]:
    if where == "s3":
        s3.bucket("out-euw3", "eu-west-3")
        return "s3://out-euw3/run-1", {"client_kwargs": {"endpoint_url": s3.endpoint}}
    return str(tmp_path / "run-1"), None


def _dead_lock(target: storage.OutputTarget, o: dict | None, expired_ago: float = 5.0) -> dict:
    """The lock a run killed with SIGKILL leaves: its lease ran out ``expired_ago`` s ago."""
    doc = {**lease.document("dead0run", TTL), "host": "node-7", "pid": 4242}
    doc["expires_at"] = lease._iso(time.time() - expired_ago)
    storage.write_file(target.lock_url, json.dumps(doc).encode(), o)
    return doc


def _lock_doc(target: storage.OutputTarget, o: dict | None) -> dict:
    return json.loads(storage.read_bytes(target.lock_url, o))


@pytest.mark.parametrize("where", ["s3", "local"])
def test_an_expired_lease_is_taken_over_with_a_log_line_naming_the_dead_holder(s3, tmp_path, where, caplog):
    url, o = _where(where, s3, tmp_path)
    target = storage.OutputTarget.open(url, o, overwrite=False, run_id="next", lease_ttl=TTL)
    _dead_lock(target, o)
    with caplog.at_level(logging.WARNING), storage.committed(target):
        assert _lock_doc(target, o)["run_id"] == "next"
        target.write_bytes("run.json", b"{}")
    assert re.search(r"took over the output lock .*fruitdask-lock from run dead0run \(host node-7, pid 4242, since .*\), "
                     r"whose lease ran out at .* without renewal", caplog.text), caplog.text
    assert storage.read_bytes(storage.join(url, "_SUCCESS"), o) == b""
    assert storage.read_bytes(storage.join(url, "run.json"), o) == b"{}"
    assert not _lock_left(url, o)


def _lock_left(url: str, o: dict | None) -> bool:
    fs, path = storage.get_fs(url, o)
    parent = path.rsplit("/", 1)[0]
    fs.invalidate_cache(parent)
    return any("fruitdask-lock" in p for p in fs.ls(parent, detail=False))


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_live_lease_is_busy_and_says_when_it_runs_out(s3, tmp_path, where):
    url, o = _where(where, s3, tmp_path)
    target = storage.OutputTarget.open(url, o, overwrite=False, run_id="next", lease_ttl=TTL)
    doc = _dead_lock(target, o, expired_ago=-60)  # runs out in a minute
    with pytest.raises(OutputBusyError, match=rf"run dead0run .*lease until {re.escape(doc['expires_at'])}.*the next run then takes"):
        target.lock()
    assert _lock_doc(target, o) == doc


@pytest.mark.parametrize("where", ["s3", "local"])
def test_of_two_takers_of_one_expired_lease_only_one_wins(s3, tmp_path, where):
    """Both read the dead run's lock; the first conditional write wins, the second finds
    the lock changed and fails, and the lock is the winner's."""
    url, o = _where(where, s3, tmp_path)
    target = storage.OutputTarget.open(url, o, overwrite=False, lease_ttl=TTL)
    _dead_lock(target, o)
    fs, path = storage.get_fs(target.lock_url, o)
    remote = where == "s3"
    seen_a, seen_b = lease.read(fs, path, remote), lease.read(fs, path, remote)
    assert seen_a.expired(TTL) and seen_b.expired(TTL)
    assert lease.replace(fs, path, remote, seen_a, lease.document("taker-a", TTL)) is not None
    assert lease.replace(fs, path, remote, seen_b, lease.document("taker-b", TTL)) is None
    assert _lock_doc(target, o)["run_id"] == "taker-a"


def test_many_racing_takers_on_local_disk_leave_exactly_one_holder(tmp_path):
    target = storage.OutputTarget.open(str(tmp_path / "run-1"), None, overwrite=False, lease_ttl=TTL)
    _dead_lock(target, None)
    fs, path = storage.get_fs(target.lock_url, None)
    winners, busy = [], []
    start = threading.Barrier(8)

    def take(i: int) -> None:
        start.wait()
        try:
            safety.acquire_lease(fs, path, False, target.url, target.lock_url, f"taker-{i}", TTL)
            winners.append(i)
        except OutputBusyError:
            busy.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(busy) == 7
    assert _lock_doc(target, None)["run_id"] == f"taker-{winners[0]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run-1.fruitdask-lock"]  # no claim left behind


@pytest.mark.parametrize("where", ["s3", "local"])
def test_the_heartbeat_keeps_a_live_run_s_lease(s3, tmp_path, where):
    url, o = _where(where, s3, tmp_path)
    first = storage.OutputTarget.open(url, o, overwrite=False, run_id="alive", lease_ttl=TTL)
    second = storage.OutputTarget.open(url, o, overwrite=False, run_id="second", lease_ttl=TTL)
    with storage.committed(first):
        taken = _lock_doc(first, o)
        time.sleep(2 * TTL)  # twice the lease: without renewal it would have run out
        renewed = _lock_doc(first, o)
        assert renewed["run_id"] == "alive" and renewed["expires_at"] > taken["expires_at"]
        with pytest.raises(OutputBusyError, match="being written by run alive"):
            second.lock()
        first.write_bytes("run.json", b"{}")
    assert storage.read_bytes(storage.join(url, "_SUCCESS"), o) == b""


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_run_whose_lease_ran_out_and_was_taken_over_commits_nothing(s3, tmp_path, where, caplog):
    url, o = _where(where, s3, tmp_path)
    stalled = storage.OutputTarget.open(url, o, overwrite=False, run_id="stalled", lease_ttl=TTL)
    taker = storage.OutputTarget.open(url, o, overwrite=False, run_id="taker", lease_ttl=TTL)
    with pytest.raises(OutputBusyError, match="being written by run taker"):
        with storage.committed(stalled):
            stalled.write_bytes("run.json", b'{"run": "stalled"}')
            stalled._heartbeat.stop()  # a run frozen longer than its lease (a stopped VM, a debugger)
            time.sleep(TTL + 0.5)
            taker.lock()
    assert "lost the output lock" in caplog.text
    assert storage.list_files(url, o) == []
    assert _lock_doc(taker, o)["run_id"] == "taker"  # not the stalled run's to delete
    taker.unlock()


def test_lock_ttl_is_configurable_through_the_environment():
    cfg = build_config({"input": "i", "output": "o"}, {"FRUITDASK_STORAGE_LOCK_TTL": "7.5"})
    assert cfg.storage.lock_ttl == 7.5
    assert build_config({"input": "i", "output": "o"}, {}).storage.lock_ttl == lease.DEFAULT_TTL_S == 180.0
    with pytest.raises(ConfigError, match="FRUITDASK_STORAGE_LOCK_TTL must be at least 3"):
        build_config({"input": "i", "output": "o"}, {"FRUITDASK_STORAGE_LOCK_TTL": "0"})


def _run_cmd(images, out, weights_file) -> list[str]:
    return ["run", "--input", str(images), "--output", str(out), "--image-size", str(SMALL_SIZE), "--weights",
            str(weights_file), "--workers", "1", "--threads-per-worker", "1", "--partition-size", "2"]


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_killed_with_sigkill_leaves_a_lock_the_next_run_takes_over(tmp_path, weights_file):
    images = copy_images(BUNDLED, tmp_path / "in", 6, 10)
    out = tmp_path / "out"
    lock = tmp_path / ".out.fruitdask-lock"
    env = {**os.environ, **TF_ENV, "PYTHONPATH": str(REPO), "FRUITDASK_STORAGE_LOCK_TTL": str(TTL)}
    python = [sys.executable, "-m", "fruitdask"]
    proc = subprocess.Popen([*python, *_run_cmd(images, out, weights_file)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock.exists() and proc.poll() is None, "the run never held its lock"
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its cluster's processes, no cleanup
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    dead = json.loads(lock.read_text())
    assert dead["pid"] == proc.pid and not out.exists()
    # The next run finds the lock; it takes it over once the dead run's lease has run out.
    time.sleep(max(0.0, lease.Held(dead, "", 0).expires(TTL) - time.time()) + 0.5)
    again = subprocess.run([*python, *_run_cmd(images, out, weights_file)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert re.search(rf"took over the output lock \S+ from run {dead['run_id']} \(host {dead['host']}, pid {dead['pid']}, "
                     r"since .*\), whose lease ran out at .* without renewal", again.stderr), again.stderr
    assert (out / "_SUCCESS").exists() and not lock.exists()


def test_a_locked_target_travels_to_workers_without_its_heartbeat(tmp_path):
    target = storage.OutputTarget.open(str(tmp_path / "run-1"), None, overwrite=False, lease_ttl=TTL)
    with storage.committed(target):
        copy = pickle.loads(pickle.dumps(target))
        assert copy.staging == target.staging and not copy.locked and copy._heartbeat is None
        copy.write_bytes("run.json", b"{}")
        copy.unlock()  # a copy never releases the lock of the run
        assert _lock_doc(target, None)["run_id"] == target.run_id
    assert (tmp_path / "run-1" / "run.json").read_bytes() == b"{}"
