"""The VGG16 weights read on the client, and one prepared inference runtime per worker process.

The client reads the weights once (:func:`load_weights`; a weights file with h5py alone,
no TensorFlow, see :mod:`fruitdask.features.weights_file`) to check and hash them. Workers get
them as a :class:`fruitdask.features.weights_file.WeightsSource`: the Dask backend a file to
load them from, the Spark backend a broadcast. Inside a worker, :func:`warm_up` makes and warms
up the runtime (:mod:`fruitdask.features.runtimes`) of the run's
:class:`~fruitdask.features.settings.FeatureSettings` early and :func:`cached_runtime` gives it
the weights the first time, then reuses it for every later partition of the run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from fruitdask.errors import FruitdaskError, UntrustedReferenceError, WeightsError
from fruitdask.features.runtimes import InferenceRuntime, get_runtime
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsArrays, WeightsSource, weights_digest

logger = logging.getLogger(__name__)

WEIGHTS_CHOICES = ("auto", "imagenet", "random")
#: File Keras caches the ImageNet no-top weights in (under ``~/.keras/models``).
IMAGENET_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
NO_FALLBACK_HINT = (
    "--weights auto does not fall back to random weights unless asked: pass --weights PATH_OR_URI of a "
    "vgg16 no-top .weights.h5 file (production), or --allow-random-weights for an offline demo"
)
RANDOM_WEIGHTS_WARNING = (
    "VGG16 weights are RANDOM (ImageNet weights could not be loaded): features are not "
    "ImageNet features. Pass --weights imagenet with network access, or --weights PATH_OR_URI "
    "to a vgg16 no-top .weights.h5 file."
)


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from; written to ``run.json`` and the report."""

    requested: str
    kind: str  # "imagenet", "random" or "file"
    source: str
    sha256: str
    warning: str | None = None
    file_sha256: str | None = None  # of the file's bytes, for kind "file"

    @property
    def is_random(self) -> bool:
        return self.kind == "random"


#: (in channels, out channels) of VGG16's 13 convolutions, in graph order.
_VGG16_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
#: Shapes of ``VGG16(include_top=False).get_weights()`` (kernel, bias per convolution): the
#: same for every input size, so a file is checked without building the graph.
VGG16_NOTOP_SHAPES: list[tuple[int, ...]] = [s for cin, cout in _VGG16_CONVS for s in ((3, 3, cin, cout), (cout,))]


def _check_shapes(weights: list[np.ndarray], source: str) -> None:
    got = [tuple(w.shape) for w in weights]
    if got != VGG16_NOTOP_SHAPES:
        raise WeightsError(
            f"weights from {source!r} do not fit VGG16 without top "
            f"({len(got)} arrays, expected {len(VGG16_NOTOP_SHAPES)}): pass a vgg16 include_top=False weights file"
        )


def imagenet_cache_file() -> str:
    """Where Keras keeps the ImageNet no-top file (``$KERAS_HOME/models``, else ``~/.keras/models``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models", IMAGENET_NOTOP_FILE)


def _imagenet(image_size: int) -> list[np.ndarray]:
    cached = imagenet_cache_file()
    if os.path.isfile(cached):
        # The file Keras downloaded is a legacy .h5: read it with h5py, no TensorFlow.
        return _from_file(cached, None)[0]
    from fruitdask.features.runtimes.tensorflow import build_vgg16

    try:
        return build_vgg16(image_size, weights="imagenet").get_weights()
    except Exception as e:
        raise WeightsError(
            f"ImageNet weights for VGG16 could not be loaded ({type(e).__name__}: {e}): put "
            f"{IMAGENET_NOTOP_FILE} in ~/.keras/models, or pass --weights PATH_OR_URI"
        ) from e


def _random(seed: int) -> list[np.ndarray]:
    """Keras' own seeded initialisation of the VGG16 graph (the one client-side use of TensorFlow)."""
    from fruitdask.features.runtimes.tensorflow import build_vgg16, import_keras

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    return build_vgg16(32).get_weights()


