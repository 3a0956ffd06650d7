"""The PCA's second strategy, for features too wide for moments (``--pooling none``: 25,088
at 224 px, whose ``d x d`` scatter matrix would be 5 GB): standardize a dask array of the
rows, then fit dask-ml's IncrementalPCA over it batch by batch (:func:`fit_incremental_pca`);
:class:`fruitdask.reduce.PCA` chooses it.

The number of components is either given, or the smallest K whose cumulative explained
variance reaches a target. With a target, K is read off the spectrum of the standardized
features before anything is fitted (:func:`spectrum`):

- up to :data:`GRAM_MAX_SAMPLES` rows, the exact eigenpairs of the ``n x n`` Gram matrix
  ``Z Z^T`` (built block by block from the dask array); the K principal axes then follow in
  one more streaming pass (:func:`gram_components`): exact PCA without a ``d x d``
  covariance, cheap on wide features (2,000 x 25,088 unpooled);
- above it, a randomized estimate of the top spectrum with power iterations, then dask-ml's
  IncrementalPCA fits about 2K components (not 1,024) and keeps K.

With a fixed ``--components K``, IncrementalPCA fits K components.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from fruitdask.errors import ReductionError
from fruitdask.reduction import Reduction, choose_k, safe_scale

logger = logging.getLogger(__name__)

DEFAULT_PCA_BATCH = 1024
#: Upper bound on components fitted to find K from a variance target (cost grows as K*d).
MAX_FIT_COMPONENTS = 1024
#: Rows up to which K comes from the exact eigenvalues of the n x n Gram matrix (8,192 rows:
#: a 512 MiB matrix of doubles); above it, from a randomized estimate of the top spectrum.
GRAM_MAX_SAMPLES = 8192
#: Rows per block when the Gram matrix is built (a block of 25,088 doubles is ~100 MB).
GRAM_BLOCK_BYTES = 128 << 20


@dataclass(frozen=True)
class PCAPlan:
    """How the PCA will be fitted: components to fit, rows per batch, K when fixed."""

    n_fit: int
    batch_size: int
    fixed_k: int | None


def plan_pca(n_samples: int, n_features: int, components: int | None, batch_size: int | None) -> PCAPlan:
    """Validate the requested K against the data and batches; say the fix when it cannot work."""
    if n_samples < 2:
        raise ReductionError(f"PCA needs at least 2 images, got {n_samples}: add images to the input")
    batch = min(batch_size or DEFAULT_PCA_BATCH, n_samples)
    if components is not None:
        if components > n_features:
            raise ReductionError(
                f"--components {components} is more than the {n_features} features per image: "
                f"use --components {n_features} or fewer (or --pooling none for more features)"
            )
        if components > n_samples:
            raise ReductionError(
                f"--components {components} is more than the {n_samples} images: use --components {n_samples} or fewer"
            )
        if components > batch:
            raise ReductionError(
                f"--components {components} is more than the PCA batch size {batch}: IncrementalPCA needs "
                f"K <= rows per batch; pass --pca-batch-size {components} or more, or fewer --components"
            )
        return PCAPlan(components, batch, components)
    n_fit = min(n_features, batch, n_samples, MAX_FIT_COMPONENTS)
    return PCAPlan(n_fit, batch, None)


def finish(
    plan: PCAPlan,
    mean: np.ndarray,
    scale: np.ndarray,
    pca_mean: np.ndarray,
    components: np.ndarray,
    explained_variance: np.ndarray,
    ratios: np.ndarray,
    variance: float,
    n_samples: int,
    method: str,
) -> Reduction:
    """Pick K (fixed, or from the variance target) and keep the first K components."""
    ratios = np.asarray(ratios, dtype=np.float64)
    if plan.fixed_k is not None:
        k, target = plan.fixed_k, None
    else:
        k, target = choose_k(ratios, variance), variance
        if float(np.sum(ratios[:k])) < variance - 1e-9:
            logger.warning(
                "the %d fitted components explain %.4f of the variance, below the --variance target %.4f: "
                "keeping all %d (pass a larger --pca-batch-size to fit more components)",
                len(ratios), float(np.sum(ratios)), variance, k,
            )
    return Reduction(
        mean=np.asarray(mean, dtype=np.float64),
        scale=np.asarray(scale, dtype=np.float64),
        pca_mean=np.asarray(pca_mean, dtype=np.float64),
        components=np.asarray(components[:k], dtype=np.float64),
        explained_variance=np.asarray(explained_variance, dtype=np.float64),
        explained_variance_ratio=ratios,
        k=int(k),
        variance_target=target,
        n_samples=int(n_samples),
        method=method,
    )


def silence_first_batch_warning() -> None:
    """Hide numpy's "invalid value encountered in divide" from dask-ml's first batch.

    dask-ml's incremental mean/variance divides 0 by 0 while no sample has been seen yet and
    then discards that value (as sklearn does); the warning is noise. It is filtered only for
    ufunc tasks run directly by dask's task spec, not for any fruitdask code. Run it in each
    worker process (``client.run``) and in the client.
    """
    import warnings

    warnings.filterwarnings(
        "ignore", message="invalid value encountered in divide", category=RuntimeWarning, module=r"dask\._task_spec"
    )


@dataclass(frozen=True)
class Spectrum:
    """Explained-variance ratios of the leading components, and how they were found."""

    ratios: np.ndarray  # descending, as fractions of the total variance
    exact: bool
    method: str
    #: Gram path only: eigenvalues of ``Z Z^T`` (descending) and their eigenvectors (n x r),
    #: from which the principal axes follow in one more pass (:func:`gram_components`).
    eigenvalues: np.ndarray | None = None
    vectors: np.ndarray | None = None


def _row_blocks(Z):
    """``Z`` rechunked to whole rows of about :data:`GRAM_BLOCK_BYTES` (as float64)."""
    n, d = (int(x) for x in Z.shape)
    return Z.rechunk({0: max(1, min(n, GRAM_BLOCK_BYTES // max(1, 8 * d))), 1: -1})


def gram_spectrum(Z) -> Spectrum:
    """Exact explained-variance ratios of a centred dask array ``Z (n, d)`` from ``Z Z^T``.

    The non-zero eigenvalues of ``Z Z^T`` are those of ``Z^T Z`` (the scatter matrix), so
    the ``n x n`` Gram matrix gives the whole spectrum without a ``d x d`` covariance. It is
    built as ``(b x d) @ (d x b)`` products of row blocks; only two blocks and the ``n x n``
    result are in memory at once per task.
    """
    import dask.array as da

    n, d = (int(x) for x in Z.shape)
    Zb = _row_blocks(Z)
    G, trace = da.compute(Zb @ Zb.T, (Zb * Zb).sum())
    eig, vectors = np.linalg.eigh(np.asarray(G, dtype=np.float64))
    # Rank is at most min(n, d): the rest are rounding noise around 0.
    r = min(n, d)
    eig, vectors = np.clip(eig[::-1][:r], 0.0, None), vectors[:, ::-1][:, :r]
    total = float(trace)
    ratios = eig / total if total > 0 else np.zeros_like(eig)
    return Spectrum(ratios, True, f"exact eigenvalues of the {n} x {n} Gram matrix", eig, vectors)


def gram_components(Z, eigenvalues: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Principal axes ``(k, d)`` of a centred dask array from its Gram eigenpairs.

    With ``Z = U S V^T``: ``V_k^T = S_k^-1 U_k^T Z``, one streaming pass of ``(k x b) @ (b x d)``
    products over the row blocks. Signs follow scikit-learn (largest |value| of each axis
    positive), so the projections match its exact PCA.
    """
    import dask.array as da

    Zb = _row_blocks(Z)  # few big blocks: each one's (k x d) partial product is summed
    Ut = da.from_array(np.ascontiguousarray(vectors.T), chunks=(vectors.shape[1], Zb.chunks[0]))
    V = np.asarray((Ut @ Zb).compute(), dtype=np.float64)
    V /= np.sqrt(np.maximum(eigenvalues, 1e-300))[:, None]
    signs = np.sign(V[np.arange(len(V)), np.argmax(np.abs(V), axis=1)])
    return V * np.where(signs == 0, 1.0, signs)[:, None]


