"""Test doubles of the inference-runtime seam (fruitdask.features.runtimes).

- :class:`NumpyRuntime` (``numpy-test``): a fixed random projection of each 32x32 block of
  pixels, seeded by the weights' digest; NumPy only, no TensorFlow. A run uses it with
  ``FRUITDASK_RUNTIME_PLUGINS=runtime_doubles:register FRUITDASK_RUNTIME=numpy-test`` (and this
  folder on ``PYTHONPATH``). With ``FRUITDASK_TEST_MARKERS=DIR`` each featurized batch leaves a
  JSON marker there saying which process ran it and whether TensorFlow was imported in it.
- :func:`count_calls`: the counters tests read to prove what a worker computed (how many
  images went through the model, how many times a runtime got its weights). It wraps the
  TensorFlow runtime's methods in the process it runs in: the test's own process, or a
  worker's through ``client.run(count_calls)``; read with ``client.run(model_calls)``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import Counter

import numpy as np

from fruitdask.features import runtimes
from fruitdask.features.runtimes.tensorflow import TensorflowRuntime
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsSource

NUMPY_RUNTIME = "numpy-test"
MARKERS_ENV = "FRUITDASK_TEST_MARKERS"
BLOCK = 32  # VGG16's five poolings: one output position per 32x32 block of input
DIM = 512


class NumpyRuntime:
    """Maps of shape ``(n, s // 32, s // 32, 512)``: each block's pixels (scaled to [0, 1])
    times a fixed Gaussian matrix drawn from the weights' digest, then ReLU."""

    name = NUMPY_RUNTIME

    def __init__(self, settings: FeatureSettings, threads: int | None = None) -> None:
        if settings.precision != "float32":
            raise ValueError(f"{NUMPY_RUNTIME} computes in float32 only, not {settings.precision}")
        self.image_size = settings.image_size
        self.projection: np.ndarray | None = None

    def warm_up(self) -> float:
        return 0.0

    def prepare(self, weights: WeightsSource, settings: FeatureSettings) -> None:
        weights.load()  # a real runtime reads them here; this one only needs their digest
        self.projection = projection(weights.sha256)

    def featurize(self, batch: np.ndarray) -> np.ndarray:
        assert self.projection is not None, "featurize before prepare"
        _leave_marker(len(batch))
        n, side = len(batch), self.image_size // BLOCK
        blocks = batch[:, : side * BLOCK, : side * BLOCK].astype(np.float32) / 255.0
        blocks = blocks.reshape(n, side, BLOCK, side, BLOCK, 3).transpose(0, 1, 3, 2, 4, 5)
        maps = blocks.reshape(n, side, side, BLOCK * BLOCK * 3) @ self.projection
        return np.maximum(maps, 0.0, dtype=np.float32)

    def describe(self) -> dict[str, str]:
        return {"runtime": NUMPY_RUNTIME, "precision": "float32", "version": np.__version__}


def projection(sha256: str) -> np.ndarray:
    """The runtime's matrix for the weights of digest ``sha256`` (float32, scaled by 1/sqrt(d))."""
    rng = np.random.default_rng(int(sha256[:16], 16))
    d = BLOCK * BLOCK * 3
    return (rng.standard_normal((d, DIM)) / np.sqrt(d)).astype(np.float32)


def _leave_marker(images: int) -> None:
    folder = os.environ.get(MARKERS_ENV)
    if not folder:
        return
    doc = {"pid": os.getpid(), "images": images, "tensorflow_imported": "tensorflow" in sys.modules}
    path = os.path.join(folder, f"{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}.json")
    with open(path, "w") as f:
        json.dump(doc, f)


def register() -> None:
    """The plugin hook (``FRUITDASK_RUNTIME_PLUGINS=runtime_doubles:register``)."""
    runtimes.register(runtimes.RuntimeEntry(name=NUMPY_RUNTIME, precisions=("float32",), create=NumpyRuntime,
                                            available=lambda: True))


# --- counters: the TensorFlow runtime's calls, in the process they are installed in ----

CALLS: Counter[str] = Counter()
PREPARED: Counter[str] = Counter()
_LOCK = threading.Lock()


def count_calls() -> None:
    """Count :class:`TensorflowRuntime`'s batches and images (``featurize``) and weights given
    (``prepare``, per digest) in this process from now on; once per process."""
    if getattr(TensorflowRuntime, "_counted", False):
        return
    featurize, prepare = TensorflowRuntime.featurize, TensorflowRuntime.prepare

    def counted_featurize(self, batch):
        with _LOCK:
            CALLS["batches"] += 1
            CALLS["images"] += len(batch)
        return featurize(self, batch)

    def counted_prepare(self, weights, settings):
        prepare(self, weights, settings)
        with _LOCK:
            PREPARED[weights.sha256] += 1

    TensorflowRuntime.featurize = counted_featurize  # type: ignore[method-assign]
    TensorflowRuntime.prepare = counted_prepare  # type: ignore[method-assign]
    TensorflowRuntime._counted = True  # type: ignore[attr-defined]


def model_calls() -> dict[str, int]:
    """``batches`` and ``images`` run through the TensorFlow runtime since :func:`count_calls`."""
    with _LOCK:
        return dict(CALLS)


def prepare_counts() -> dict[str, int]:
    """Runtimes given their weights since :func:`count_calls`, by weights digest."""
    with _LOCK:
        return dict(PREPARED)
