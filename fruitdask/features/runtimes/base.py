"""The inference-runtime seam: what turns a batch of decoded images into VGG16's feature maps.

A runtime ("engine" names raw, Dask and Spark in the bench) is one process's model: made
from the graph's :class:`~fruitdask.features.settings.FeatureSettings` (image size,
precision) by its :class:`RuntimeEntry`, warmed up before the weights are known
(:meth:`InferenceRuntime.warm_up`), given the weights once (:meth:`InferenceRuntime.prepare`:
load them, and where the runtime needs it convert or calibrate the model, caching the result
on local scratch by the weights' digest), then called once per batch
(:meth:`InferenceRuntime.featurize`). :meth:`InferenceRuntime.describe` is its identity for the
fingerprint. The per-process cache of prepared runtimes is :mod:`fruitdask.features.model`;
decoding and pooling, which every runtime shares, are :mod:`fruitdask.features.featurize`.

``RUNTIMES`` maps a runtime's name to its entry. A runtime's library (TensorFlow, OpenVINO...)
is imported only inside its own module, and only when its runtime is made. Runtimes from
outside the package (a test's, a user's) are registered by a plugin: ``FRUITDASK_RUNTIME_PLUGINS``
names ``module:function`` callables (comma-separated), each called once per process with no
argument before the registry is first read; the function calls :func:`register`. The variable
is read here rather than in :mod:`fruitdask.config` because each worker process reads it for
itself: the registry lives in the worker.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from fruitdask.errors import ConfigError
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsSource

logger = logging.getLogger(__name__)

#: The runtime of every run that names none: today's Keras VGG16 on TensorFlow.
DEFAULT_RUNTIME = "tensorflow"
#: ``module:function`` callables (comma-separated) that register runtimes in each process.
PLUGINS_ENV = "FRUITDASK_RUNTIME_PLUGINS"


@runtime_checkable
class InferenceRuntime(Protocol):
    """One process's VGG16 (no top) for one image size and precision.

    Made by :attr:`RuntimeEntry.create` from the settings of its graph (their weights key may
    still be empty), used in this order: :meth:`warm_up` (optional, before the weights are
    known), :meth:`prepare` (once), :meth:`featurize` (per batch, from one thread at a time).
    """

    #: The name it is registered under (:data:`RUNTIMES`).
    name: str

    def warm_up(self) -> float:
        """Load the runtime's library and build (or compile) the graph before the weights are
        known; return the seconds it took (0 when there was nothing to do)."""
        ...

    def prepare(self, weights: WeightsSource, settings: FeatureSettings) -> None:
        """Give the model the weights of ``settings.weights_key`` (``weights.load()``, once).

        ``settings`` has the image size and precision the runtime was made for. A runtime that
        converts or calibrates the model does it here, and may cache the result on local
        scratch keyed by ``weights.sha256``.
        """
        ...

    def featurize(self, batch: np.ndarray) -> np.ndarray:
        """Decoded ``(n, s, s, 3)`` uint8 RGB images to VGG16's last feature maps
        ``(n, s // 32, s // 32, 512)`` float32 (preprocessing included, pooling not)."""
        ...

    def describe(self) -> dict[str, str]:
        """Its identity for the fingerprint and ``run.json``: ``runtime``, ``precision``,
        ``version`` (of its library)."""
        ...


#: ``create(settings, threads)``: a runtime for the graph of ``settings`` using ``threads``
#: of this process's cores (``None``: the library's default).
RuntimeFactory = Callable[[FeatureSettings, "int | None"], InferenceRuntime]


@dataclass(frozen=True)
class RuntimeEntry:
    """A runtime as the registry knows it, before any is made."""

    name: str
    #: The precisions it computes in (``float32``, ``bfloat16``, ``int8``...).
    precisions: tuple[str, ...]
    create: RuntimeFactory
    #: Whether it can run in this process: its library installed, the CPU able (for ``auto``).
    available: Callable[[], bool]
    #: Import its library ahead of the workers (a local cluster's fork server runs it once).
    preload: Callable[[], None] = field(default=lambda: None)


RUNTIMES: dict[str, RuntimeEntry] = {}
_PLUGINS_LOCK = threading.Lock()
_PLUGINS_LOADED: set[str] = set()


def register(entry: RuntimeEntry) -> None:
    """Add (or replace) ``entry`` under its name."""
    RUNTIMES[entry.name] = entry


def load_plugins(spec: str | None = None) -> None:
    """Call each ``module:function`` of ``spec`` (default: ``$FRUITDASK_RUNTIME_PLUGINS``) once
    in this process.

    Raises
    ------
    ConfigError
        A plugin that cannot be imported or is not ``module:function``.
    """
    text = os.environ.get(PLUGINS_ENV, "") if spec is None else spec
    for item in filter(None, (p.strip() for p in text.split(","))):
        with _PLUGINS_LOCK:
            if item in _PLUGINS_LOADED:
                continue
            module, _, attr = item.partition(":")
            try:
                hook = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError, ValueError) as e:
                raise ConfigError(
                    f"{PLUGINS_ENV} names {item!r}, which cannot be loaded ({e}): give module:function of an "
                    "importable module (check PYTHONPATH on every worker)"
                ) from e
            hook()
            _PLUGINS_LOADED.add(item)
            logger.debug("runtime plugin %s loaded", item)


def get_runtime(name: str = DEFAULT_RUNTIME) -> RuntimeEntry:
    """The registered runtime ``name`` (plugins loaded first).

    Raises
    ------
    ConfigError
        For a name nothing registered, naming those that are.
    """
    load_plugins()
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ConfigError(
            f"unknown inference runtime {name!r}: use one of {', '.join(sorted(RUNTIMES))} "
            f"(or register it with {PLUGINS_ENV}=module:function)"
        ) from None


def available_runtimes() -> list[str]:
    """The registered runtimes that can run in this process, by name."""
    load_plugins()
    return sorted(name for name, entry in RUNTIMES.items() if entry.available())
