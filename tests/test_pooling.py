"""``--pooling avg|max|none`` end to end, at 64 px, against a plain Keras VGG16.

At the 32 px of the other tests VGG16's last feature map is 1 x 1, where the three poolings
give the same numbers. At 64 px it is 2 x 2: average, maximum and the flattened map
(4 x 512 = 2,048 values) differ, so a run that ignored ``--pooling`` fails here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import BUNDLED, copy_images, read_features
from PIL import Image

from fruitdask import cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIZE = 64  # VGG16's last map: 2 x 2 x 512
POOLINGS = ("avg", "max", "none")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return copy_images(BUNDLED, tmp_path_factory.mktemp("pooling") / "Training", 3, 2)


@pytest.fixture(scope="module")
def features(module_local_cluster, images, weights_file, tmp_path_factory) -> dict[str, pd.DataFrame]:
    """The ``features`` column of one ``fruitdask run`` per pooling, rows sorted by path."""
    cluster, _ = module_local_cluster(1, 1, processes=False, client=False)
    written = {}
    for pooling in POOLINGS:
        out = tmp_path_factory.mktemp(f"run-{pooling}") / "out"
        code = cli.main([
            "run", "--input", str(images), "--output", str(out), "--cluster", cluster.scheduler_address,
            "--image-size", str(SIZE), "--pooling", pooling, "--precision", "float32",
            "--weights", str(weights_file), "--partition-size", "3", "--components", "2", "-q",
        ])
        assert code == 0, pooling
        written[pooling] = read_features(out, arrow=False).sort_values("path").reset_index(drop=True)
    return written


@pytest.fixture(scope="module")
def reference(features, weights_file) -> dict[str, np.ndarray]:
    """Keras' own VGG16 (its ``pooling=`` argument) on the same images, decoded with PIL."""
    import keras
    from keras.applications.vgg16 import preprocess_input

    paths = features["avg"]["path"]
    batch = preprocess_input(np.stack([
        np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.float32)
        for p in paths
    ]))
    out = {}
    for pooling in POOLINGS:
        vgg = keras.applications.VGG16(
            weights=None, include_top=False, input_shape=(SIZE, SIZE, 3), pooling=None if pooling == "none" else pooling
        )
        vgg.load_weights(str(weights_file))
        out[pooling] = vgg.predict(batch, verbose=0).reshape(len(paths), -1)
    return out


def _matrix(df: pd.DataFrame) -> np.ndarray:
    return np.stack(df["features"].to_numpy()).astype(np.float32)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_run_features_match_keras_pooling(features, reference, pooling):
    ours, theirs = _matrix(features[pooling]), reference[pooling]
    assert ours.shape == theirs.shape == (6, 2048 if pooling == "none" else 512)
    scale = float(np.abs(theirs).max())
    assert scale > 0
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale)


def test_the_three_poolings_differ_at_64_px(features):
    avg, mx, flat = (_matrix(features[p]) for p in POOLINGS)
    assert list(features["avg"]["path"]) == list(features["max"]["path"]) == list(features["none"]["path"])
    assert not np.allclose(avg, mx, rtol=1e-3, atol=1e-6), "avg and max pooling gave the same features"
    maps = flat.reshape(len(flat), 4, 512)  # the 2 x 2 positions of each channel
    np.testing.assert_allclose(maps.mean(axis=1), avg, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps.max(axis=1), mx, rtol=1e-4, atol=1e-5)
