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
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Mapping

logger = logging.getLogger(__name__)

#: The fork server's preload: one module that imports what every worker needs.
PRELOAD = ["fruitdask.backends.dask.worker_imports"]
#: Set in the fork server's environment only: tells the preload it runs in that server.
SERVER_ENV = "FRUITDASK_FORK_SERVER"


def start_early(env: Mapping[str, str]) -> bool:
    """Start the fork server now (it imports in the background), unless one runs already.

    Returns whether this call started it. The environment of the server is this
    process's, updated with ``env`` (only for the server: this process's own environment
    is left as it was).
    """
    from multiprocessing import forkserver

    # The process-wide server multiprocessing forks from (CPython 3.10 to 3.13 alike). If a
    # Python lacks it, Dask starts its own server with the cluster, as before.
    server = getattr(forkserver, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", 0) is not None:
        return False
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    env = {**env, SERVER_ENV: "1"}
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
    logger.debug("fork server started early (pid %s), preloading %s", server._forkserver_pid, PRELOAD)
    return True
