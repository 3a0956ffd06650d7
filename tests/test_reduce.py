"""The reduction: K validation, the variance rule, accuracy against sklearn's exact PCA."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from sklearn.decomposition import PCA

from fruitdask.errors import ReductionError
from fruitdask.pca_streamed import fit_incremental_pca, plan_pca
from fruitdask.reduction import Reduction, choose_k
from fruitdask.report.plots import scree_png


def _standardized(x: np.ndarray) -> np.ndarray:
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)


def _lowrank(n: int, d: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d)) * np.linspace(3, 0.5, d)
    return (base + 0.05 * rng.normal(size=(n, d))).astype(np.float32)


def test_choose_k_is_smallest_reaching_target():
    ratios = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
    assert choose_k(ratios, 0.5) == 1
    assert choose_k(ratios, 0.8) == 2
    assert choose_k(ratios, 0.81) == 3
    assert choose_k(ratios, 1.0) == 5


@pytest.mark.parametrize(
    ("components", "batch", "fix"),
    [(600, None, "--components 512 or fewer"), (200, None, "--components 150 or fewer"), (100, 50, "--pca-batch-size 100")],
)
def test_plan_refuses_impossible_k_and_says_the_fix(components, batch, fix):
    with pytest.raises(ReductionError, match=fix.replace("-", r"\-")):
        plan_pca(150, 512, components, batch)


def test_plan_fits_as_many_components_as_batches_allow():
    plan = plan_pca(120, 512, None, None)
    assert (plan.n_fit, plan.batch_size, plan.fixed_k) == (120, 120, None)
    assert plan_pca(5000, 512, None, 1000).n_fit == 512


def test_single_batch_matches_sklearn_exact_pca():
    x = _lowrank(150, 64, 10)
    with dask.config.set(scheduler="sync"):
        red = fit_incremental_pca(da.from_array(x, chunks=50), components=None, variance=0.95, batch_size=None)
    exact = PCA().fit(_standardized(x.astype(np.float64)))
    n = len(red.explained_variance_ratio)
    np.testing.assert_allclose(red.explained_variance_ratio, exact.explained_variance_ratio_[:n], atol=1e-6)
    assert red.k == choose_k(exact.explained_variance_ratio_, 0.95)
    # Same subspace: projections agree up to the sign of each component.
    ours = red.transform(x)
    theirs = exact.transform(_standardized(x.astype(np.float64)))[:, : red.k]
    np.testing.assert_allclose(np.abs(ours), np.abs(theirs), atol=1e-3)


def test_streaming_batches_stay_close_to_exact_on_low_rank_features():
    x = _lowrank(900, 128, 12, seed=3)
    with dask.config.set(scheduler="sync"):
        red = fit_incremental_pca(da.from_array(x, chunks=100), components=20, variance=0.95, batch_size=300)
    exact = PCA(n_components=20).fit(_standardized(x.astype(np.float64)))
    np.testing.assert_allclose(red.explained_variance_ratio, exact.explained_variance_ratio_, atol=1e-3)
    assert red.k == 20 and red.variance_target is None


def test_reduction_round_trips_and_plots(tmp_path):
    x = _lowrank(60, 16, 4)
    with dask.config.set(scheduler="sync"):
        red = fit_incremental_pca(da.from_array(x, chunks=30), components=None, variance=0.9, batch_size=None)
    back = Reduction.from_npz(red.to_npz())
    np.testing.assert_array_equal(back.components, red.components)
    assert back.k == red.k and back.variance_target == 0.9
    np.testing.assert_allclose(back.transform(x), red.transform(x))
    png = scree_png(red.explained_variance_ratio, k=red.k, variance_target=red.variance_target)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def _decaying(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Features with a smoothly decaying spectrum (like VGG16's), not a few exact ranks."""
    rng = np.random.default_rng(seed)
    scales = 1.0 / (1.0 + np.arange(min(n, d))) ** 0.8
    u = rng.normal(size=(n, len(scales)))
    v = rng.normal(size=(len(scales), d))
    return ((u * scales) @ v + 0.01 * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("gram_max", [10_000, 50], ids=["gram-exact", "randomized"])
def test_k_from_the_spectrum_matches_sklearn_exact_pca(gram_max):
    x = _decaying(120, 300, seed=5)
    z = _standardized(x.astype(np.float64))
    exact = PCA().fit(z)
    with dask.config.set(scheduler="sync"):
        red = fit_incremental_pca(da.from_array(x, chunks=40), components=None, variance=0.9, batch_size=None,
                                  gram_max_samples=gram_max)
    assert red.k == choose_k(exact.explained_variance_ratio_, 0.9)
    assert red.components.shape == (red.k, 300)
    assert ("Gram" in red.method) == (gram_max > 120)
    if gram_max > 120:  # exact: the applied axes are sklearn's, signs included
        np.testing.assert_allclose(red.components, exact.components_[: red.k], atol=1e-6)
        assert red.n_fitted == red.k and red.summary()["n_fit_components"] == red.k
    else:
        # Above the Gram size: one IncrementalPCA pass fits many components, K read off them.
        assert "K from its own spectrum" in red.method and red.k < red.summary()["n_fit_components"]
    # What the applied components really explain, measured on the data, against exact PCA.
    projected = red.transform(x).astype(np.float64)
    reached = projected.var(axis=0, ddof=1).sum() / z.var(axis=0, ddof=1).sum()
    assert abs(reached - exact.explained_variance_ratio_[: red.k].sum()) < 1e-3
    assert abs(red.variance_reached - exact.explained_variance_ratio_[: red.k].sum()) < 1e-3
    back = Reduction.from_npz(red.to_npz())
    assert back.n_fitted == red.n_fitted


def test_gram_spectrum_is_the_exact_spectrum():
    from fruitdask.pca_streamed import gram_spectrum

    x = _decaying(90, 200, seed=2)
    z = _standardized(x.astype(np.float64))
    with dask.config.set(scheduler="sync"):
        spec = gram_spectrum(da.from_array(z, chunks=(25, 200)))
    exact = PCA().fit(z).explained_variance_ratio_
    np.testing.assert_allclose(spec.ratios[: len(exact)], exact, atol=1e-10)
    assert spec.exact
