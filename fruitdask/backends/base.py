"""What the pipeline and every backend share: the :class:`Backend` steps (see
:mod:`fruitdask.backends`)."""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from typing import Protocol

from fruitdask.features.model import WeightsInfo
from fruitdask.features.precision import Resolved
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsSource
from fruitdask.lake.update import LakeBackend


class Backend(LakeBackend, Protocol):
    """The steps of an engine (see the module docstring): those the pipeline calls here, and
    those the lake's update calls (:class:`fruitdask.lake.update.LakeBackend`: ``name``,
    ``supports_wide_fit``, ``featurize_parts``, ``map_tasks``, ``tree_reduce``, ``fit_wide``),
    declared below the backends so that the lake imports no engine."""

    starts_early: bool
    cluster: dict
    extra: dict

    def start(self, stack: ExitStack, settings: FeatureSettings) -> None: ...

    def describe(self) -> dict: ...

    def resolve_precision(self, requested: str) -> Resolved: ...

    def warm_up(self, stack: ExitStack, settings: FeatureSettings) -> None: ...

    def running(self) -> AbstractContextManager: ...

    def prepare(self, weights: WeightsSource, weights_info: WeightsInfo) -> WeightsSource: ...


