"""What the pipeline and every backend share: the :class:`Backend` steps, the
:class:`Featurized` handle, and :func:`n_partitions` (see :mod:`fruitdask.backends`)."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from fruitdask.features.model import WeightsInfo
from fruitdask.features.precision import Resolved
from fruitdask.features.settings import FeatureSettings
from fruitdask.reduce import Reduction


@dataclass
class Featurized:
    """What a backend's featurize step hands back: its own handle on the good rows (kept on
    the cluster), how many there are, and the skipped rows (``path, label, stage, reason``)."""

    data: Any
    rows: int
    errors: pd.DataFrame


class Backend(Protocol):
    """The steps of an engine (see the module docstring)."""

    starts_early: bool
    cluster: dict
    extra: dict

    def start(self, stack: ExitStack) -> None: ...

    def describe(self) -> dict: ...

    def resolve_precision(self, requested: str) -> Resolved: ...

    def warm_up(self, stack: ExitStack, precision: str) -> None: ...

    def running(self) -> AbstractContextManager: ...

    def prepare(self, listing: pd.DataFrame, weights: list[np.ndarray], weights_info: WeightsInfo) -> None: ...

    def featurize(self, settings: FeatureSettings) -> Featurized: ...

    def reduce(self, featurized: Featurized) -> Reduction: ...

    def write(self, featurized: Featurized, reduction: Reduction) -> int: ...


def n_partitions(n_images: int, partition_size: int, n_threads: int) -> int:
    """Partitions of about ``partition_size`` images, a multiple of the cluster's threads so
    that the last wave keeps every thread busy."""
    parts = max(1, math.ceil(n_images / partition_size))
    if n_threads > 1:
        parts = math.ceil(parts / n_threads) * n_threads
    return max(1, min(parts, n_images))