def randomized_spectrum(Z, n_components: int, power_iterations: int, seed: int) -> Spectrum:
    """Leading explained-variance ratios of a centred dask array by randomized SVD.

    The total variance is exact (the trace of ``Z^T Z``); only the leading singular values
    are estimated, with ``power_iterations`` passes that sharpen them on flat spectra.
    """
    import dask.array as da

    Zb = Z.rechunk({1: -1})
    _, s, _ = da.linalg.svd_compressed(Zb, k=n_components, n_power_iter=max(power_iterations, 1), seed=seed)
    s, trace = da.compute(s, (Zb * Zb).sum())
    total = float(trace)
    eig = np.sort(np.asarray(s, dtype=np.float64) ** 2)[::-1]
    ratios = eig / total if total > 0 else np.zeros_like(eig)
    return Spectrum(ratios, False, f"randomized estimate of the top {n_components} singular values "
                    f"({power_iterations} power iterations)")


def spectrum(Z, *, power_iterations: int = 2, seed: int = 0, gram_max_samples: int = GRAM_MAX_SAMPLES) -> Spectrum:
    """The explained-variance spectrum of the centred dask array ``Z``, found cheaply.

    Exact (Gram eigenvalues) up to ``gram_max_samples`` rows, else a randomized estimate of
    the top :data:`MAX_FIT_COMPONENTS` components with power iterations.
    """
    n, d = (int(x) for x in Z.shape)
    if n <= gram_max_samples:
        return gram_spectrum(Z)
    return randomized_spectrum(Z, min(n, d, MAX_FIT_COMPONENTS), power_iterations, seed)


