"""Benchmark (not a test): a local cluster's start and close, spawn against forkserver.

    python benchmarks/cluster_lifecycle.py [--workers 2] [--repeats 2] [--vgg16]

Each repeat starts a LocalCluster the way ``--cluster local`` does
(:func:`fruitdask.backends.dask.cluster.start_local_cluster`), imports TensorFlow in every
worker (as a run's warm-up does), then closes it; with Dask's default ``spawn`` (the
baseline), with ``forkserver`` as Dask starts it (``distributed`` preloaded), and with
``forkserver-early``, the fork server fruitdask starts as a run starts
(:mod:`fruitdask.backends.dask.forkserver`: TensorFlow preloaded), alternated, each in a
fresh child process so none inherits another's fork server. ``ready_s`` is from the first
call to TensorFlow imported in every worker. With ``--vgg16``, each worker also builds
VGG16 at 224 px and times 3 batches of 16 (``vgg16_img_s``, images/s summed over the
workers), to check that a worker forked after TensorFlow's import runs as fast. Prints
each phase's median and its ratio to spawn.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def tensorflow_version() -> str:
    import tensorflow as tf

    return tf.__version__


def vgg16_rate() -> float:
    import numpy as np

    from fruitdask.features.runtimes import tensorflow

    tensorflow.pin_tf_threads(1)
    vgg = tensorflow.build_vgg16(224)
    x = np.random.default_rng(0).uniform(0, 255, (16, 224, 224, 3)).astype(np.float32)
    vgg.predict_on_batch(x)
    t = time.perf_counter()
    for _ in range(3):
        vgg.predict_on_batch(x)
    return 48 / (time.perf_counter() - t)


METHODS = ("spawn", "forkserver", "forkserver-early")


def one(method: str, workers: int, vgg16: bool) -> dict:
    t0 = time.perf_counter()
    if method == "forkserver-early":
        from fruitdask.backends.dask import forkserver
        from fruitdask.config import TF_ENV

        forkserver.start_early(TF_ENV)
    import dask

    dask.config.set({"distributed.worker.multiprocessing-method": method.removesuffix("-early")})
    from distributed import Client

    from fruitdask.backends.dask.cluster import start_local_cluster

    cluster = start_local_cluster(workers, 1)
    client = Client(cluster)
    t1 = time.perf_counter()
    client.run(tensorflow_version)
    t2 = time.perf_counter()
    rate = sum(client.run(vgg16_rate).values()) if vgg16 else None
    t3 = time.perf_counter()
    client.close()
    cluster.close()
    t4 = time.perf_counter()
    out = {"start_s": t1 - t0, "tensorflow_import_s": t2 - t1, "ready_s": t2 - t0, "close_s": t4 - t3}
    return out | ({"vgg16_img_s": rate} if vgg16 else {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--vgg16", action="store_true", help="also time VGG16 inference in each worker")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.workers, args.vgg16)))
        return
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for method in runs:
            cmd = [sys.executable, __file__, "--child", method, "--workers", str(args.workers)] + (["--vgg16"] if args.vgg16 else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[method].append(json.loads(out.strip().splitlines()[-1]))
    for phase in runs["spawn"][0]:
        med = {m: statistics.median(r[phase] for r in rs) for m, rs in runs.items()}
        cells = "  ".join(f"{m} {med[m]:6.2f} ({med[m] / med['spawn']:.2f}x)" for m in METHODS)
        print(f"{phase:20s} {cells}  runs: {[[round(r[phase], 2) for r in runs[m]] for m in METHODS]}")


if __name__ == "__main__":
    main()
