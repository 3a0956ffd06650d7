"""Issue 23, item 10: the output lock is a lease. A live run renews it; a run killed with
SIGKILL stops renewing, and the next run takes it over (with a log line naming the dead
holder) once it runs out; of two runs taking over together only one wins. On moto's S3
(conditional ``PutObject``) and on local disk (``O_EXCL`` claims and ``os.replace``).

Issue 31, item 6 and the lease items: the lease runs out by the storage's clock (a client
whose clock is 10 minutes ahead takes over no live lease); a holder dead on this host is
taken over at once (its pid gone, or now another process); ``--wait-lock`` waits for a live
holder instead of failing."""

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
from fruitdask.storage import lease, safety, stores

TTL = 3.0  # the shortest lease the configuration allows


def _where(where: str, s3, tmp_path) -> tuple[str, dict | None]:
    if where == "s3":
        s3.bucket("out-euw3", "eu-west-3")
        return "s3://out-euw3/run-1", {"client_kwargs": {"endpoint_url": s3.endpoint}}
    return str(tmp_path / "run-1"), None


def _other_machine(run_id: str, ttl_s: float) -> dict:
    """A lease document written by a run on another machine (its pid means nothing here)."""
    return {**lease.document(run_id, ttl_s), "host": "node-7", "boot_id": "another-boot", "pid": 4242, "pid_start": 99}


def _dead_lock(target: storage.OutputTarget, o: dict | None) -> dict:
    """The lock a run on another machine killed with SIGKILL leaves, once its lease ran out
    by the storage's clock: locally its mtime is set back; S3's ``Last-Modified`` cannot be,
    so the lease is short (0.5 s) and we wait it out (S3 counts whole seconds)."""
    doc = _other_machine("dead0run", TTL if o is None else 0.5)
    storage.write_file(target.lock_url, json.dumps(doc).encode(), o)
    if o is None:
        old = time.time() - TTL - 60
        os.utime(target.lock_url, (old, old))
    else:
        time.sleep(0.5 + 2 * lease.CLOCK_SLACK_S + 0.1)
    return doc


def _lock_doc(target: storage.OutputTarget, o: dict | None) -> dict:
    return json.loads(storage.read_bytes(target.lock_url, o))


@pytest.mark.parametrize("where", ["s3", "local"])
def test_an_expired_lease_is_taken_over_with_a_log_line_naming_the_dead_holder(s3, tmp_path, where, caplog):
    url, o = _where(where, s3, tmp_path)
    target = storage.StagedOutput.open(url, o, overwrite=False, run_id="next", lease_ttl=TTL)
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
    target = storage.StagedOutput.open(url, o, overwrite=False, run_id="next", lease_ttl=TTL)
    doc = _other_machine("alive0run", 60)  # runs out in a minute
    storage.write_file(target.lock_url, json.dumps(doc).encode(), o)
    fs, path = storage.get_fs(target.lock_url, o)
    until = safety._iso(lease.read(fs, path, stores.lookup(url)).expires(TTL))  # its write + 60 s, by the storage
    with pytest.raises(OutputBusyError, match=rf"run alive0run .*lease until {re.escape(until)} by the storage's clock\); "
                       r"this run \(next\) stops: wait for it to finish \(--wait-lock SECONDS waits for it\).*"
                       r"the next run then takes"):
        target.lock()
    assert _lock_doc(target, o) == doc


@pytest.mark.parametrize("where", ["s3", "local"])
def test_of_two_takers_of_one_expired_lease_only_one_wins(s3, tmp_path, where):
    """Both read the dead run's lock; the first conditional write wins, the second finds
    the lock changed and fails, and the lock is the winner's."""
    url, o = _where(where, s3, tmp_path)
    target = storage.StagedOutput.open(url, o, overwrite=False, lease_ttl=TTL)
    _dead_lock(target, o)
    fs, path = storage.get_fs(target.lock_url, o)
    store = stores.lookup(url)
    seen_a, seen_b = lease.read(fs, path, store), lease.read(fs, path, store)
    assert seen_a.expired(TTL) and seen_b.expired(TTL)
    assert lease.replace(fs, path, store, seen_a, lease.document("taker-a", TTL)) is not None
    assert lease.replace(fs, path, store, seen_b, lease.document("taker-b", TTL)) is None
    assert _lock_doc(target, o)["run_id"] == "taker-a"


