"""Weights files read with h5py alone equal what Keras loads, and the client of a run with a
weights file never imports TensorFlow (issue 14, fixed cost)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_SIZE

from fruitdask.errors import WeightsError
from fruitdask.features import model
from fruitdask.features.runtimes import tensorflow as tf_runtime
from fruitdask.features.runtimes.tensorflow import build_vgg16, import_keras
from fruitdask.features.weights_file import WeightsFile, npz_bytes, read_weights

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keras_model():
    """A VGG16 with seeded weights other than the conftest file's, so a mix-up shows."""
    keras = import_keras()
    keras.utils.set_random_seed(77)
    return build_vgg16(SMALL_SIZE)


def _keras_loaded(path: Path) -> list[np.ndarray]:
    vgg = build_vgg16(SMALL_SIZE)
    vgg.load_weights(str(path))
    return vgg.get_weights()


def _assert_same(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    assert len(ours) == len(theirs) == 26
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_keras3_weights_h5_reads_like_keras(weights_file):
    ours = read_weights(str(weights_file))
    _assert_same(ours, _keras_loaded(weights_file))
    assert [w.shape for w in ours] == model.VGG16_NOTOP_SHAPES


def test_legacy_h5_like_the_imagenet_file_reads_like_keras(tmp_path, keras_model):
    """The layout of vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 (Keras 2's
    save_weights: ``layer_names`` / ``weight_names`` attributes), written by Keras itself."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    path = tmp_path / "vgg16_notop_legacy.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, keras_model)
    assert "layer_names" in h5py.File(path).attrs
    ours = read_weights(str(path))
    _assert_same(ours, _keras_loaded(path))
    _assert_same(ours, keras_model.get_weights())


def test_keras_zip_and_staged_npz_read_like_keras(tmp_path, keras_model):
    path = tmp_path / "vgg16.keras"
    keras_model.save(path)
    _assert_same(read_weights(str(path)), keras_model.get_weights())
    staged = tmp_path / "w.npz"
    staged.write_bytes(npz_bytes(keras_model.get_weights()))
    _assert_same(read_weights(str(staged)), keras_model.get_weights())


def test_imagenet_cached_file_is_read_without_keras(tmp_path, keras_model, monkeypatch):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    (tmp_path / "models").mkdir()
    with h5py.File(tmp_path / "models" / model.IMAGENET_NOTOP_FILE, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, keras_model)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(tf_runtime, "build_vgg16", lambda *a, **k: pytest.fail("Keras was used to read a weights file"))
    weights, info = model.load_weights("imagenet")
    assert info.kind == "imagenet"
    _assert_same(weights, keras_model.get_weights())


def test_wrong_shapes_and_changed_files_are_refused(tmp_path, keras_model):
    bad = tmp_path / "small.npz"
    bad.write_bytes(npz_bytes(keras_model.get_weights()[:4]))
    with pytest.raises(WeightsError, match="do not fit VGG16 without top"):
        model.load_weights(str(bad))
    staged = tmp_path / "w.npz"
    staged.write_bytes(npz_bytes(keras_model.get_weights()))
    source = WeightsFile(str(staged), model.weights_digest(keras_model.get_weights()))
    _assert_same(source.load(), keras_model.get_weights())
    staged.write_bytes(npz_bytes([w + 1 for w in keras_model.get_weights()]))
    with pytest.raises(WeightsError, match="changed during the run"):
        source.load()


@pytest.mark.integration
@pytest.mark.slow
def test_client_of_a_run_with_a_weights_file_never_imports_tensorflow(tmp_path, tiny_images, weights_file):
    """The whole CLI run in a fresh process (its workers import TensorFlow in theirs)."""
    script = textwrap.dedent("""
        import sys
        from fruitdask import cli
        code = cli.main(sys.argv[1:])
        loaded = sorted(m for m in ("tensorflow", "keras") if m in sys.modules)
        print("CLIENT_IMPORTED", ",".join(loaded) or "-")
        sys.exit(code)
    """)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", script, "run", "--input", str(tiny_images), "--output", str(out),
         "--weights", str(weights_file), "--image-size", str(SMALL_SIZE), "--workers", "1",
         "--threads-per-worker", "1", "--quiet"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CLIENT_IMPORTED -" in proc.stdout, proc.stdout
    assert (out / "_SUCCESS").exists()