def fit_incremental_pca(
    X,
    *,
    components: int | None,
    variance: float,
    batch_size: int | None,
    power_iterations: int = 2,
    seed: int = 0,
    gram_max_samples: int = GRAM_MAX_SAMPLES,
) -> Reduction:
    """Standardize a dask array ``X (n, d)`` and fit dask-ml's IncrementalPCA on it.

    Streams over batches of rows: only ``batch_size x d`` rows and the ``K x d`` components
    are in memory at once, never the full feature matrix nor a ``d x d`` covariance.
    The randomized solver with ``power_iterations`` (default 2) stays within ~1e-6 of exact
    PCA on VGG16 features; dask-ml's default (0 iterations) under-reports the variance.

    With a variance target (``components=None``): up to ``gram_max_samples`` rows the PCA
    is exact, from the Gram eigenpairs (:func:`spectrum`; ``n_fitted`` is K); above, one
    IncrementalPCA pass fits up to :data:`MAX_FIT_COMPONENTS` components and K is read off them.
    """
    silence_first_batch_warning()
    n_samples, n_features = (int(x) for x in X.shape)
    plan = plan_pca(n_samples, n_features, components, batch_size)
    mean, scale, Z = _standardize(X)
    if plan.fixed_k is None and n_samples > gram_max_samples:
        return _streamed_k(Z, plan, mean, scale, variance, n_samples, power_iterations, seed)
    if plan.fixed_k is None:
        spec = spectrum(Z, power_iterations=power_iterations, seed=seed, gram_max_samples=gram_max_samples)
        k = max(1, min(choose_k(spec.ratios, variance), n_samples, n_features))
        logger.info("K=%d reaches %.4f of the variance (%s)", k, float(np.sum(spec.ratios[:k])), spec.method)
        if spec.vectors is not None:
            return _gram_reduction(Z, spec, k, mean, scale, variance, n_samples)
        # IncrementalPCA needs K <= rows per batch: grow the batch when the target needs more.
        # Fitting about 2K components and keeping K keeps the K-th axis accurate where the
        # spectrum is flat (a randomized fit of exactly K mixes the last ones).
        batch = max(plan.batch_size, k)
        plan = PCAPlan(min(batch, n_samples, n_features, 2 * k + 10), batch, None)
    else:
        spec, k = None, plan.fixed_k
    ipca = _fit_ipca(Z, plan, power_iterations, seed)
    method = f"dask-ml IncrementalPCA (randomized, {power_iterations} power iterations)"
    fitted_var = np.asarray(ipca.explained_variance_, dtype=np.float64)
    fitted_ratio = np.asarray(ipca.explained_variance_ratio_, dtype=np.float64)
    if spec is None:
        return finish(plan, mean, scale, np.asarray(ipca.mean_), np.asarray(ipca.components_),
                      fitted_var, fitted_ratio, variance, n_samples, method)
    return Reduction(
        mean=np.asarray(mean, dtype=np.float64),
        scale=np.asarray(scale, dtype=np.float64),
        pca_mean=np.asarray(ipca.mean_, dtype=np.float64),
        components=np.asarray(ipca.components_[:k], dtype=np.float64),
        explained_variance=fitted_var,
        explained_variance_ratio=fitted_ratio,
        k=k,
        variance_target=variance,
        n_samples=n_samples,
        method=f"{method}; K from the {spec.method}",
    )


