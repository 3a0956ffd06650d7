"""What a PCA refit costs: moments of every row, the fit, every table file re-projected.

A synthetic features table (``N`` rows of 512 float32 features, in files of ``--rows-per-file``
rows; the model is not the point: the refit never runs VGG16) is refitted with the run's own
code (:mod:`fruitdask.lake.update` on the Dask backend of a LocalCluster of this machine's
shape): the tree-reduced moments of every file, the fit, then one rewrite task per file
with the new ``pca``. Printed per size: seconds of each step and rows/s, then the estimate at
10^6 rows, linear from the largest size measured.

    python benchmarks/refit_cost.py --sizes 100000 400000

Benchmarks are not tests: nothing is asserted; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_table(out: str, n: int, per_file: int, d: int = 512) -> list[tuple[str, int]]:
    import pyarrow as pa

    from fruitdask.lake import table as delta
    from fruitdask.lake import tasks
    from fruitdask.lake.keys import hash_keys
    from fruitdask.schema import TABLE_SCHEMA

    rng = np.random.default_rng(0)
    sink = tasks.Sink(delta.table_url(out), "synthetic", "s", {})
    adds, files, hashes = [], [], []
    basis = rng.normal(size=(64, d)).astype(np.float32)
    for i, start in enumerate(range(0, n, per_file)):
        m = min(per_file, n - start)
        x = np.maximum(rng.normal(size=(m, 64)).astype(np.float32) @ basis, 0)
        keys = [f"L/{j:09d}.jpg" for j in range(start, start + m)]
        t = pa.table({"image_key": keys, "path": keys, "label": ["L"] * m, "source_version": ["1:1"] * m, "settings": ["s"] * m,
                      "run_id": ["synthetic"] * m, "featurized_at": pa.array([0] * m, pa.timestamp("us", tz="UTC")),
                      "features": tasks._list_array(x), "pca": tasks._list_array(np.zeros((m, 2), np.float32)),
                      "pca_fit": ["0001-synthetic"] * m}, schema=TABLE_SCHEMA)
        a = tasks.write_file(t, sink, f"part-synthetic-{i:05d}.parquet")
        adds.append({"path": a["file"], "size": a["size"], "rows": a["rows"], "stats": a["stats"]})
        files.append((a["file"], a["size"]))
        hashes.append(hash_keys(keys))
    delta.commit(delta.open_table(out, {}), adds, [], {"pca_fit": "0001-synthetic"}, row_keys=np.concatenate(hashes))
    return files


def refit(out: str, files: list[tuple[str, int]], client) -> dict:
    from fruitdask.backends.dask.backend import DaskBackend
    from fruitdask.lake import table as delta
    from fruitdask.lake import tasks, update
    from fruitdask.pca_moments import fit

    backend = DaskBackend.__new__(DaskBackend)
    backend.client = client
    sink = tasks.Sink(delta.table_url(out), "refit", "s", {})
    t0 = time.perf_counter()
    moments = backend.tree_reduce([(tasks.moments_file, (sink, p, None)) for p, _ in files])
    t1 = time.perf_counter()
    reduction = fit(moments, components=None, variance=0.95)
    url = update.fit_url(out, "0002-refit")
    from fruitdask import storage

    storage.write_file(url, reduction.to_npz())
    t2 = time.perf_counter()
    adds = backend.map_tasks(tasks.rewrite_file, [(sink, p, None, tasks.Fit("0002-refit", url), i) for i, (p, _) in enumerate(files)])
    t3 = time.perf_counter()
    return {"moments_s": round(t1 - t0, 2), "fit_s": round(t2 - t1, 3), "reproject_s": round(t3 - t2, 2),
            "total_s": round(t3 - t0, 2), "k": reduction.k, "files": len(adds)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000])
    p.add_argument("--rows-per-file", type=int, default=20_000)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from distributed import Client

    from fruitdask.backends.dask.cluster import start_local_cluster

    cluster = start_local_cluster(1, os.cpu_count() or 1)
    client = Client(cluster)
    results = []
    try:
        for n in args.sizes:
            with tempfile.TemporaryDirectory(prefix="fruitdask-refit-") as tmp:
                files = make_table(str(Path(tmp) / "out"), n, args.rows_per_file)
                r = {"rows": n, **refit(str(Path(tmp) / "out"), files, client)}
            r["rows_per_s"] = round(n / r["total_s"], 1)
            results.append(r)
            print(f"{n:>9,} rows: moments {r['moments_s']} s, fit {r['fit_s']} s, re-projection {r['reproject_s']} s; "
                  f"{r['total_s']} s in all ({r['rows_per_s']:,} rows/s; K={r['k']})", flush=True)
    finally:
        client.close()
        cluster.close()
    last = results[-1]
    estimate = round(last["total_s"] * 1_000_000 / last["rows"], 1)
    print(f"estimate at 10^6 rows (linear from {last['rows']:,}): {estimate} s on this machine")
    doc = {"cpu_count": os.cpu_count(), "results": results, "estimate_10_6_s": estimate}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
