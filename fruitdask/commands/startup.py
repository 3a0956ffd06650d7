"""Performance plumbing of a command's process, out of the commands' way.

- :func:`workers_started_early`: a local Dask cluster's fork server starts before the run's
  own imports, so that the workers' imports (TensorFlow) overlap the client's;
- :func:`exit_quickly`: the process leaves without the interpreter's final garbage
  collections.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from fruitdask.config import RunConfig


@contextmanager
def workers_started_early(cfg: RunConfig) -> Iterator[None]:
    """Around a run: its workers' fork server started first (:func:`fruitdask.backends.start_early`).

    An update lists first and imports no TensorFlow when there is nothing to do: its fork
    server waits before TensorFlow until the cluster starts (so does a remote output's, which
    may hold a table: it is not read before the region guard). After the run, a fork server
    left at its gate leaves without importing TensorFlow."""
    from fruitdask.backends import start_early, stop_early

    start_early(cfg, gated="://" in cfg.output or _has_local_table(cfg.output))
    try:
        yield
    finally:
        stop_early()


def _has_local_table(output: str) -> bool:
    """A local output that already holds a features table (checked without any import:
    remote outputs are not touched before the region guard)."""
    return "://" not in output and os.path.isdir(os.path.join(output, "features", "_delta_log"))


def exit_quickly(code: int) -> NoReturn:
    """``sys.exit(code)`` without the final garbage collections.

    Every object goes to the collector's permanent generation (:func:`gc.freeze`): the last
    collections of a process that imported pandas, Dask, pyarrow and matplotlib otherwise
    take 0.6 s on 2 cores, after everything is written and committed. Objects are still
    freed by reference counting and ``atexit`` handlers still run; only the final hunt for
    reference cycles is skipped, and the operating system takes the memory back anyway.
    """
    import gc

    gc.freeze()
    sys.exit(code)
