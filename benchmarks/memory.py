"""Peak memory per worker: bounded by the partition size, not by the number of images.

Runs the real pipeline (Dask backend, a LocalCluster of worker processes that this script
owns) on the first N images of a folder, for two values of N, and prints each worker's
peak resident set size (``VmHWM``, the kernel's high-water mark, so no sampling can miss a
peak) plus the driver's, then the ratio large/small (target <= 1.1). Optionally it also
measures the unpooled run (``--pooling none``) that streams into IncrementalPCA.

Each measurement runs in its own Python process with a fresh cluster, so peaks never carry
over from one measurement to the next. Run it on a quiet machine:

    python benchmarks/memory.py                                   # 2,000 vs 8,000 images at 224 px, avg pooling
    python benchmarks/memory.py --pooling none --components 16    # the same, unpooled (25,088 features)

Benchmarks are not tests: nothing here asserts; it prints numbers and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fruits360-bench" / "Training"


def peak_rss_bytes() -> int:
    """This process's peak resident set size (the kernel's ``VmHWM``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def subset(src: Path, dest: Path, n: int) -> Path:
    """``n`` images of ``src`` round-robin over its labels, plus images derived from them
    (distinct bytes: flips, crops, re-encodings; benchmarks/derive_images.py) past its size."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from derive_images import derive

    derive(src, dest, n)
    return dest


@contextmanager
def local_cluster(args: argparse.Namespace, env: dict[str, str] | None = None):
    """The measured cluster, shaped as a run's (default Dask configuration), closed whatever happens."""
    from distributed import Client

    from fruitdask.backends.dask.cluster import start_local_cluster

    cluster = start_local_cluster(args.workers, args.threads, memory_limit=args.memory_limit, env=env)
    client = Client(cluster)
    try:
        yield cluster, client
    finally:
        client.close()
        cluster.close()


def measure_one(args: argparse.Namespace) -> dict:
    """One run on a fresh cluster; returns peaks in bytes (called in a child process)."""
    from fruitdask import pipeline
    from fruitdask.config import TF_ENV, build_config
    from fruitdask.features.settings import FeatureSettings

    with tempfile.TemporaryDirectory(prefix="fruitdask-mem-") as tmp:
        data = subset(Path(args.data), Path(tmp) / "in", args.images)
        with local_cluster(args, env=dict(TF_ENV)) as (cluster, client):
            cfg = build_config({
                "input": str(data), "output": str(Path(tmp) / "out"), "cluster": cluster.scheduler_address,
                "image_size": args.image_size, "pooling": args.pooling, "weights": args.weights,
                "partition_size": args.partition_size, "components": args.components or None, "quiet": True,
            }, {})
            t0 = time.perf_counter()
            doc = pipeline.run(cfg)
            seconds = time.perf_counter() - t0
            workers = client.run(peak_rss_bytes)
    return {
        "images": args.images, "image_size": args.image_size, "pooling": args.pooling,
        "feature_dim": doc["reduction"].get("n_features") or FeatureSettings.from_config(cfg).feature_dim, "k": doc["reduction"]["k"],
        "rows": doc["counts"]["rows_written"], "seconds": round(seconds, 1),
        "featurize_images_per_s": doc["images_per_second"]["featurize"],
        "steady_images_per_s": (doc.get("extra") or {}).get("steady_images_per_s"),
        "worker_peak_rss": sorted(workers.values()), "driver_peak_rss": peak_rss_bytes(),
    }


def measure_pca(args: argparse.Namespace) -> dict:
    """The reduce stage alone on synthetic ``n x d`` float32 features (called in a child).

    Same function, plan and cluster as a run (:func:`fruitdask.pca_streamed.fit_incremental_pca`
    with the variance target: K and the axes from the spectrum), without the hours of
    VGG16 at 224 px that real unpooled features cost on a small machine.
    """
    import dask.array as da
    import numpy as np

    from fruitdask.pca_streamed import fit_incremental_pca

    n, d = args.pca_only
    with local_cluster(args) as (_, client):
        X = da.random.RandomState(0).random_sample((n, d), chunks=(args.partition_size, d)).astype(np.float32)
        t0 = time.perf_counter()
        red = fit_incremental_pca(X, components=None, variance=0.95, batch_size=None, power_iterations=2, seed=0)
        seconds = time.perf_counter() - t0
        workers = client.run(peak_rss_bytes)
    return {
        "images": n, "feature_dim": d, "pooling": "none (synthetic features)", "k": red.k,
        "n_fit_components": len(red.explained_variance_ratio), "rows": n, "seconds": round(seconds, 1),
        "worker_peak_rss": sorted(workers.values()), "driver_peak_rss": peak_rss_bytes(),
    }


