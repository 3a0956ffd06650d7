"""The fork server local workers come from: started early, TensorFlow imported in it, gone
with its client (fruitdask.backends.dask.forkserver, fruitdask.backends.dask.worker_imports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from fruitdask.backends.dask.forkserver import SERVER_ENV

PROBE = '''
import os, sys

def report(queue):
    queue.put({
        "tensorflow": "tensorflow" in sys.modules,
        "vgg16": "keras.src.applications.vgg16" in sys.modules or "keras.applications.vgg16" in sys.modules,
        "distributed": "distributed" in sys.modules,
        "mark": os.environ.get("SERVER_ENV"),
        "setting": os.environ.get("FD_TEST_SETTING"),
    })

def forked_report():
    """What a child forked from this process's fork server reports."""
    import multiprocessing
    ctx = multiprocessing.get_context("forkserver")
    queue = ctx.Queue()
    child = ctx.Process(target=report, args=(queue,))
    child.start()
    seen = queue.get(timeout=120)
    child.join()
    return seen
'''.replace("SERVER_ENV", SERVER_ENV)

CLIENT = '''
import json, multiprocessing, os, sys
from multiprocessing import forkserver as mp_forkserver
from fruitdask.backends.dask import forkserver

os.environ["FD_TEST_SETTING"] = "client"
started = forkserver.start_early({"FD_TEST_SETTING": "server"})
again = forkserver.start_early({"FD_TEST_SETTING": "other"})
client_env = {"setting": os.environ.get("FD_TEST_SETTING"), "mark": os.environ.get("SERVER_ENV")}
import probe
seen = probe.forked_report()
print(json.dumps({"started": started, "again": again, "client_env": client_env, "child": seen,
                  "client_tensorflow": "tensorflow" in sys.modules,
                  "server_pid": mp_forkserver._forkserver._forkserver_pid}))
'''.replace("SERVER_ENV", SERVER_ENV)


def _python(code: str, cwd: Path, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def early_server(tmp_path_factory) -> dict:
    """A client process that started the fork server early and forked one child from it."""
    work = tmp_path_factory.mktemp("forkserver")
    (work / "probe.py").write_text(PROBE)
    done = _python(CLIENT, work)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_children_are_forked_with_tensorflow_imported_and_the_server_environment(early_server):
    seen = early_server["child"]
    assert early_server["started"] is True and early_server["again"] is False  # one server per client
    assert seen["tensorflow"] and seen["vgg16"] and seen["distributed"], seen
    # The server started with the settings it was given; the marker stayed in the server.
    assert seen["setting"] == "server" and seen["mark"] is None, seen


def test_the_client_keeps_its_environment_and_never_imports_tensorflow(early_server):
    assert early_server["client_env"] == {"setting": "client", "mark": None}
    assert early_server["client_tensorflow"] is False


def test_the_server_is_gone_with_its_client(early_server):
    pid = early_server["server_pid"]
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert not alive, f"fork server {pid} outlived its client"


@pytest.mark.parametrize("marked", [False, True])
def test_only_the_marked_server_leaves_with_os_exit(tmp_path, monkeypatch, marked):
    """The preload's quick exit (``os._exit(0)``) is armed by the server's mark alone: a
    process that imports the module for another reason keeps its own exit code."""
    monkeypatch.delenv(SERVER_ENV, raising=False)
    env = {SERVER_ENV: "1"} if marked else {}
    done = _python("import fruitdask.backends.dask.worker_imports, sys; sys.exit(3)", tmp_path, env)
    assert done.returncode == (0 if marked else 3), done.stderr[-2000:]


GATED = '''
import json, multiprocessing, os, sys, time
from multiprocessing import forkserver as mp_forkserver
from fruitdask.backends.dask import forkserver

def maps(pid):
    try:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()
    except OSError:
        return ""

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

# An update's server: everything before TensorFlow, then it waits at its gate.
forkserver.start_early({}, gated=True)
first = mp_forkserver._forkserver._forkserver_pid
deadline = time.monotonic() + 120
while "pyarrow" not in maps(first) and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(1.0)
waited = {"pyarrow": "pyarrow" in maps(first), "tensorflow": "libtensorflow" in maps(first)}
forkserver.close_gate()  # nothing to do: it leaves without TensorFlow
deadline = time.monotonic() + 60
while alive(first) and time.monotonic() < deadline:
    time.sleep(0.05)
left = not alive(first)
# The next run of this process starts a new server; this one's gate opens (the cluster starts).
started_again = forkserver.start_early({}, gated=True)
second = mp_forkserver._forkserver._forkserver_pid
forkserver.open_gate()
import probe
seen = probe.forked_report()
print(json.dumps({"waited": waited, "left": left, "started_again": started_again, "new_server": second != first,
                  "child": seen, "client_tensorflow": "tensorflow" in sys.modules}))
'''


def test_a_gated_server_waits_before_tensorflow_and_leaves_or_goes_on(tmp_path):
    """An update's fork server imports everything but TensorFlow, then waits: told there is
    nothing to do it leaves without TensorFlow; the process's next server, let through when
    its cluster starts, forks workers with TensorFlow imported."""
    (tmp_path / "probe.py").write_text(PROBE)
    done = _python(GATED, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["waited"] == {"pyarrow": True, "tensorflow": False}
    assert got["left"] and got["started_again"] and got["new_server"]
    assert got["child"]["tensorflow"] and got["child"]["distributed"] and not got["client_tensorflow"]
