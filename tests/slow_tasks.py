"""Task bodies that take a little longer, so a test can kill a worker in the middle of a stage.

Imported by the ``dask worker`` processes of tests/test_lost_workers.py (their PYTHONPATH
holds tests/), so the functions travel by reference like fruitdask's own. Each one waits
``DELAY`` seconds and then calls the real task body, unchanged.
"""

from __future__ import annotations

import os
import time

from fruitdask.backends.dask import backend as dask_backend
from fruitdask.lake import tasks

DELAY = 0.4
# The real bodies, taken before any test patches the modules' names with the ones below.
_featurize = dask_backend.featurize_on_worker
_moments = tasks.moments_part
_project = tasks.project_part


#: A worker started with this variable naming a file waits while that file exists before
#: each featurize task (tests/test_lost_workers.py holds one worker back with it).
GATE_ENV = "FRUITDASK_TEST_GATE"


#: Partitions this process featurized (read by the tests with ``client.run(featurized)``).
FEATURIZED = [0]


def featurized() -> int:
    return FEATURIZED[0]


def slow_featurize(*args, **kwargs):
    gate = os.environ.get(GATE_ENV)
    deadline = time.monotonic() + 300
    while gate and os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(DELAY)
    out = _featurize(*args, **kwargs)
    FEATURIZED[0] += 1
    return out


def slow_moments(*args, **kwargs):
    time.sleep(DELAY)
    return _moments(*args, **kwargs)


def slow_project(*args, **kwargs):
    time.sleep(DELAY)
    return _project(*args, **kwargs)