def _streamed_k(Z, plan: PCAPlan, mean, scale, variance: float, n_samples: int, power_iterations: int,
                seed: int) -> Reduction:
    """Above the Gram matrix's size: one IncrementalPCA pass fits up to
    :data:`MAX_FIT_COMPONENTS` components and K is read off their exact-denominator ratios
    (no task holds more than a batch, as the randomized spectrum's stacked R factors would)."""
    ipca = _fit_ipca(Z, plan, power_iterations, seed)
    return finish(plan, mean, scale, np.asarray(ipca.mean_), np.asarray(ipca.components_),
                  np.asarray(ipca.explained_variance_, dtype=np.float64),
                  np.asarray(ipca.explained_variance_ratio_, dtype=np.float64), variance, n_samples,
                  f"dask-ml IncrementalPCA (randomized, {power_iterations} power iterations; K from its own spectrum)")


def _standardize(X) -> tuple[np.ndarray, np.ndarray, Any]:
    """``(mean, scale, Z)`` of a dask array: per-feature mean and safe scale in one pass,
    and the lazy float64 ``Z = (X - mean) / scale`` the PCA streams over."""
    import dask.array as da

    mean, std = da.compute(X.mean(axis=0, dtype=np.float64), X.std(axis=0, dtype=np.float64))
    scale = safe_scale(std)
    return mean, scale, (X.astype(np.float64) - mean) / scale


def _fit_ipca(Z, plan: PCAPlan, power_iterations: int, seed: int):
    """dask-ml's IncrementalPCA with the randomized solver, fitted batch by batch."""
    from dask_ml.decomposition import IncrementalPCA

    ipca = IncrementalPCA(
        n_components=plan.n_fit,
        batch_size=plan.batch_size,
        svd_solver="randomized",
        iterated_power=power_iterations,
        random_state=seed,
    )
    ipca.fit(Z)
    n_samples, n_features = (int(x) for x in Z.shape)
    logger.info("IncrementalPCA: %d components fitted on %d x %d in batches of %d",
                plan.n_fit, n_samples, n_features, plan.batch_size)
    return ipca


def _gram_reduction(Z, spec: Spectrum, k: int, mean, scale, variance: float, n_samples: int) -> Reduction:
    """Exact PCA from the Gram eigenpairs: K axes in one pass, the spectrum for the scree."""
    if spec.eigenvalues is None or spec.vectors is None:
        raise ValueError("the Gram reduction needs the spectrum's eigenpairs (spectrum method 'gram')")
    shown = min(len(spec.ratios), max(k, MAX_FIT_COMPONENTS))
    components = gram_components(Z, spec.eigenvalues[:k], spec.vectors[:, :k])
    return Reduction(
        mean=np.asarray(mean, dtype=np.float64),
        scale=np.asarray(scale, dtype=np.float64),
        pca_mean=np.zeros(components.shape[1]),  # Z is centred by the standardization
        components=components,
        explained_variance=spec.eigenvalues[:shown] / max(n_samples - 1, 1),
        explained_variance_ratio=spec.ratios[:shown],
        k=k,
        variance_target=variance,
        n_samples=n_samples,
        method=f"exact PCA from the {spec.method} (eigh; K axes in one streaming pass)",
        n_fitted=k,
    )
