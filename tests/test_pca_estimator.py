"""The PCA estimator (:class:`fruitdask.reduce.PCA`): its strategy comes from the feature
width, its moments step merges in any order, both strategies give today's numbers (those
of :mod:`fruitdask.pca_moments` and :func:`fruitdask.pca_streamed.fit_incremental_pca`,
checked against scikit-learn's exact PCA), and a run whose features are too wide for moments
fits through the streamed strategy end to end. Every test here fails before this change
(there was no estimator: ``fruitdask.reduce`` held the streamed path only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import BUNDLED, copy_images
from sklearn.decomposition import PCA as SkPCA

from fruitdask import pca_moments
from fruitdask.errors import ReductionError
from fruitdask.pca_moments import MAX_MOMENT_FEATURES, Moments
from fruitdask.pca_streamed import fit_incremental_pca
from fruitdask.reduce import PCA, Reduction

REPO = Path(__file__).resolve().parents[1]


def _lowrank(n: int, d: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d)) + 0.05 * rng.normal(size=(n, d)) + 2).astype(np.float32)


def _standardized(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.mean(0)) / x.std(0)


def test_the_strategy_comes_from_the_feature_width():
    assert PCA(512).strategy == PCA(MAX_MOMENT_FEATURES).strategy == "moments"
    assert PCA(MAX_MOMENT_FEATURES + 1).strategy == PCA(25088).strategy == "streamed"
    with pytest.raises(ReductionError, match="call fit on a dask array"):
        PCA(25088).partial_fit(np.zeros((3, 25088), np.float32))
    with pytest.raises(ReductionError, match=r"pass an \(n, 64\) array"):
        PCA(64).partial_fit(np.zeros((3, 65), np.float32))


def test_moments_strategy_merges_in_any_order_and_matches_scikit_learn():
    x = _lowrank(300, 96, 8)
    one = PCA(96, variance=0.9).fit(x)
    pieces = PCA(96, variance=0.9).partial_fit(x[200:]).merge(Moments.of(x[:70])).partial_fit(x[70:200])
    two = pieces.finish()
    # Today's numbers: the moments of the whole set through pca_moments.fit.
    today = pca_moments.fit(Moments.of(x), components=None, variance=0.9)
    for red in (one, two):
        np.testing.assert_allclose(red.explained_variance_ratio, today.explained_variance_ratio, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(red.components, today.components, rtol=1e-6, atol=1e-9)
        assert red.k == today.k
    ref = SkPCA(n_components=one.k, svd_solver="full").fit(_standardized(x))
    np.testing.assert_allclose(pieces.explained_variance_ratio_[: one.k], ref.explained_variance_ratio_, rtol=1e-6)
    np.testing.assert_allclose(np.abs(pieces.transform(x)), np.abs(ref.transform(_standardized(x))), rtol=1e-3, atol=1e-3)
    assert pieces.components_.shape == (one.k, 96) and pieces.explained_variance_.shape == pieces.explained_variance_ratio_.shape


def test_streamed_strategy_is_incremental_pca_with_power_iterations():
    """Fixed K on features too wide for moments: dask-ml's IncrementalPCA, randomized, with
    the estimator's power iterations; the same numbers as calling the streamed path directly."""
    d = MAX_MOMENT_FEATURES + 104
    x = _lowrank(90, d, 4, seed=3)
    with dask.config.set(scheduler="sync"):
        red = PCA(d, components=3, batch_size=45, power_iterations=2, seed=7).fit(da.from_array(x, chunks=(30, d)))
        today = fit_incremental_pca(da.from_array(x, chunks=(30, d)), components=3, variance=0.95, batch_size=45,
                                    power_iterations=2, seed=7)
    assert "IncrementalPCA (randomized, 2 power iterations)" in red.method
    np.testing.assert_allclose(red.components, today.components, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(red.explained_variance_ratio, today.explained_variance_ratio, rtol=1e-9)
    # Batches of 45 rows: close to the exact PCA, not equal (the streamed path's own tests bound it).
    ref = SkPCA(n_components=3, svd_solver="full").fit(_standardized(x))
    np.testing.assert_allclose(red.explained_variance_ratio, ref.explained_variance_ratio_, rtol=0.03)


class _Rows:
    """Rows that record which shape the estimator asked for."""

    def __init__(self, x: np.ndarray) -> None:
        self.x, self.asked = x, []

    def moments(self) -> Moments | None:
        self.asked.append("moments")
        return Moments.of(self.x)

    def stream(self, fit: PCA) -> Reduction:
        self.asked.append("stream")
        with dask.config.set(scheduler="sync"):
            return fit.fit(da.from_array(self.x, chunks=(len(self.x), -1)))


def test_fit_rows_asks_the_rows_for_the_shape_of_its_strategy():
    narrow, wide = _Rows(_lowrank(40, 32, 3)), _Rows(_lowrank(40, MAX_MOMENT_FEATURES + 8, 3))
    assert PCA(32, variance=0.9).fit_rows(narrow).n_samples == 40
    assert PCA(MAX_MOMENT_FEATURES + 8, variance=0.9).fit_rows(wide).n_samples == 40
    assert (narrow.asked, wide.asked) == (["moments"], ["stream"])


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_with_features_too_wide_for_moments_fits_them_streamed(tmp_path, weights_file):
    """``--pooling none`` at 96 px gives 3 x 3 x 512 = 4,608 features a row: the run's PCA
    takes the streamed strategy (the Dask backend hands the rows as one array to the
    estimator), exact from the Gram spectrum at this size."""
    copy_images(BUNDLED, tmp_path / "in", 2, 4)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "fruitdask", "run", "--input", "in", "--output", "out", "--weights", str(weights_file),
         "--pooling", "none", "--image-size", "96", "--precision", "float32", "--workers", "1", "--threads-per-worker", "2",
         "--partition-size", "4", "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "run.json").read_text())
    assert doc["reduction"]["n_features"] == 4608 and doc["reduction"]["n_samples"] == 8
    assert "Gram" in doc["reduction"]["method"], doc["reduction"]["method"]
    fit = Reduction.from_npz((tmp_path / "out" / "reduction.npz").read_bytes())
    assert fit.components.shape == (doc["reduction"]["k"], 4608)