def test_many_racing_takers_on_local_disk_leave_exactly_one_holder(tmp_path):
    target = storage.StagedOutput.open(str(tmp_path / "run-1"), None, overwrite=False, lease_ttl=TTL)
    _dead_lock(target, None)
    fs, path = storage.get_fs(target.lock_url, None)
    winners, busy = [], []
    start = threading.Barrier(8)

    def take(i: int) -> None:
        start.wait()
        try:
            safety.acquire_lease(fs, path, stores.LOCAL, target.url, target.lock_url, f"taker-{i}", TTL)
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
    first = storage.StagedOutput.open(url, o, overwrite=False, run_id="alive", lease_ttl=TTL)
    second = storage.StagedOutput.open(url, o, overwrite=False, run_id="second", lease_ttl=TTL)
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
    stalled = storage.StagedOutput.open(url, o, overwrite=False, run_id="stalled", lease_ttl=TTL)
    taker = storage.StagedOutput.open(url, o, overwrite=False, run_id="taker", lease_ttl=TTL)
    with pytest.raises(OutputBusyError, match="being written by run taker"):
        with storage.committed(stalled):
            stalled.write_bytes("run.json", b'{"run": "stalled"}')
            stalled._heartbeat.stop()  # a run frozen longer than its lease (a stopped VM, a debugger)
            time.sleep(TTL + 2 * lease.CLOCK_SLACK_S + 0.2)  # by the storage's clock, in whole seconds on S3
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
def test_a_run_killed_with_sigkill_leaves_a_lock_the_next_run_takes_over_at_once(tmp_path, weights_file):
    """The default 180 s lease, and no wait: the killed run held the lock on this host and
    its pid is gone, so the next run takes the lock over at once. Fails on the code before
    issue 31 (the next run stopped as busy for the whole lease)."""
    images = copy_images(BUNDLED, tmp_path / "in", 6, 10)
    out = tmp_path / "out"
    lock = tmp_path / ".out.fruitdask-lock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRUITDASK_STORAGE_LOCK")}
    env = {**env, **TF_ENV, "PYTHONPATH": str(REPO)}
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
    assert dead["pid"] == proc.pid and dead["ttl_s"] == lease.DEFAULT_TTL_S and not out.exists()
    again = subprocess.run([*python, *_run_cmd(images, out, weights_file)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert re.search(rf"took over the output lock \S+ from run {dead['run_id']} \(host {dead['host']}, pid {dead['pid']}, "
                     rf"since .*\), at once: its process is gone \(pid {dead['pid']} is not running on this host\)",
                     again.stderr), again.stderr
    assert (out / "_SUCCESS").exists() and not lock.exists()


def test_a_locked_target_travels_to_workers_without_its_heartbeat(tmp_path):
    target = storage.StagedOutput.open(str(tmp_path / "run-1"), None, overwrite=False, lease_ttl=TTL)
    with storage.committed(target):
        copy = pickle.loads(pickle.dumps(target))
        assert copy.staging == target.staging and not copy.locked and copy._heartbeat is None
        copy.write_bytes("run.json", b"{}")
        copy.unlock()  # a copy never releases the lock of the run
        assert _lock_doc(target, None)["run_id"] == target.run_id
    assert (tmp_path / "run-1" / "run.json").read_bytes() == b"{}"


# --- issue 31: the storage's clock, a dead holder on this host, --wait-lock ----------------

#: A second client, in its own process, whose clock runs ``SKEW`` seconds ahead: it tries to
#: take the lock and prints what happened as JSON.
SKEWED_TAKER = """
import json, sys, time
skew = float(sys.argv[3])
real = time.time
time.time = lambda: real() + skew
from fruitdask import storage
from fruitdask.errors import OutputBusyError
o = json.loads(sys.argv[2])
target = storage.OutputTarget.for_update(sys.argv[1], o, run_id="skewed", lease_ttl=180)
try:
    target.lock()
except OutputBusyError as e:
    print(json.dumps({"taken": False, "error": str(e)}))
else:
    target.unlock()
    print(json.dumps({"taken": True}))
"""


def _skewed_take(url: str, o: dict | None, skew: float, cwd) -> dict:
    proc = subprocess.run([sys.executable, "-c", SKEWED_TAKER, url, json.dumps(o), str(skew)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_client_whose_clock_runs_10_minutes_ahead_takes_over_no_live_lease(s3, tmp_path, where):
    """A live lease (another machine, 60 s, just written) stays its holder's for a taker
    whose clock is 600 s ahead: the expiry is the lock's last write by the storage's clock
    plus its TTL, against the storage's "now". Fails on the code before issue 31 (it
    compared the holder's ``expires_at`` with the taker's clock, took the lock over, and the
    live run then failed at its commit). The same taker does take over once the lease has
    run out by the storage's clock."""
    url, o = _where(where, s3, tmp_path)
    target = storage.OutputTarget.for_update(url, o, run_id="unused")
    live = _other_machine("alive0run", 60)
    storage.write_file(target.lock_url, json.dumps(live).encode(), o)
    seen = _skewed_take(url, o, 600, tmp_path)
    assert seen["taken"] is False and "being written by run alive0run" in seen["error"], seen
    assert _lock_doc(target, o) == live

    dead = _dead_lock(target, o)
    assert _skewed_take(url, o, 600, tmp_path) == {"taken": True}
    assert not _lock_left(url, o) and dead["run_id"] == "dead0run"


_HOLDER = """
import sys, time
from fruitdask import storage
target = storage.OutputTarget.for_update(sys.argv[1], None, run_id="holder", lease_ttl=180)
target.lock()
print("held", flush=True)
time.sleep(600)
"""


def test_a_holder_killed_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    """A process holding the lock (the default 180 s lease) is respected while it lives; once
    SIGKILLed, the next take succeeds at once (no wait: ``lock_wait`` is 0) with a log line.
    Fails on the code before issue 31 (busy until the lease ran out)."""
    url = str(tmp_path / "run-1")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, url], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        doc = _lock_doc(storage.OutputTarget.for_update(url, None), None)
        assert (doc["pid"], doc["pid_start"]) == (holder.pid, lease.process_start(holder.pid))
        nxt = storage.OutputTarget.for_update(url, None, run_id="next")
        with pytest.raises(OutputBusyError, match="being written by run holder"):
            nxt.lock()  # alive: its lease is the rule
        holder.kill()
        holder.wait(timeout=30)
        with caplog.at_level(logging.WARNING):
            nxt.lock()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()
    assert _lock_doc(nxt, None)["run_id"] == "next"
    assert re.search(rf"took over the output lock \S+ from run holder \(host \S+, pid {holder.pid}, since .*\), at once: "
                     rf"its process is gone \(pid {holder.pid} is not running on this host\): that run is dead", caplog.text)
    nxt.unlock()


def test_a_pid_now_worn_by_another_process_or_namespace(tmp_path, caplog):
    """The holder's pid alive but with another start time (a pid reused, pid 1 of a restarted
    container): taken over at once. The same pid and start time: alive, respected. A lock
    from another pid namespace with the same hostname (another container): its pid means
    nothing here, so only its lease counts. Fails on the code before issue 31 (no start
    time, no takeover before the lease ran out)."""
    target = storage.OutputTarget.for_update(str(tmp_path / "run-1"), None, run_id="next")
    fs, path = storage.get_fs(target.lock_url, None)
    me = lease.document("same-process", 180)
    assert me["pid"] == os.getpid() and me["pid_start"] == lease.process_start(os.getpid()) and me["boot_id"]
    for doc in (me, {**me, "run_id": "other-container", "pid_ns": "pid:[1]"}):
        storage.write_file(target.lock_url, json.dumps(doc).encode(), None)
        with pytest.raises(OutputBusyError, match=f"being written by run {doc['run_id']}"):
            target.lock()
    reused = {**me, "run_id": "reused", "pid_start": me["pid_start"] - 1}
    storage.write_file(target.lock_url, json.dumps(reused).encode(), None)
    with caplog.at_level(logging.WARNING):
        held = safety.acquire_lease(fs, path, stores.LOCAL, target.url, target.lock_url, "next", 180)
    assert held.doc["run_id"] == "next" == _lock_doc(target, None)["run_id"]
    assert f"pid {me['pid']} is now another process (started at tick {me['pid_start']}" in caplog.text


@pytest.mark.parametrize("where", ["s3", "local"])
def test_wait_lock_waits_for_a_live_holder_and_says_how_long_it_waited(s3, tmp_path, where):
    """With ``lock_wait`` (``--wait-lock``) a run waits for the holder to finish instead of
    stopping; a holder that outlives the wait still stops it, naming the wait. Fails on the
    code before issue 31 (no wait)."""
    url, o = _where(where, s3, tmp_path)
    first = storage.StagedOutput.open(url, o, overwrite=False, run_id="first", lease_ttl=TTL)
    patient = storage.OutputTarget.for_update(url, o, run_id="patient", lease_ttl=TTL, lock_wait=1.5)
    first.lock()
    try:
        with pytest.raises(OutputBusyError, match=r"run first .*this run \(patient\) stops after waiting 1.5 s \(--wait-lock\)"):
            patient.lock()
        releaser = threading.Timer(1.0, first.unlock)
        releaser.start()
        patient = storage.OutputTarget.for_update(url, o, run_id="patient", lease_ttl=TTL, lock_wait=60)
        patient.lock()
        releaser.join()
    finally:
        first.unlock()
    assert _lock_doc(patient, o)["run_id"] == "patient"
    patient.unlock()
    assert not _lock_left(url, o)


def test_wait_lock_is_a_run_flag_and_refuses_a_negative_wait():
    cfg = build_config({"input": "i", "output": "o", "storage_lock_wait": 30.0}, {})
    assert cfg.storage.lock_wait == 30.0
    assert build_config({"input": "i", "output": "o"}, {"FRUITDASK_STORAGE_LOCK_WAIT": "5"}).storage.lock_wait == 5.0
    assert build_config({"input": "i", "output": "o"}, {}).storage.lock_wait == 0.0
    with pytest.raises(ConfigError, match="--wait-lock must be 0 or more seconds, got -1"):
        build_config({"input": "i", "output": "o", "storage_lock_wait": -1.0}, {})


def test_run_wait_lock_as_typed_waits_then_stops_naming_the_wait(tmp_path, tiny_images):
    """``fruitdask run --wait-lock 2`` meeting a live holder (this test's process) waits
    2 s, then stops with exit 1 in one line that names the holder and the wait; it never
    touched the output. Fails on the code before issue 31 (no such flag: exit 2)."""
    holder = storage.OutputTarget.for_update(str(tmp_path / "out"), None, run_id="daily0run")
    holder.lock()
    try:
        done = subprocess.run([sys.executable, "-m", "fruitdask", "run", "--input", str(tiny_images), "--output", "out",
                               "--wait-lock", "2", "--weights", "random", "--precision", "float32",
                               "--image-size", str(SMALL_SIZE)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, **TF_ENV, "PYTHONPATH": str(REPO)})
        assert _lock_doc(holder, None)["run_id"] == "daily0run"
    finally:
        holder.unlock()
    assert done.returncode == 1, done.stderr
    err = [line for line in done.stderr.splitlines() if line.startswith("fruitdask: error")]
    assert len(err) == 1 and "is being written by run daily0run" in err[0], done.stderr
    assert "stops after waiting 2 s (--wait-lock)" in err[0]
    assert "output out is locked by run daily0run: waiting up to 2 s for it (--wait-lock)" in done.stderr
    assert not (tmp_path / "out").exists()
