"""What the pipeline and every backend share: the :class:`Backend` steps (see
:mod:`fruitdask.backends`)."""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from typing import Any, Protocol

import pandas as pd

from fruitdask.features.model import WeightsInfo
from fruitdask.features.precision import Resolved
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsSource
from fruitdask.lake.tasks import FeaturizeJob


class Backend(Protocol):
    """The steps of an engine (see the module docstring)."""

    starts_early: bool
    cluster: dict
    extra: dict

    def start(self, stack: ExitStack, settings: FeatureSettings) -> None: ...

    def describe(self) -> dict: ...

    def resolve_precision(self, requested: str) -> Resolved: ...

    def warm_up(self, stack: ExitStack, settings: FeatureSettings) -> None: ...

    def running(self) -> AbstractContextManager: ...

    def prepare(self, weights: WeightsSource, weights_info: WeightsInfo) -> WeightsSource: ...

    def featurize_parts(self, manifest_url: str, sizes: list[int], job: FeaturizeJob) -> pd.DataFrame: ...

    def map_tasks(self, fn: Any, args_list: list[tuple], *, background: bool = False) -> list: ...

    def tree_reduce(self, leaves: list[tuple]) -> Any: ...

