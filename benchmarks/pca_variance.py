"""Benchmark (not a test): PCA with a variance target on wide features, as a run does it.

    python benchmarks/pca_variance.py [--rows 2000] [--features 25088] [--variance 0.95]

Synthetic post-ReLU features of a decaying spectrum (the shape of unpooled VGG16 maps at
224 px: 7 x 7 x 512 = 25,088 columns) are persisted on a LocalCluster of 2 single-threaded
worker processes, then ``fruitdask.pca_streamed.fit_incremental_pca(variance=...)`` runs as the
pipeline runs it. Baseline, in the same invocation: scikit-learn's exact PCA
(``svd_solver="full"``) of the same standardized matrix in this process. Prints the time of
each, their ratio, K against the exact K, the variance the reduction's projections really
reach, and the peak resident memory of the driver and of each worker (``VmHWM``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import peak_rss_bytes

RANK, ROWS_PER_BLOCK = 400, 64


def block(i: int, rows: int, d: int) -> np.ndarray:
    """Rows of rank-400 signal (power-law spectrum) plus noise, clipped at 0 like ReLU maps."""
    rng = np.random.default_rng(1000 + i)
    v = np.random.default_rng(7).standard_normal((RANK, d), dtype=np.float32)
    scales = (1.0 / (1.0 + np.arange(RANK)) ** 0.9).astype(np.float32) * 10
    u = rng.standard_normal((rows, RANK), dtype=np.float32) * scales
    x = u @ v / np.sqrt(d) * 30 + 0.3 * rng.standard_normal((rows, d), dtype=np.float32)
    return np.maximum(x, 0).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--features", type=int, default=25088)
    parser.add_argument("--variance", type=float, default=0.95)
    args = parser.parse_args(argv)

    import dask
    import dask.array as da
    from distributed import Client, wait
    from sklearn.decomposition import PCA

    from fruitdask.backends.dask.cluster import start_local_cluster
    from fruitdask.pca_streamed import fit_incremental_pca

    n, d = args.rows, args.features
    gib = 2**30
    with start_local_cluster(2, 1, memory_limit="4GiB", env=None) as lc, Client(lc) as client:
        sizes = [ROWS_PER_BLOCK] * (n // ROWS_PER_BLOCK) + ([n % ROWS_PER_BLOCK] if n % ROWS_PER_BLOCK else [])
        blocks = [da.from_delayed(dask.delayed(block)(i, m, d), shape=(m, d), dtype=np.float32) for i, m in enumerate(sizes)]
        X = da.concatenate(blocks).persist()
        wait(X)
        t0 = time.perf_counter()
        red = fit_incremental_pca(X, components=None, variance=args.variance, batch_size=None, power_iterations=2, seed=0)
        seconds = time.perf_counter() - t0
        peaks = {"driver": peak_rss_bytes(), "workers": list(client.run(peak_rss_bytes).values())}
        x = X.compute().astype(np.float64)

    std = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)
    t0 = time.perf_counter()
    exact = PCA(svd_solver="full").fit(z)
    baseline = time.perf_counter() - t0
    cum = np.cumsum(exact.explained_variance_ratio_)
    k_exact = int(np.nonzero(cum >= args.variance - 1e-9)[0][0] + 1)
    proj = red.transform(x.astype(np.float32)).astype(np.float64)
    reached = float(proj.var(axis=0, ddof=1).sum() / z.var(axis=0, ddof=1).sum())
    result = {
        "rows": n, "features": d, "variance_target": args.variance,
        "fruitdask_seconds": round(seconds, 2), "method": red.method,
        "sklearn_exact_seconds": round(baseline, 2), "ratio_sklearn_over_fruitdask": round(baseline / seconds, 2),
        "k": int(red.k), "k_exact": k_exact,
        "variance_reached_measured": round(reached, 6), "variance_exact_at_k": round(float(cum[red.k - 1]), 6),
        "peak_gib_during_fit": {"driver": round(peaks["driver"] / gib, 2),
                                "workers": [round(v / gib, 2) for v in peaks["workers"]],
                                "total": round((peaks["driver"] + sum(peaks["workers"])) / gib, 2)},
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
