"""Benchmark (not a test): a local cluster's start and close, spawn against forkserver.

    python benchmarks/cluster_lifecycle.py [--workers 2] [--repeats 2]

Each repeat starts a LocalCluster the way ``--cluster local`` does
(:func:`fruitdask.backends.dask.cluster.start_local_cluster`), imports TensorFlow in every
worker (as a run's warm-up does), then closes it; once with Dask's default ``spawn``
(the baseline) and once with ``forkserver``, alternated, each in a fresh child process so
neither inherits the other's fork server. Prints the seconds of each phase, their medians,
and the ratio forkserver / spawn.
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


def one(method: str, workers: int) -> dict:
    import dask

    dask.config.set({"distributed.worker.multiprocessing-method": method})
    from distributed import Client

    from fruitdask.backends.dask.cluster import start_local_cluster

    t0 = time.perf_counter()
    cluster = start_local_cluster(workers, 1)
    client = Client(cluster)
    t1 = time.perf_counter()
    client.run(tensorflow_version)
    t2 = time.perf_counter()
    client.close()
    cluster.close()
    t3 = time.perf_counter()
    return {"start_s": t1 - t0, "tensorflow_import_s": t2 - t1, "close_s": t3 - t2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.workers)))
        return
    runs: dict[str, list[dict]] = {"spawn": [], "forkserver": []}
    for _ in range(args.repeats):
        for method in runs:
            out = subprocess.run([sys.executable, __file__, "--child", method, "--workers", str(args.workers)],
                                 capture_output=True, text=True, check=True).stdout
            runs[method].append(json.loads(out.strip().splitlines()[-1]))
    for phase in ("start_s", "tensorflow_import_s", "close_s"):
        med = {m: statistics.median(r[phase] for r in rs) for m, rs in runs.items()}
        print(f"{phase:22s} spawn {med['spawn']:6.2f}  forkserver {med['forkserver']:6.2f}  "
              f"ratio {med['forkserver'] / med['spawn']:.2f}  (runs: {[round(r[phase], 2) for r in runs['spawn']]} / "
              f"{[round(r[phase], 2) for r in runs['forkserver']]})")


if __name__ == "__main__":
    main()
