"""Inference runtimes behind one seam (:mod:`fruitdask.features.runtimes.base`).

Importing this package registers the runtimes shipped with fruitdask without importing their
libraries: each one's module imports its library only when a runtime is made. Adding one is a
module beside :mod:`~fruitdask.features.runtimes.tensorflow` and its line below.
"""

from __future__ import annotations

from fruitdask.features.runtimes import openvino, tensorflow
from fruitdask.features.runtimes.base import (
    DEFAULT_RUNTIME,
    PLUGINS_ENV,
    RUNTIMES,
    InferenceRuntime,
    RuntimeEntry,
    available_runtimes,
    get_runtime,
    load_plugins,
    register,
)

register(tensorflow.ENTRY)
register(openvino.ENTRY)

__all__ = [
    "DEFAULT_RUNTIME", "PLUGINS_ENV", "RUNTIMES", "InferenceRuntime", "RuntimeEntry", "available_runtimes",
    "get_runtime", "load_plugins", "register",
]
