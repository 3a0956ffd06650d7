"""Logging set-up for the processes fruitdask starts: the CLI and the bench's children.

Library code only logs (``logging.getLogger(__name__)``); the handlers and levels are set
here, once per process, by whoever owns the process. It sits below both :mod:`fruitdask.commands`
and :mod:`fruitdask.bench`, so neither imports the other for it.
"""

from __future__ import annotations

import logging
import sys

#: The package's logger: its level is the one ``--quiet`` / ``--debug`` choose.
logger = logging.getLogger("fruitdask")


def setup_logging(quiet: bool, debug: bool) -> None:
    """One stderr handler; fruitdask at INFO (WARNING with ``quiet``, DEBUG with ``debug``),
    other libraries at WARNING, or errors only for the noisy ones unless ``debug``."""
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if debug else "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if not debug else logging.INFO)
    logger.setLevel(level)
    if not debug:
        quiet_libraries()


#: Libraries whose INFO and WARNING lines are noise to a user (errors still show).
QUIET_LOGGERS = ("distributed", "tensorflow", "absl", "py4j", "pyspark", "h5py")


def quiet_libraries() -> None:
    """Libraries log errors only: the loggers that exist now, and ``distributed``'s when
    it is imported later (it sets their levels at import, from Dask's ``logging``
    configuration; importing it here would cost a third of a second before the run can
    start its workers)."""
    import dask

    # Where distributed looks (its ``_find_logging_config``): under ``distributed`` if the
    # logging keys are there, else at the top. A logging file or a dictConfig of the
    # user's own is left alone.
    section = "distributed." if {"logging", "logging-file-config"} & set(dask.config.get("distributed", {}) or {}) else ""
    levels = dask.config.get(f"{section}logging", {}) or {}
    if not dask.config.get(f"{section}logging-file-config", None) and "version" not in levels:
        dask.config.set({f"{section}logging": {**levels, **{name: "error" for name in _DISTRIBUTED_LOGGERS}}})
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


#: The loggers ``distributed`` configures at import (its defaults name these).
_DISTRIBUTED_LOGGERS = ("distributed", "distributed.client", "distributed.gc")
