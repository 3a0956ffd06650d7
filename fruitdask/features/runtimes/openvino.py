"""The OpenVINO inference runtime: Keras's VGG16 with the run's weights, converted once per
worker process (and once per machine: the converted model is cached on local scratch), run
by OpenVINO's CPU plugin in float32, bfloat16 or int8.

- **Conversion** (:func:`convert`): the same Keras graph as the TensorFlow runtime
  (:func:`fruitdask.features.model.build_vgg16`, float32) gets the weights, is exported as a
  SavedModel and converted with ``openvino.convert_model``; TensorFlow is imported for this
  step only. The result is saved as OpenVINO IR under :func:`cache_dir`, named by a digest of
  the weights, image size, precision, calibration digest and OpenVINO's version
  (:func:`cache_key`), so a second worker process on the same machine (or a later run)
  loads the IR and never imports TensorFlow.
- **bfloat16** is OpenVINO's ``INFERENCE_PRECISION_HINT``: on a CPU with AMX or AVX512_BF16
  the plugin runs the float32 IR in bf16; on a CPU without them (the Xeon this was written on
  has ``avx512_vnni`` but no ``amx_*`` and no ``avx512_bf16``) the plugin keeps f32 and
  :meth:`OpenVINOModel.describe` reports the precision it actually runs.
- **int8** is NNCF's default post-training quantization (``nncf.quantize``, min-max ranges
  on activations, per-channel symmetric weights) of the float32 IR, on a calibration set of
  decoded images the caller supplies (``calibration``: a callable, only called when the
  quantized IR is not cached yet). VNNI (``avx512_vnni``, ``amx_int8``) runs it natively.

:class:`OpenVINORuntime` is the runtime behind the seam (:mod:`fruitdask.features.runtimes.base`),
registered as ``openvino`` (:data:`ENTRY`); :func:`fruitdask.features.runtimes.choice.choose`
decides when a run uses it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fruitdask.features.runtimes.base import RuntimeEntry
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsSource

logger = logging.getLogger(__name__)

NAME = "openvino"
#: Precisions this runtime runs.
PRECISIONS = ("float32", "bfloat16", "int8")
#: ImageNet's channel means in BGR order, as Keras's VGG16 ``preprocess_input`` removes them.
VGG16_BGR_MEAN = (103.939, 116.779, 123.68)
#: The OpenVINO CPU plugin's names for the inference precision hint.
_HINT = {"float32": "f32", "bfloat16": "bf16", "int8": "f32"}
#: What each process did, per cache key: ``converted`` (Keras to IR), ``quantized`` (NNCF),
#: ``loaded`` (IR read from the cache). Tests read it through :func:`counts`.
EVENTS: Counter[str] = Counter()
_LOCK = threading.Lock()
_MODELS: dict[tuple[str, int, str, str | None], OpenVINOModel] = {}


def available() -> bool:
    """Whether OpenVINO and NNCF are installed here (the ``cpu`` extra, on Linux x86_64 only)."""
    return importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("nncf") is not None


def preprocess(images: np.ndarray) -> np.ndarray:
    """Keras VGG16 ``preprocess_input`` (RGB to BGR, ImageNet channel means removed) in NumPy,
    with Keras's very operations (its "caffe" mode), so that a model loaded from the cache
    runs without importing TensorFlow or Keras."""
    x = images.astype(np.float32, copy=True)[..., ::-1]
    for channel, mean in enumerate(VGG16_BGR_MEAN):
        x[..., channel] -= mean
    return x


def cache_dir() -> Path:
    """Where converted models are kept: ``$FRUITDASK_CACHE/openvino``, else
    ``~/.cache/fruitdask/openvino`` (a worker's local scratch disk in a pod)."""
    root = os.environ.get("FRUITDASK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fruitdask")
    return Path(root) / "openvino"


def cache_key(weights_sha256: str, image_size: int, precision: str, calibration_digest: str | None = None) -> str:
    """The name of a converted model: everything that decides its numbers, and the version of
    OpenVINO that wrote it (a newer one converts again rather than read an older IR)."""
    import openvino as ov

    text = f"vgg16-notop|{weights_sha256}|{image_size}|{precision}|{calibration_digest or ''}|{ov.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def convert(weights: list[np.ndarray], image_size: int) -> Any:
    """The float32 ``openvino.Model`` of Keras's VGG16 (no top) with ``weights``, input
    ``(batch, size, size, 3)`` preprocessed as :func:`fruitdask.features.featurize.preprocess`
    does, output the last feature maps. Imports TensorFlow (only here)."""
    import openvino as ov

    from fruitdask.features.runtimes.tensorflow import build_vgg16

    keras_model = build_vgg16(image_size, precision="float32")
    keras_model.set_weights(weights)
    with tempfile.TemporaryDirectory(prefix="fruitdask-savedmodel-") as tmp:
        keras_model.export(tmp, format="tf_saved_model", verbose=False)
        model = ov.convert_model(tmp)
    model.reshape([-1, image_size, image_size, 3])
    return model


def quantize(model: Any, images: np.ndarray) -> Any:
    """NNCF's default post-training int8 quantization of ``model`` on preprocessed ``images``."""
    import nncf

    data = nncf.Dataset([images[i : i + 1] for i in range(len(images))])
    return nncf.quantize(model, data, subset_size=len(images))


def _save(model: Any, target: Path) -> None:
    """Save IR atomically: written in a sibling folder, then renamed, so a process that reads
    the cache never sees half a model (two writers: the last rename wins, same bytes)."""
    import openvino as ov

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        try:
            os.replace(tmp, target)
        except OSError:  # another process renamed its copy first
            if not (target / "model.xml").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached(key: str, make: Callable[[], Any]) -> Any:
    """The IR named ``key`` from the cache, else ``make()``'s model, saved there."""
    import openvino as ov

    target = cache_dir() / key
    if (target / "model.xml").exists():
        EVENTS["loaded"] += 1
        return ov.Core().read_model(str(target / "model.xml"))
    model = make()
    _save(model, target)
    logger.info("cached OpenVINO IR in %s", target)
    return model


def _ir(weights_sha256: str, image_size: int, precision: str, load_weights: Callable[[], list[np.ndarray]],
        calibration: Callable[[], np.ndarray] | None, calibration_digest: str | None) -> tuple[str, Any]:
    """The IR for ``precision`` and its cache key. float32 and bfloat16 share the float32 IR
    (bf16 is a compile-time hint); int8 is quantized from it and cached under its own key."""

    def converted() -> Any:
        EVENTS["converted"] += 1
        return convert(load_weights(), image_size)

    f32_key = cache_key(weights_sha256, image_size, "float32")
    if precision != "int8":
        return f32_key, _cached(f32_key, converted)

    def quantized() -> Any:
        if calibration is None:
            raise ValueError("int8 needs calibration images: pass calibration=")
        model = quantize(_cached(f32_key, converted), calibration())
        EVENTS["quantized"] += 1
        return model

    key = cache_key(weights_sha256, image_size, "int8", calibration_digest)
    return key, _cached(key, quantized)


class OpenVINOModel:
    """A compiled OpenVINO VGG16: decoded uint8 images in, feature maps out."""

    name = NAME

    def __init__(self, compiled: Any, precision: str, key: str) -> None:
        self.compiled = compiled
        self.precision = precision
        self.key = key
        self._request_lock = threading.Lock()

    def featurize(self, batch: np.ndarray) -> np.ndarray:
        """Feature maps of decoded ``(n, s, s, 3)`` uint8 images (one request at a time per model)."""
        x = np.ascontiguousarray(preprocess(batch))
        with self._request_lock:
            out = self.compiled(x)
        return np.asarray(out[0], dtype=np.float32)

    def describe(self) -> dict[str, str]:
        """What runs: runtime, version, requested precision and the CPU plugin's effective one
        (on a CPU without bf16 instructions OpenVINO still reports ``bf16`` and emulates it)."""
        import openvino as ov

        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        effective = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        return {"runtime": NAME, "version": ov.__version__, "precision": self.precision,
                "inference_precision": effective, "cache_key": self.key}


def load(weights_sha256: str, image_size: int, precision: str, load_weights: Callable[[], list[np.ndarray]], *,
         threads: int | None = None, calibration: Callable[[], np.ndarray] | None = None,
         calibration_digest: str | None = None) -> OpenVINOModel:
    """This process's compiled model for these settings, built once (see the module docstring).

    ``load_weights`` and ``calibration`` are only called when the IR is not cached yet.
    """
    import openvino as ov

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} for OpenVINO: use one of {', '.join(PRECISIONS)}")
    if precision == "int8" and not calibration_digest:
        raise ValueError("int8 needs the calibration set's digest (it names the quantized model)")
    with _LOCK:
        if (weights_sha256, image_size, precision, calibration_digest) in _MODELS:
            return _MODELS[weights_sha256, image_size, precision, calibration_digest]
        key, ir = _ir(weights_sha256, image_size, precision, load_weights, calibration, calibration_digest)
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINT[precision]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        compiled = ov.Core().compile_model(ir, "CPU", config)
        model = _MODELS[weights_sha256, image_size, precision, calibration_digest] = OpenVINOModel(compiled, precision, key)
    logger.info("OpenVINO VGG16 %s", model.describe())
    return model