def _from_file(
    spec: str, storage_options: dict[str, Any] | None, keras_sha256: str | None = None, referenced: bool = False
) -> tuple[list[np.ndarray], str]:
    """Weights and the file's sha256, read with h5py alone: the client never imports
    TensorFlow for a weights file (issue 14). A file named by a stored reference
    (``referenced``), whatever its format, is only parsed (by libhdf5, zipfile) when its
    bytes hash to ``keras_sha256``: the parsers are attack surface (issue 23, item 9)."""
    from fruitdask import storage
    from fruitdask.features.weights_file import WEIGHTS_SUFFIXES, read_weights

    storage.check_protocols([spec], "weights location", "pass --weights PATH_OR_URI of a local file or an s3:// object")
    name = spec.rstrip("/").rsplit("/", 1)[-1]
    if not name.endswith(WEIGHTS_SUFFIXES):
        raise WeightsError(
            f"--weights {spec!r} is not a weights file: use a .weights.h5, .h5 or .keras file, "
            f"or one of {', '.join(WEIGHTS_CHOICES)}"
        )
    with tempfile.TemporaryDirectory(prefix="fruitdask-weights-") as tmp:
        local = os.path.join(tmp, name)
        try:
            storage.download_to_local(spec, local, storage_options)
        except Exception as e:
            raise WeightsError(f"cannot read weights file {spec!r}: {e}") from e
        digest = storage.file_sha256(local)
        # A referenced file is only opened when it is the very file the reference names.
        if referenced and digest != keras_sha256:
            raise UntrustedReferenceError(
                f"weights file {spec!r} has sha256 {digest[:16]}…, the reference expects "
                f"{(keras_sha256 or 'none recorded')[:16]}…: refused before loading it; pass --weights PATH_OR_URI "
                "of the very file the run used (or any weights file you trust of the same weights)"
            )
        try:
            weights = read_weights(local)
        except WeightsError:
            raise
        except (FileNotFoundError, PermissionError, FruitdaskError) as e:
            raise WeightsError(f"cannot read weights file {spec!r}: {e}") from e
        except Exception as e:  # h5py and zipfile raise many types; all mean "unusable file"
            raise WeightsError(
                f"weights file {spec!r} could not be loaded into VGG16 without top ({type(e).__name__}: {e}): "
                "save it with model.save_weights('vgg16_notop.weights.h5') from keras.applications.VGG16(include_top=False)"
            ) from e
    _check_shapes(weights, spec)
    return weights, digest


def load_weights(
    spec: str, *, image_size: int = 224, seed: int = 0, storage_options: dict[str, Any] | None = None,
    allow_random: bool = False, keras_sha256: str | None = None, referenced: bool = False,
) -> tuple[list[np.ndarray], WeightsInfo]:
    """Load VGG16 (no top) weights on the client.

    Parameters
    ----------
    spec
        ``imagenet`` (Keras cache, else download), ``random`` (seeded init of the same graph),
        ``auto`` (ImageNet if it can be had; else random with a loud warning when
        ``allow_random``, else :class:`WeightsError`), or a path/URI of a ``.weights.h5`` /
        ``.keras`` file.
    allow_random
        Let ``auto`` fall back to random weights. Off by default: random features look like
        real ones, so a run must never end up with them unless someone asked.
    keras_sha256, referenced
        ``spec`` comes from a stored reference (``run.json``, ``bundle.json``): the file
        (``.keras``, ``.weights.h5``, ``.h5``) is only parsed when its bytes hash to
        ``keras_sha256``.
    """
    if spec == "imagenet":
        weights = _imagenet(image_size)
        info = WeightsInfo(spec, "imagenet", "keras.applications imagenet", weights_digest(weights))
    elif spec == "random":
        weights = _random(seed)
        info = WeightsInfo(spec, "random", f"random (seed {seed})", weights_digest(weights), RANDOM_WEIGHTS_WARNING)
    elif spec == "auto":
        try:
            weights = _imagenet(image_size)
            info = WeightsInfo(spec, "imagenet", "keras.applications imagenet", weights_digest(weights))
        except WeightsError as e:
            if not allow_random:
                raise WeightsError(f"{e}; {NO_FALLBACK_HINT}") from e
            logger.warning("%s (cause: %s)", RANDOM_WEIGHTS_WARNING, e)
            weights = _random(seed)
            info = WeightsInfo(spec, "random", f"random (seed {seed})", weights_digest(weights), RANDOM_WEIGHTS_WARNING)
    else:
        weights, file_sha256 = _from_file(spec, storage_options, keras_sha256, referenced)
        info = WeightsInfo(spec, "file", spec, weights_digest(weights), file_sha256=file_sha256)
    weights = [np.asarray(w, dtype=np.float32) for w in weights]
    return weights, info


