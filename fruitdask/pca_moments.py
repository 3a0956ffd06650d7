"""The PCA's default strategy (:class:`fruitdask.reduce.PCA` chooses it): exact PCA at any
number of rows, from moments that a tree reduction sums.

Each task returns the moments of its rows (count, mean, centred scatter ``sum (x-m)(x-m)^T``,
``d x d`` float64); pairs are merged with Chan's update, which stays accurate where raw sums
of ``x x^T`` would cancel; the client decomposes the final ``d x d`` correlation matrix. No
``n x n`` Gram matrix, no task whose input grows with the number of rows: the PCA of 10^6
images costs one pass over the features and one ``eigh`` of ``512 x 512``.

Used for features up to :data:`MAX_MOMENT_FEATURES` wide (avg/max pooling: 512); wider ones
(``--pooling none``: 25,088 at 224 px) take the streamed strategy
(:mod:`fruitdask.pca_streamed`), since their scatter matrix would be 5 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fruitdask.errors import ReductionError
from fruitdask.reduction import Reduction, choose_k, safe_scale

#: Widest features whose ``d x d`` scatter matrix is summed (4,096: 128 MiB a task).
MAX_MOMENT_FEATURES = 4096


@dataclass
class Moments:
    """Count, mean and centred scatter matrix of a set of feature rows (float64)."""

    n: int
    mean: np.ndarray
    scatter: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> Moments | None:
        """The moments of the rows of ``x`` (None for no rows)."""
        if x.shape[0] == 0:
            return None
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=0)
        centred = x - mean
        return cls(int(x.shape[0]), mean, centred.T @ centred)

    def merge(self, other: Moments | None) -> Moments:
        """The moments of the union of both sets of rows (Chan et al.'s pairwise update)."""
        if other is None or other.n == 0:
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.n * other.n / n)
        return Moments(n, mean, scatter)


def merge_all(parts: list[Moments | None]) -> Moments | None:
    """Merge a list of moments (a leaf of the tree reduction)."""
    out = None
    for m in parts:
        if m is not None:
            out = m if out is None else out.merge(m)
    return out


def fit(moments: Moments | None, *, components: int | None, variance: float) -> Reduction:
    """Standardize (population scale, as the streaming path) and take the exact principal
    axes of the correlation matrix; K is ``components`` or the smallest reaching ``variance``.

    Components and explained variances match scikit-learn's exact ``PCA`` on the
    standardized rows (``n - 1`` denominator; signs with the largest |value| positive).
    """
    if moments is None or moments.n < 2:
        raise ReductionError(f"PCA needs at least 2 images, got {0 if moments is None else moments.n}: add images to the input")
    n, d = moments.n, moments.mean.shape[0]
    if components is not None and components > min(n, d):
        raise ReductionError(
            f"--components {components} is more than the {min(n, d)} components {n} images of {d} features "
            f"have: use --components {min(n, d)} or fewer"
        )
    scale = safe_scale(np.sqrt(np.clip(np.diag(moments.scatter) / n, 0.0, None)))
    cov = moments.scatter / np.outer(scale, scale) / (n - 1)
    eig, vec = np.linalg.eigh(cov)
    r = min(n - 1, d) if n > 1 else 1
    eig, vec = np.clip(eig[::-1], 0.0, None)[:r], vec[:, ::-1][:, :r]
    total = float(np.trace(cov))
    ratios = eig / total if total > 0 else np.zeros_like(eig)
    k = components if components is not None else max(1, choose_k(ratios, variance))
    axes = vec[:, :k].T
    signs = np.sign(axes[np.arange(k), np.argmax(np.abs(axes), axis=1)])
    axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
    shown = min(len(ratios), max(k, 1024))
    return Reduction(
        mean=moments.mean.copy(), scale=scale, pca_mean=np.zeros(d), components=axes,
        explained_variance=eig[:shown], explained_variance_ratio=ratios[:shown], k=int(k),
        variance_target=None if components is not None else variance, n_samples=n,
        method=f"exact PCA of the {d} x {d} correlation matrix (tree-reduced moments, eigh)", n_fitted=int(k),
    )
