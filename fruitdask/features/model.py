"""The VGG16 feature extractor: weights read on the client, one compiled model per worker process.

The client reads the weights once (:func:`load_weights`; a weights file with h5py alone,
no TensorFlow, see :mod:`fruitdask.features.weights_file`) to check and hash them. Workers get
them as a :class:`fruitdask.features.weights_file.WeightsSource`: the Dask backend a file to
load them from, the Spark backend a broadcast. Inside a worker, :func:`warm_up` builds the
graph of the run's :class:`~fruitdask.features.settings.FeatureSettings` early and
:func:`cached_model` gives it the weights the first time, then reuses it for every later
partition of the run.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from fruitdask.errors import FruitdaskError, UntrustedReferenceError, WeightsError
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsSource, weights_digest

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


def import_keras():
    """Import TensorFlow (quietly) and Keras once; return ``keras``.

    Imported lazily: importing TensorFlow costs seconds and must happen after the
    process's TF environment (threads, oneDNN) is set. Local workers find it imported
    already by the fork server they are forked from (:mod:`fruitdask.backends.dask.forkserver`).
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
    try:
        return build_vgg16(image_size, weights="imagenet").get_weights()
    except Exception as e:
        raise WeightsError(
            f"ImageNet weights for VGG16 could not be loaded ({type(e).__name__}: {e}): put "
            f"{IMAGENET_NOTOP_FILE} in ~/.keras/models, or pass --weights PATH_OR_URI"
        ) from e


def _random(seed: int) -> list[np.ndarray]:
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

_MODELS: dict[tuple[str, int, str], Any] = {}
_LOCK = threading.Lock()
#: Held while this process reads weights for :func:`cached_model` (taken before :data:`_LOCK`).
_LOAD_LOCK = threading.Lock()
#: How many times this process built a model, per weights digest (tests read it).
BUILDS: Counter[str] = Counter()
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


#: Graphs built ahead of the weights by :func:`warm_up`, per image size, waiting for them.
_WARM: dict[tuple[int, str], list[Any]] = {}
#: How many times this process read the weights from their file, per digest (tests read it).
LOADS: Counter[str] = Counter()
#: Graphs :func:`warm_up` built (``built``) and models that started from one (``used``).
WARM: Counter[str] = Counter()


def warm_up(settings: FeatureSettings, threads: int | None = None) -> float:
    """Import TensorFlow, build the VGG16 graph of ``settings`` (its image size and
    precision) and trace it for any batch size (:func:`trace_any_batch`) in this worker
    process, before the weights are known.

    Submitted as soon as the cluster is up, it overlaps the seconds of TensorFlow's import
    and graph construction with the client's listing and weights reading, and with the
    worker's own reading of the weights (:func:`cached_model` reads them while the graph is
    built); the first :func:`cached_model` of those settings then only assigns them. Returns
    seconds.

    The graph is not run here. A dummy inference saves a later batch nothing: the runtime's
    set-up (oneDNN's kernels) comes with each new largest batch shape, so a first batch of
    32 costs the same after a one-image inference as without it (0.60 against 0.61 s at
    224 px, bfloat16, 2 cores), and while it runs TensorFlow's threads hold both cores, so
    the worker's event loop cannot even start the first partition's tasks (0.3 s of an
    update's critical path).
    """
    import time

    if settings.runtime != "tensorflow":
        return 0.0  # OpenVINO's model needs the weights (or its cached IR): built by cached_model
    size, precision = settings.image_size, settings.precision
    t0 = time.perf_counter()
    with _LOCK:
        if _WARM.get((size, precision)) or any(k[1:] == (size, precision) for k in _MODELS):
            return 0.0
        pin_tf_threads(threads)
        model = build_vgg16(size, precision=precision)
        trace_any_batch(model, size)
        _WARM.setdefault((size, precision), []).append(model)
        WARM["built"] += 1
    seconds = time.perf_counter() - t0
    logger.info("warmed up VGG16 (%dpx) in pid %d in %.1fs", size, os.getpid(), seconds)
    return seconds


def cached_model(weights: WeightsSource, settings: FeatureSettings, threads: int | None = None) -> Any:
    """Return this process's compiled model for ``weights`` at the image size and precision
    of ``settings``, building it once.

    ``weights.load()`` runs only here, once per process, under its own lock: while
    :func:`warm_up` still builds the graph (holding the model lock), the weights are read at
    the same time, and the warm graph then just receives them.
    """
    if settings.runtime == "openvino":
        return _openvino_model(weights, settings, threads)
    key, size, precision = weights.sha256, settings.image_size, settings.precision
    cache_key = (key, size, precision)
    model = _MODELS.get(cache_key)
    if model is not None:
        return model
    with _LOAD_LOCK:  # one reader of the weights; a warm-up may hold the model lock meanwhile
        model = _MODELS.get(cache_key)
        if model is not None:
            return model
        arrays = weights.load()
        LOADS[key] += 1
        with _LOCK:
            warm = _WARM.get((size, precision))
            if warm:
                model = warm.pop()
                WARM["used"] += 1
            else:
                pin_tf_threads(threads)
                model = build_vgg16(size, precision=precision)
                trace_any_batch(model, size)
            model.set_weights(arrays)
            _MODELS[cache_key] = model
            BUILDS[key] += 1
        logger.info("built VGG16 (%s, %dpx, %s) in pid %d", key[:12], size, precision, os.getpid())
    return model


def _openvino_model(weights: WeightsSource, settings: FeatureSettings, threads: int | None) -> Any:
    """The OpenVINO runtime's model (:mod:`fruitdask.features.runtimes.openvino`): the weights
    and, for int8, the calibration images are only read when the converted model is not in
    this machine's cache."""
    from fruitdask.features import calibration
    from fruitdask.features.runtimes import openvino

    s = settings
    calib = None
    if s.precision == "int8":
        if not s.calibration:
            raise ValueError("int8 settings without a calibration set")
        text = s.calibration
        calib = lambda: calibration.load_images(text, s.image_size, s.storage_options)  # noqa: E731
    return openvino.load(weights.sha256, s.image_size, s.precision, weights.load, threads=threads, calibration=calib,
                         calibration_digest=calibration.digest_of(s.calibration))


def build_counts() -> dict[str, int]:
    """Model builds in this process, by weights key (run with ``client.run`` in tests)."""
    return dict(BUILDS)


def warm_counts() -> dict[str, int]:
    """This process's :data:`WARM` counters (run with ``client.run`` in tests)."""
    return dict(WARM)


def load_counts() -> dict[str, int]:
    """Weights files read in this process, by weights key (run with ``client.run`` in tests)."""
    return dict(LOADS)
