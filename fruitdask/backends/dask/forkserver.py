"""The fork server that local workers are forked from, started early, TensorFlow imported.

A local cluster's workers are forked from Python's fork server (see
:data:`fruitdask.backends.dask.cluster.LOCAL_START_METHOD`). Left to Dask, that server
starts with the cluster, imports ``distributed`` and its dependencies there, and every
worker then imports TensorFlow itself: about 4 s of imports on the critical path of a
run, after the client's own imports and before the first image.

:func:`start_early` starts it as the command starts instead, with
:mod:`fruitdask.backends.dask.worker_imports` as its preload: ``distributed``, pandas,
pyarrow, Pillow and TensorFlow with Keras' VGG16 are imported in the server while the
client imports, reads the weights and starts the scheduler on the other core; a worker
forked from it only builds its graph. Importing TensorFlow starts none of its runtime
(no session, no thread pool; the one thread the import adds is SciPy's idle OpenBLAS
server, like numpy's, which OpenBLAS's own fork handlers look after), so forking after
the import is safe; the graph, which starts the runtime, is built in each worker after
the fork. Measured (``benchmarks/cluster_lifecycle.py`` and the bench in
docs/architecture-review.md): a forked worker runs VGG16 at the same rate as a spawned
one, and its model is ready about 2 s sooner in a 120-image run on 2 cores.

The server is one per client process and keeps the environment it started with, so it
is started with TensorFlow's settings (:data:`fruitdask.config.TF_ENV`), which only
matter at import time, and each worker still receives the client's environment of the
moment it starts (see :func:`fruitdask.backends.dask.cluster.start_local_cluster`).

**Gated start, for updates.** An update must not import TensorFlow before its listing says
there is work (a run with nothing to do imports none), yet its cluster start is the fork
server's imports. So an update starts the server *gated*: it imports ``distributed``,
pandas, pyarrow and Pillow at once, then waits at a gate file (:data:`GATE_ENV`) before
TensorFlow. :func:`open_gate` (the cluster starts) lets it go on; :func:`close_gate`
(nothing to do, or the run failed first) makes it leave without importing TensorFlow, as it
does when its client is gone. An update's cluster is up about 0.5 s sooner.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Mapping

logger = logging.getLogger(__name__)

#: The fork server's preload: one module that imports what every worker needs.
PRELOAD = ["fruitdask.backends.dask.worker_imports"]
#: Set in the fork server's environment only: tells the preload it runs in that server.
SERVER_ENV = "FRUITDASK_FORK_SERVER"
#: Set in a gated server's environment only: the file it waits for before TensorFlow.
GATE_ENV = "FRUITDASK_FORK_GATE"
#: Set in the fork server's environment only: the run's inference runtime, whose library it preloads.
RUNTIME_ENV = "FRUITDASK_FORK_RUNTIME"
#: What the gate file says: go on to TensorFlow, or leave.
GO, STOP = "go", "stop"

_gate: dict = {}  # this client's gate while its server waits at it: {"path", "pid"}
_stopped: list[int] = []  # servers told to leave, not yet reaped


def start_early(env: Mapping[str, str], *, gated: bool = False) -> bool:
    """Start the fork server now (it imports in the background), unless one runs already.

    Returns whether this call started it. The environment of the server is this
    process's, updated with ``env`` (only for the server: this process's own environment
    is left as it was). ``gated``: the server stops before TensorFlow until
    :func:`open_gate` (module docstring).
    """
    from multiprocessing import forkserver

    # The process-wide server multiprocessing forks from (CPython 3.10 to 3.13 alike). If a
    # Python lacks it, Dask starts its own server with the cluster, as before.
    server = getattr(forkserver, "_forkserver", None)
    _reap_stopped(server)
    if server is None or getattr(server, "_forkserver_pid", 0) is not None:
        return False
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    env = {**env, SERVER_ENV: "1"}
    if gated:
        gate_dir = tempfile.mkdtemp(prefix="fruitdask-gate-")
        env[GATE_ENV] = os.path.join(gate_dir, "gate")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        server.ensure_running()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if gated:
        _gate.update(path=env[GATE_ENV], pid=server._forkserver_pid)
        atexit.register(close_gate)
    logger.debug("fork server started early (pid %s%s), preloading %s", server._forkserver_pid,
                 ", gated" if gated else "", PRELOAD)
    return True


def open_gate() -> None:
    """Let a gated server import TensorFlow (a no-op when none waits)."""
    _release(GO)


def close_gate() -> None:
    """Make a gated server leave without importing TensorFlow (a no-op when none waits or
    it was let through); a later :func:`start_early` in this process starts a new one."""
    pid = _gate.get("pid")
    if _release(STOP) and pid:
        _stopped.append(pid)


def _release(word: str) -> bool:
    if not _gate:
        return False
    path = _gate.pop("path")
    _gate.clear()
    try:
        with open(path + ".tmp", "w") as f:
            f.write(word)
        os.replace(path + ".tmp", path)  # the server never reads half a word
    except OSError as e:  # its folder gone: the server left already (its client seemed gone)
        logger.debug("fork server gate %s: %s", path, e)
    return True


def _reap_stopped(server) -> None:
    """Wait for the servers told to leave (they leave once their first imports end) and make
    multiprocessing forget them, as it forgets a server it finds dead."""
    while _stopped:
        pid = _stopped.pop()
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # reaped already
            pass
        if server is not None and getattr(server, "_forkserver_pid", None) == pid:
            os.close(server._forkserver_alive_fd)
            server._forkserver_address = server._forkserver_alive_fd = server._forkserver_pid = None


def wait_at_gate(path: str, poll_s: float = 0.01) -> None:
    """In the gated server: return once the gate says :data:`GO`; leave (``os._exit``) when
    it says :data:`STOP` or the client is gone."""
    import time

    parent = os.getppid()
    while True:
        try:
            with open(path) as f:
                word = f.read()
        except FileNotFoundError:
            word = ""
        if word == GO:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
            return
        if word == STOP or os.getppid() != parent:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
            os._exit(0)
        time.sleep(poll_s)
