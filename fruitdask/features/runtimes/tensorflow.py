"""Today's runtime: Keras' VGG16 (no top) on TensorFlow, in float32 or ``mixed_bfloat16``.

The only module of the pipeline that imports TensorFlow and Keras (besides the client's
reading of ImageNet or random weights in :mod:`fruitdask.features.model`, which builds this
graph to get them, and the fork server's preload, which imports them ahead of the workers).
Imported lazily: importing TensorFlow costs seconds and must happen after the process's TF
environment (threads, oneDNN) is set.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from fruitdask.features.runtimes.base import RuntimeEntry
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsSource

logger = logging.getLogger(__name__)

NAME = "tensorflow"
PRECISIONS = ("float32", "bfloat16")


def import_keras() -> Any:
    """Import TensorFlow (quietly) and Keras once; return ``keras``.

    Local workers find it imported already by the fork server they are forked from
    (:mod:`fruitdask.backends.dask.forkserver`).
    """
    if "keras" not in sys.modules:
        with _quiet_stderr():
            import tensorflow  # noqa: F401 - the C++ runtime logs its banner at import
    import keras

    return keras


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 while TensorFlow loads: its C++ runtime prints INFO lines
    (oneDNN banner, absl notice) that TF_CPP_MIN_LOG_LEVEL no longer hides. Python
    exceptions still propagate; only the native chatter of the import is dropped."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


@contextmanager
def _dtype_policy(keras: Any, name: str) -> Iterator[None]:
    """Build layers under dtype policy ``name``, then restore the previous one.

    Keras keeps the policy per thread; restoring it means no other model built later in
    this thread (or code sharing the process) inherits bfloat16.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_vgg16(image_size: int, weights: str | None = None, precision: str = "float32") -> Any:
    """The Keras VGG16 graph without its top, for square RGB inputs of ``image_size``.

    ``precision="bfloat16"`` builds it under Keras' ``mixed_bfloat16`` policy (float32
    weights, bfloat16 compute) with a float32 cast at the output, so the features are
    float32 and the weights list is the same as the float32 model's.
    """
    keras = import_keras()
    shape = (image_size, image_size, 3)
    if precision == "float32":
        return keras.applications.VGG16(weights=weights, include_top=False, input_shape=shape)
    if precision != "bfloat16":
        raise ValueError(f"unknown precision {precision!r}: use float32 or bfloat16")
    with _dtype_policy(keras, "mixed_bfloat16"):
        base = keras.applications.VGG16(weights=weights, include_top=False, input_shape=shape)
    out = keras.layers.Activation("linear", dtype="float32", name="features_float32")(base.output)
    return keras.Model(base.input, out, name="vgg16_bf16")


def trace_any_batch(model: Any, image_size: int) -> None:
    """Trace ``model``'s predict function once for a batch of any size (without running it).

    Left to itself, Keras traces it at the first call and again at the second batch size
    (``reduce_retracing``): a partition's last, shorter batch paid a second trace, about
    0.13 s of Python at 224 px, during which (on a traced timeline) the worker's other thread
    stalled too, presumably on the GIL. One
    trace for ``(None, size, size, 3)`` serves every batch size after it (0.05 s).
    """
    import tensorflow as tf

    model.make_predict_function()
    model.predict_function.get_concrete_function([(tf.TensorSpec((None, image_size, image_size, 3), tf.float32),)])


_THREADS_SET = False


def pin_tf_threads(threads: int | None) -> None:
    """Limit TensorFlow's thread pools to the worker's share of cores (once per process).

    Must run before TensorFlow's runtime starts; later calls are ignored.
    """
    global _THREADS_SET
    if _THREADS_SET or not threads:
        return
    import_keras()
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(1 if threads <= 2 else 2)
    except RuntimeError:  # runtime already initialised in this process
        logger.debug("TensorFlow threads already fixed in this process")
    _THREADS_SET = True


class TensorflowRuntime:
    """Keras' VGG16 for one image size and precision, built once, traced for any batch size.

    The graph is not run by :meth:`warm_up`. A dummy inference saves a later batch nothing:
    the runtime's set-up (oneDNN's kernels) comes with each new largest batch shape, so a
    first batch of 32 costs the same after a one-image inference as without it (0.60 against
    0.61 s at 224 px, bfloat16, 2 cores), and while it runs TensorFlow's threads hold both
    cores, so the worker's event loop cannot even start the first partition's tasks.
    """

    name = NAME

    def __init__(self, settings: FeatureSettings, threads: int | None = None) -> None:
        if settings.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {settings.precision!r}: use {' or '.join(PRECISIONS)}")
        self.image_size = settings.image_size
        self.precision = settings.precision
        self.threads = threads
        self.model: Any = None

    def warm_up(self) -> float:
        """Import TensorFlow, build the graph and trace it (:func:`trace_any_batch`)."""
        if self.model is not None:
            return 0.0
        t0 = time.perf_counter()
        pin_tf_threads(self.threads)
        model = build_vgg16(self.image_size, precision=self.precision)
        trace_any_batch(model, self.image_size)
        self.model = model
        return time.perf_counter() - t0

    def prepare(self, weights: WeightsSource, settings: FeatureSettings) -> None:
        """Build the graph if :meth:`warm_up` did not, and give it the weights."""
        if (settings.image_size, settings.precision) != (self.image_size, self.precision):
            raise ValueError(
                f"settings of {settings.image_size}px {settings.precision} handed to a runtime made for "
                f"{self.image_size}px {self.precision}: make one per image size and precision"
            )
        arrays = weights.load()
        self.warm_up()
        self.model.set_weights(arrays)

    def featurize(self, batch: np.ndarray) -> np.ndarray:
        """Keras' ``preprocess_input`` (RGB to BGR, ImageNet means removed), then one
        ``predict_on_batch`` (the compiled graph, no per-call Python dispatch of layers)."""
        from keras.applications.vgg16 import preprocess_input

        x = preprocess_input(batch.astype(np.float32, copy=True))
        return np.asarray(self.model.predict_on_batch(x))

    def describe(self) -> dict[str, str]:
        import tensorflow as tf

        return {"runtime": self.name, "precision": self.precision, "version": str(tf.__version__)}


def _installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("keras") is not None


def _preload() -> None:
    """TensorFlow, Keras and Keras' VGG16 module imported (the graph is built later)."""
    import_keras()
    import keras.applications.vgg16  # noqa: F401


ENTRY = RuntimeEntry(name=NAME, precisions=PRECISIONS, create=TensorflowRuntime, available=_installed, preload=_preload)
