"""What every local worker imports, imported once in the fork server it is forked from.

The preload of :mod:`fruitdask.backends.dask.forkserver`: never imported by the client. The
run's inference runtime (:data:`~fruitdask.backends.dask.forkserver.RUNTIME_ENV`, TensorFlow
by default) imports its library here (:attr:`fruitdask.features.runtimes.RuntimeEntry.preload`).
A failed import is logged and left to the worker, which imports again and reports it
where it runs (a preload that raises would stop the fork server, and every worker with it).

The server leaves with ``os._exit`` once its client is gone, as its children do: it
only ever imported modules, and unwinding an interpreter that imported TensorFlow takes
about a second of CPU after the run has ended.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

from fruitdask.backends.dask.forkserver import GATE_ENV, RUNTIME_ENV, SERVER_ENV, wait_at_gate

logger = logging.getLogger(__name__)


def _leave_now() -> None:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


# Only in the server that fruitdask started (the marks are not passed on to its workers).
_gate = os.environ.pop(GATE_ENV, None)
_runtime = os.environ.pop(RUNTIME_ENV, None)
if os.environ.pop(SERVER_ENV, None) == "1":
    atexit.register(_leave_now)
else:
    _gate = None

try:
    import distributed  # noqa: F401 - what Dask's own fork-server preload imports
    import pandas  # noqa: F401
    import PIL.Image  # noqa: F401
    import pyarrow  # noqa: F401

    import fruitdask.features.frames  # noqa: F401

    if _gate:  # an update's server: TensorFlow only once the run has work (forkserver docstring)
        wait_at_gate(_gate)
    from fruitdask.features import runtimes

    # The run's runtime's library (TensorFlow and Keras by default); the graph is built after the fork.
    runtimes.get_runtime(_runtime or runtimes.DEFAULT_RUNTIME).preload()
except Exception:  # pragma: no cover - reported again by the worker that needs it
    logger.exception("preloading the workers' imports failed")
