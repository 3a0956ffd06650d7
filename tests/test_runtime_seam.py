"""The inference-runtime seam (fruitdask.features.runtimes): the registry, the TensorFlow
runtime's numbers (bit for bit those of plain Keras), and a second runtime from the tests
(runtime_doubles.NumpyRuntime, registered by a plugin) running a whole ``fruitdask run``
in a subprocess without TensorFlow ever imported by the workers that featurized."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SMALL_SIZE, read_features
from runtime_doubles import NUMPY_RUNTIME, NumpyRuntime, projection

from fruitdask import checkpoint
from fruitdask.errors import ConfigError
from fruitdask.features import featurize, model, runtimes
from fruitdask.features.runtimes.tensorflow import build_vgg16
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsArrays
from fruitdask.lake import keys

TESTS = Path(__file__).resolve().parent


def test_registry_names_its_runtimes_and_refuses_others_with_the_fix():
    entry = runtimes.get_runtime("tensorflow")
    assert entry.name == runtimes.DEFAULT_RUNTIME == "tensorflow" and entry.precisions == ("float32", "bfloat16")
    assert entry.available() and "tensorflow" in runtimes.available_runtimes()
    with pytest.raises(ConfigError, match=r"unknown inference runtime 'onnx': use one of .*tensorflow.*FRUITDASK_RUNTIME_PLUGINS"):
        runtimes.get_runtime("onnx")
    with pytest.raises(ConfigError, match=r"runtime_doubles:nowhere.*module:function"):
        runtimes.load_plugins("runtime_doubles:nowhere")
    runtimes.load_plugins("runtime_doubles:register")
    assert runtimes.get_runtime(NUMPY_RUNTIME).create is NumpyRuntime


def test_importing_the_seam_and_the_featurizing_modules_does_not_import_tensorflow():
    code = ("import sys; import fruitdask.features.runtimes, fruitdask.features.model, fruitdask.features.frames, "
            "fruitdask.serve.predictor; print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert out.strip() == "[]"


def test_the_tensorflow_runtime_gives_plain_keras_numbers_bit_for_bit(weights_file, tiny_images):
    """float32 through the seam (cached runtime, featurize_bytes) equals plain Keras:
    ``preprocess_input``, ``predict_on_batch``, mean over the map, exactly."""
    from keras.applications.vgg16 import preprocess_input

    weights = model.load_weights(str(weights_file))[0]
    settings = FeatureSettings("seam-parity", SMALL_SIZE, "avg", 4)
    runtime = model.cached_runtime(WeightsArrays.of(weights, "seam-parity"), settings)
    assert runtime.describe()["runtime"] == "tensorflow" and runtime.describe()["precision"] == "float32"
    contents = [p.read_bytes() for p in sorted(tiny_images.rglob("*.jpg"))[:4]]
    got = featurize.featurize_bytes(runtime, contents, SMALL_SIZE, "avg", 4).features
    keras_model = build_vgg16(SMALL_SIZE)
    keras_model.set_weights(weights)
    images = np.stack([featurize.decode_image(c, SMALL_SIZE) for c in contents]).astype(np.float32)
    want = np.asarray(keras_model.predict_on_batch(preprocess_input(images))).mean(axis=(1, 2))
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_the_runtime_is_in_the_fingerprints_only_when_it_is_not_tensorflow():
    """Tables and checkpoints written before the seam keep their fingerprints."""
    base = FeatureSettings("w", 32, "avg", 8)
    old_table = hashlib.sha256(f"table-v{keys.TABLE_FORMAT}|w|32|avg|float32".encode()).hexdigest()[:16]
    assert keys.settings_fingerprint(base) == old_table
    other = FeatureSettings("w", 32, "avg", 8, runtime=NUMPY_RUNTIME)
    assert keys.settings_fingerprint(other) != old_table
    assert checkpoint.fingerprint(other) != checkpoint.fingerprint(base)
    assert FeatureSettings.from_json(other.to_json()) == other


def test_a_run_with_a_numpy_runtime_from_a_plugin_never_imports_tensorflow(tmp_path, tiny_images, weights_file):
    """``python -m fruitdask run`` with ``FRUITDASK_RUNTIME=numpy-test`` registered by
    ``FRUITDASK_RUNTIME_PLUGINS``: the workers featurize every image with the NumPy runtime
    (markers left by each batch, in processes other than the command's, TensorFlow not
    imported there), and the table holds that runtime's features. Fails on the code before
    the seam (no plugin hook, the model was Keras' whatever the environment)."""
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "FRUITDASK_RUNTIME": NUMPY_RUNTIME,
           "FRUITDASK_RUNTIME_PLUGINS": "runtime_doubles:register", "FRUITDASK_TEST_MARKERS": str(markers)}
    args = ["run", "--input", str(tiny_images), "--output", "out", "--image-size", str(SMALL_SIZE),
            "--weights", str(weights_file), "--precision", "float32", "--workers", "1", "--partition-size", "4", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "fruitdask", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    seen = [json.loads(p.read_text()) for p in markers.iterdir()]
    assert sum(m["images"] for m in seen) == 12, seen
    assert {m["pid"] for m in seen}.isdisjoint({proc.pid}), "the command featurized instead of its workers"
    assert not any(m["tensorflow_imported"] for m in seen), seen
    df = read_features(tmp_path / "out")
    assert len(df) == 12
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    matrix = projection(run["weights"]["sha256"])
    for path, got in zip(df["path"], df["features"], strict=True):
        image = featurize.decode_image(Path(path).read_bytes(), SMALL_SIZE).astype(np.float32) / 255.0
        want = np.maximum(image.reshape(-1) @ matrix, 0.0)  # one 32x32 block at 32 px
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-5, atol=1e-6)