# --- worker side -----------------------------------------------------------------------

#: This process's prepared runtimes, by (runtime, weights digest, image size, precision).
_RUNTIMES: dict[tuple[str, str, int, str], InferenceRuntime] = {}
_LOCK = threading.Lock()
#: Held while this process reads weights for :func:`cached_runtime` (taken before :data:`_LOCK`).
_LOAD_LOCK = threading.Lock()
#: Runtimes warmed up by :func:`warm_up` ahead of the weights, by (runtime, image size, precision).
_WARM: dict[tuple[str, int, str], list[InferenceRuntime]] = {}
#: How many times this process read the weights from their file, per digest (``run.json``'s
#: ``extra.weights_loads`` and the tests read it).
LOADS: Counter[str] = Counter()
#: Runtimes :func:`warm_up` warmed (``built``) and prepared runtimes that started from one (``used``).
WARM: Counter[str] = Counter()


def _graph_key(settings: FeatureSettings) -> tuple[str, int, str]:
    # int8 models of two calibration sets are two models (a long-lived worker may serve both).
    cal = f"@{json.loads(settings.calibration)['digest']}" if settings.calibration else ""
    return settings.runtime, settings.image_size, settings.precision + cal


def warm_up(settings: FeatureSettings, threads: int | None = None) -> float:
    """Make this process's runtime of ``settings`` (its runtime, image size and precision)
    and warm it up (:meth:`InferenceRuntime.warm_up`: for TensorFlow, import it, build the
    graph and trace it for any batch size), before the weights are known.

    Submitted as soon as the cluster is up, it overlaps the seconds of the runtime's import
    and graph construction with the client's listing and weights reading, and with the
    worker's own reading of the weights (:func:`cached_runtime` reads them while the graph is
    built); the first :func:`cached_runtime` of those settings then only assigns them.
    Returns seconds.
    """
    t0 = time.perf_counter()
    key = _graph_key(settings)
    with _LOCK:
        if _WARM.get(key) or any(k[:1] + k[2:] == key for k in _RUNTIMES):
            return 0.0
        runtime = get_runtime(settings.runtime).create(settings, threads)
        runtime.warm_up()
        _WARM.setdefault(key, []).append(runtime)
        WARM["built"] += 1
    seconds = time.perf_counter() - t0
    logger.info("warmed up the %s runtime (%dpx) in pid %d in %.1fs", settings.runtime, settings.image_size,
                os.getpid(), seconds)
    return seconds


def cached_runtime(weights: WeightsSource, settings: FeatureSettings, threads: int | None = None) -> InferenceRuntime:
    """Return this process's runtime for ``weights`` at the runtime, image size and
    precision of ``settings``, prepared once.

    ``weights.load()`` runs only here, once per process, under its own lock: while
    :func:`warm_up` still builds the graph (holding the runtime lock), the weights are read at
    the same time, and the warm runtime then just receives them.
    """
    key, (name, size, precision) = weights.sha256, _graph_key(settings)
    cache_key = (name, key, size, precision)
    runtime = _RUNTIMES.get(cache_key)
    if runtime is not None:
        return runtime
    with _LOAD_LOCK:  # one reader of the weights; a warm-up may hold the runtime lock meanwhile
        runtime = _RUNTIMES.get(cache_key)
        if runtime is not None:
            return runtime
        loaded = WeightsArrays.of(weights.load(), key)
        LOADS[key] += 1
        with _LOCK:
            warm = _WARM.get((name, size, precision))
            if warm:
                runtime = warm.pop()
                WARM["used"] += 1
            else:
                runtime = get_runtime(name).create(settings, threads)
            runtime.prepare(loaded, settings)
            _RUNTIMES[cache_key] = runtime
        logger.info("prepared the %s runtime (%s, %dpx, %s) in pid %d", name, key[:12], size, precision, os.getpid())
    return runtime


def warm_counts() -> dict[str, int]:
    """This process's :data:`WARM` counters (run with ``client.run`` in tests)."""
    return dict(WARM)


def load_counts() -> dict[str, int]:
    """Weights files read in this process, by weights key (run with ``client.run``)."""
    return dict(LOADS)
