"""Reduce the features with PCA: one estimator, :class:`PCA`, that standardizes the rows
(population scale) and keeps the K principal axes, K given or the smallest reaching a
variance target. It returns a :class:`~fruitdask.reduction.Reduction` (portable ``.npz``).

Two strategies; the estimator picks one from the feature width (:meth:`PCA.strategy`):

- ``moments`` (the default, features up to :data:`MAX_MOMENT_FEATURES` wide: avg/max
  pooling gives 512): exact PCA. Each task sums the moments of its rows (count, mean,
  centred scatter, :class:`~fruitdask.pca_moments.Moments`); :meth:`PCA.partial_fit` and
  :meth:`PCA.merge` add rows or moments to the estimator, in any order (Chan's pairwise
  update: the merge is the step of a tree reduction), and the fit is one ``eigh`` of the
  ``d x d`` correlation matrix (:mod:`fruitdask.pca_moments`).
- ``streamed`` (wider features, ``--pooling none``, whose scatter matrix would be gigabytes):
  the rows as one lazy dask array, standardized, then dask-ml's IncrementalPCA with the
  randomized solver and ``power_iterations`` power iterations, or the exact Gram spectrum up
  to 8,192 rows (:mod:`fruitdask.pca_streamed`).

:meth:`PCA.fit_rows` fits on rows that can come in both shapes (the features table's, see
:class:`Rows`) and asks them for the one its strategy uses. Numbers only: the scree plot of a
:class:`Reduction` is drawn by the report (:func:`fruitdask.report.plots.scree_png`).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import numpy as np

from fruitdask import pca_moments, pca_streamed
from fruitdask.errors import ReductionError
from fruitdask.pca_moments import MAX_MOMENT_FEATURES, Moments
from fruitdask.reduction import Reduction

Strategy = Literal["moments", "streamed"]

__all__ = ["MAX_MOMENT_FEATURES", "PCA", "Reduction", "Rows", "Strategy", "strategy_for"]


def strategy_for(n_features: int) -> Strategy:
    """``moments`` up to :data:`MAX_MOMENT_FEATURES` features per row, ``streamed`` above."""
    return "moments" if n_features <= MAX_MOMENT_FEATURES else "streamed"


class Rows(Protocol):
    """Rows the estimator can fit on, in the two shapes its strategies take."""

    def moments(self) -> Moments | None:
        """The moments of every row, summed where the rows lie (None: no rows)."""
        ...

    def stream(self, fit: PCA) -> Reduction:
        """``fit.fit(X)`` on every row as one lazy ``(n, d)`` dask array."""
        ...


class PCA:
    """Standardize + PCA of feature rows ``n_features`` wide (scikit-learn's conventions:
    ``__init__`` only stores, the fit validates).

    Parameters
    ----------
    n_features
        The width of a row: it decides the strategy (:func:`strategy_for`).
    components
        K, or None to take the smallest K whose explained variance reaches ``variance``.
    variance
        The variance target when ``components`` is None.
    batch_size, power_iterations, seed
        The streamed strategy's IncrementalPCA: rows per batch, power iterations of its
        randomized solver (keep them above 0: dask-ml's default of 0 under-reports the
        variance), and its random state.
    """

    def __init__(self, n_features: int, *, components: int | None = None, variance: float = 0.95,
                 batch_size: int | None = None, power_iterations: int = 2, seed: int = 0) -> None:
        self.n_features = n_features
        self.components = components
        self.variance = variance
        self.batch_size = batch_size
        self.power_iterations = power_iterations
        self.seed = seed
        self.moments_: Moments | None = None
        self.reduction_: Reduction | None = None

    @property
    def strategy(self) -> Strategy:
        return strategy_for(self.n_features)

    def partial_fit(self, X: np.ndarray) -> PCA:
        """Add the rows of ``X`` (``moments`` strategy): their moments merge into the fit's."""
        return self.merge(Moments.of(self._checked(X)))

    def merge(self, moments: Moments | None) -> PCA:
        """Add rows summed elsewhere (a task's :class:`Moments`, or a tree reduction's)."""
        self._needs("moments", "merge")
        if moments is not None:
            self.moments_ = moments if self.moments_ is None else self.moments_.merge(moments)
        return self

    def finish(self) -> Reduction:
        """The exact fit of every row added so far (``moments`` strategy)."""
        self._needs("moments", "finish")
        self.reduction_ = pca_moments.fit(self.moments_, components=self.components, variance=self.variance)
        return self.reduction_

    def fit(self, X: Any) -> Reduction:
        """Fit on every row of ``X``: a NumPy array, or a dask array (streamed by ``streamed``)."""
        if self.strategy == "moments":
            self.moments_ = None
            return self.partial_fit(np.asarray(X)).finish()
        import dask.array as da

        X = X if isinstance(X, da.Array) else da.from_array(np.asarray(X), chunks=(max(1, self.batch_size or 1024), -1))
        self._checked(X)
        self.reduction_ = pca_streamed.fit_incremental_pca(
            X, components=self.components, variance=self.variance, batch_size=self.batch_size,
            power_iterations=self.power_iterations, seed=self.seed)
        return self.reduction_

    def fit_rows(self, rows: Rows) -> Reduction:
        """Fit on ``rows`` in the shape this estimator's strategy takes (moments, or a stream)."""
        if self.strategy == "moments":
            self.moments_ = None
            return self.merge(rows.moments()).finish()
        return rows.stream(self)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Project rows ``(n, d)`` to ``(n, K)`` float32 with the fit."""
        return self._fitted().transform(X)

    @property
    def explained_variance_(self) -> np.ndarray:
        return self._fitted().explained_variance

    @property
    def explained_variance_ratio_(self) -> np.ndarray:
        return self._fitted().explained_variance_ratio

    @property
    def components_(self) -> np.ndarray:
        return self._fitted().components

    def _fitted(self) -> Reduction:
        if self.reduction_ is None:
            raise ReductionError("this PCA is not fitted yet: call fit, fit_rows or finish first")
        return self.reduction_

    def _needs(self, strategy: Strategy, step: str) -> None:
        if self.strategy != strategy:
            raise ReductionError(
                f"PCA.{step} sums moments, but {self.n_features:,} features per row are fitted by the {self.strategy} "
                f"strategy (moments up to {MAX_MOMENT_FEATURES:,}): call fit on a dask array of the rows instead"
            )

    def _checked(self, X: Any) -> Any:
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ReductionError(
                f"PCA of {self.n_features} features per row got rows of shape {tuple(X.shape)}: pass an "
                f"(n, {self.n_features}) array"
            )
        return X