def run_child(args: argparse.Namespace, images: int, image_size: int, pooling: str, pca_only: tuple | None = None) -> dict:
    cmd = [
        sys.executable, __file__, "--one", "--images", str(images), "--image-size", str(image_size),
        "--pooling", pooling, "--data", str(args.data), "--workers", str(args.workers),
        "--threads", str(args.threads), "--partition-size", str(args.partition_size),
        "--memory-limit", args.memory_limit, "--weights", args.weights, "--components", str(args.components),
    ]
    if pca_only:
        cmd += ["--pca-only", *map(str, pca_only)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"measurement of {images} images failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def wait_for_quiet(max_load: float, patience_s: float) -> float:
    """Wait (up to ``patience_s``) for the 1-minute load average to drop below ``max_load``."""
    deadline = time.time() + patience_s
    while (load := os.getloadavg()[0]) > max_load and time.time() < deadline:
        print(f"load average {load:.2f} > {max_load}: waiting", file=sys.stderr)
        time.sleep(15)
    return load


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder of <Label>/<image>.jpg (default: %(default)s)")
    p.add_argument("--sizes", type=int, nargs=2, default=(2000, 8000), metavar=("SMALL", "LARGE"))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--pooling", default="avg")
    p.add_argument("--none-images", type=int, default=0, help="also measure --pooling none on this many images (0: skip)")
    p.add_argument("--only-none", action="store_true", help="skip the two-size comparison")
    p.add_argument("--none-size", type=int, default=224, help="image size of the --pooling none run (224: 25,088 features)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--partition-size", type=int, default=64)
    p.add_argument("--memory-limit", default="4GiB")
    p.add_argument("--components", type=int, default=16, help="PCA K; 0: from the variance target (up to 1,024 fitted)")
    p.add_argument("--weights", default="random")
    p.add_argument("--max-load", type=float, default=(os.cpu_count() or 1) * 0.75, help="wait for a quieter machine")
    p.add_argument("--patience", type=float, default=300, help="seconds to wait for --max-load")
    p.add_argument("--pca-only", type=int, nargs=2, metavar=("N", "D"),
                   help="measure only the reduce stage on synthetic N x D features (e.g. 2000 25088)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure_pca(args) if args.pca_only else measure_one(args)))
        return 0

    results, summary = [], {}
    for n in [] if args.only_none or args.pca_only else args.sizes:
        load = wait_for_quiet(args.max_load, args.patience)
        r = run_child(args, n, args.image_size, args.pooling)
        r["load_before"] = round(load, 2)
        results.append(r)
        print(f"{n:>6} images @ {args.image_size}px {args.pooling}: worker peak RSS "
              f"{', '.join(mib(x) for x in r['worker_peak_rss'])}; driver {mib(r['driver_peak_rss'])}; "
              f"{r['seconds']}s, {r['featurize_images_per_s']} images/s featurizing (load {load:.2f})", flush=True)
    if results:
        small, large = results
        ratio = max(large["worker_peak_rss"]) / max(small["worker_peak_rss"])
        driver = large["driver_peak_rss"] / small["driver_peak_rss"]
        rate = large["featurize_images_per_s"] / small["featurize_images_per_s"]
        steady = large["steady_images_per_s"] / small["steady_images_per_s"]
        print(f"{args.sizes[1]} vs {args.sizes[0]} images ({args.pooling}): max worker peak x{ratio:.3f}, driver peak "
              f"x{driver:.3f} ({'within' if max(ratio, driver) <= 1.15 else 'ABOVE'} 15 %); steady featurize rate "
              f"x{steady:.3f} ({'within' if abs(steady - 1) <= 0.10 else 'OUTSIDE'} 10 %; the stage's own rate, "
              f"warm-up included: x{rate:.3f})")
        summary = {"runs": results, "worker_peak_ratio": round(ratio, 4), "driver_peak_ratio": round(driver, 4),
                   "featurize_rate_ratio": round(rate, 4), "steady_rate_ratio": round(steady, 4)}
    if args.none_images:
        load = wait_for_quiet(args.max_load, args.patience)
        r = run_child(args, args.none_images, args.none_size, "none")
        r["load_before"] = round(load, 2)
        summary["pooling_none"] = r
        print(f"{args.none_images:>6} images @ {args.none_size}px none ({r['feature_dim']:,} features, K={r['k']}): "
              f"worker peak RSS {', '.join(mib(x) for x in r['worker_peak_rss'])}; driver {mib(r['driver_peak_rss'])}; "
              f"sum {mib(sum(r['worker_peak_rss']) + r['driver_peak_rss'])}; {r['seconds']}s")
    if args.pca_only:
        load = wait_for_quiet(args.max_load, args.patience)
        r = run_child(args, args.pca_only[0], args.image_size, "none", tuple(args.pca_only))
        summary["pca_only"] = r
        print(f"PCA only, {r['images']:,} x {r['feature_dim']:,} synthetic features ({r['n_fit_components']} components fitted, "
              f"K={r['k']}): worker peak RSS {', '.join(mib(x) for x in r['worker_peak_rss'])}; "
              f"driver {mib(r['driver_peak_rss'])}; {r['seconds']}s (load {load:.2f})")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
