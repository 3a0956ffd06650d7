"""Execution backends: where the shared stages run (Dask by default, Spark to compare)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from fruitdask.config import RunConfig
from fruitdask.errors import ConfigError
from fruitdask.features.model import WeightsInfo
from fruitdask.progress import Progress
from fruitdask.reduce import Reduction
from fruitdask.runinfo import StageTimer
from fruitdask.storage import OutputTarget


@dataclass
class RunContext:
    """Everything a backend gets: the config, the listing, the weights and where to write."""

    cfg: RunConfig
    listing: pd.DataFrame
    weights: list[np.ndarray]
    weights_info: WeightsInfo
    target: OutputTarget
    timer: StageTimer
    progress: Progress = field(default_factory=Progress)  # counts images; a no-op unless the CLI draws it
    on_cluster: Callable[[dict], None] = lambda _: None
    #: What :func:`open_backend` yielded (the Dask client and its warm workers), if anything.
    session: Any = None


@dataclass
class BackendResult:
    """What a backend hands back to the pipeline once the dataset is in staging."""

    rows: int
    errors: pd.DataFrame
    reduction: Reduction
    cluster: dict
    extra: dict = field(default_factory=dict)


def open_backend(cfg: RunConfig, timer: StageTimer, on_cluster: Callable[[dict], None]) -> AbstractContextManager:
    """Start the engine early, before the listing and the weights, so its workers warm up
    meanwhile (Dask); a backend without this step gets a ``None`` session."""
    if cfg.backend == "dask":
        from fruitdask.backends.dask.backend import session

        return session(cfg, timer, on_cluster)
    return nullcontext(None)


def get_backend(name: str) -> Callable[[RunContext], BackendResult]:
    """The ``run`` function of backend ``name`` (imported lazily: Spark is an extra)."""
    if name == "dask":
        from fruitdask.backends.dask.backend import run

        return run
    if name == "spark":
        from fruitdask.backends.spark.backend import run

        return run
    raise ConfigError(f"unknown backend {name!r}: use dask or spark")