def counts() -> dict[str, int]:
    """This process's :data:`EVENTS` (run with ``client.run`` in tests)."""
    return dict(EVENTS)


class OpenVINORuntime:
    """The ``openvino`` runtime behind the seam: :meth:`prepare` gives it the model of
    :func:`load` (cached IR, else converted, and quantized on the settings' calibration set)."""

    name = NAME

    def __init__(self, settings: FeatureSettings, threads: int | None = None) -> None:
        if settings.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {settings.precision!r} for OpenVINO: use one of {', '.join(PRECISIONS)}")
        self.image_size, self.precision, self.threads = settings.image_size, settings.precision, threads
        self.model: OpenVINOModel | None = None

    def warm_up(self) -> float:
        """Import OpenVINO (the model itself needs the weights, or their cached IR)."""
        t0 = time.perf_counter()
        import openvino  # noqa: F401

        return time.perf_counter() - t0

    def prepare(self, weights: WeightsSource, settings: FeatureSettings) -> None:
        """The model for ``weights`` and ``settings``: the weights and, for int8, the calibration
        images (read by key) are only used when the converted model is not cached here."""
        from fruitdask.features.calibration import digest_of, load_images

        s = settings
        calib = None
        if s.precision == "int8":
            if not s.calibration:
                raise ValueError("int8 settings without a calibration set (FeatureSettings.calibration)")
            text = s.calibration
            calib = lambda: preprocess(load_images(text, s.image_size, s.storage_options))  # noqa: E731
        self.model = load(weights.sha256, s.image_size, s.precision, weights.load, threads=self.threads,
                          calibration=calib, calibration_digest=digest_of(s.calibration))

    def featurize(self, batch: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("OpenVINORuntime.featurize before prepare")
        return self.model.featurize(batch)

    def describe(self) -> dict[str, str]:
        import openvino as ov

        return self.model.describe() if self.model else {"runtime": NAME, "precision": self.precision,
                                                         "version": ov.__version__}


ENTRY = RuntimeEntry(name=NAME, precisions=PRECISIONS, create=OpenVINORuntime, available=available)
