"""A fitted PCA, as every strategy of :class:`fruitdask.reduce.PCA` returns it: the
standardization and the K principal axes (:class:`Reduction`, portable as a ``.npz``
file), with the two helpers both strategies share (:func:`choose_k`, :func:`safe_scale`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np


def choose_k(ratios: np.ndarray, target: float) -> int:
    """Smallest K whose cumulative explained-variance ratio reaches ``target`` (else all)."""
    cumulative = np.cumsum(ratios)
    # A tiny tolerance so that a target of 1.0 is met by a full-rank fit despite rounding.
    hits = np.nonzero(cumulative >= target - 1e-9)[0]
    return int(hits[0] + 1) if len(hits) else len(ratios)


@dataclass
class Reduction:
    """A fitted standardization + PCA, portable as a ``.npz`` file."""

    mean: np.ndarray
    scale: np.ndarray
    pca_mean: np.ndarray
    components: np.ndarray  # (k, d): the applied components
    explained_variance: np.ndarray  # (n_fit,)
    explained_variance_ratio: np.ndarray  # (n_fit,)
    k: int
    variance_target: float | None
    n_samples: int
    method: str
    #: Components actually fitted, when ``explained_variance_ratio`` also holds a spectrum
    #: tail beyond them (K from the spectrum); None: every ratio is a fitted component.
    n_fitted: int | None = None

    @property
    def variance_reached(self) -> float:
        return float(np.sum(self.explained_variance_ratio[: self.k]))

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Project raw features ``(n, d)`` to ``(n, k)`` float32."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return ((z - self.pca_mean) @ self.components.T).astype(np.float32)

    def to_npz(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            mean=self.mean,
            scale=self.scale,
            pca_mean=self.pca_mean,
            components=self.components,
            explained_variance=self.explained_variance,
            explained_variance_ratio=self.explained_variance_ratio,
            k=np.int64(self.k),
            variance_target=np.float64(np.nan if self.variance_target is None else self.variance_target),
            n_samples=np.int64(self.n_samples),
            method=np.str_(self.method),
            n_fitted=np.int64(-1 if self.n_fitted is None else self.n_fitted),
        )
        return buf.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> Reduction:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            target = float(z["variance_target"])
            return cls(
                mean=z["mean"],
                scale=z["scale"],
                pca_mean=z["pca_mean"],
                components=z["components"],
                explained_variance=z["explained_variance"],
                explained_variance_ratio=z["explained_variance_ratio"],
                k=int(z["k"]),
                variance_target=None if np.isnan(target) else target,
                n_samples=int(z["n_samples"]),
                method=str(z["method"]),
                n_fitted=int(z["n_fitted"]) if "n_fitted" in z and int(z["n_fitted"]) >= 0 else None,
            )

    def summary(self) -> dict:
        """The numbers ``run.json`` keeps (arrays stay in ``reduction.npz``)."""
        return {
            "k": self.k,
            "variance_target": self.variance_target,
            "variance_reached": self.variance_reached,
            "n_fit_components": self.n_fitted if self.n_fitted is not None else len(self.explained_variance_ratio),
            "explained_variance_ratio": [float(x) for x in self.explained_variance_ratio[: self.k]],
            "n_samples": self.n_samples,
            "n_features": int(self.mean.shape[0]),
            "method": self.method,
        }


def safe_scale(std: np.ndarray) -> np.ndarray:
    """Standard deviations with zeros replaced by 1 (constant features stay 0, as sklearn)."""
    std = np.asarray(std, dtype=np.float64)
    return np.where(std > 1e-12, std, 1.0)
