"""The client's share of a run at lake scale: listing, diff and planning of 10^6 images (issue 22).

A synthetic lake (the model is not the point: the files are empty ``.jpg`` names, so
listing costs what it costs, and no image is read) of N paths under L label folders, and a
features table whose rows match 95 % of them, 1 % with another source version, plus 1 % of
rows whose file is gone: the diff of a day of growth. The table's rows are tiny (8
features) since only its keys and versions are read by the plan.

Measured in a fresh child process per size: the time of the streamed parallel listing, of
reading the table's keys, of the diff and of writing the manifest; the client's peak RSS
above its baseline after imports (``VmHWM``), per image; the hash arrays' bytes per image;
and the tasks the run would submit (partitions, file rewrites, moment leaves and merges).

    python benchmarks/lake_scale.py --sizes 100000 1000000 --json docs/bench-lake-scale.json

Benchmarks are not tests: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    """Bytes of this process's ``VmHWM`` (peak) or ``VmRSS`` (now) from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def vm_hwm() -> int:
    return _status("VmHWM")


def vm_rss() -> int:
    return _status("VmRSS")


def make_lake(root: Path, n: int, labels: int) -> None:
    """N empty image files under ``labels`` folders."""
    for i in range(labels):
        (root / f"Label {i:04d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        fd = os.open(root / f"Label {i % labels:04d}" / f"img_{i:08d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)


def make_table(root: Path, out: Path, n: int, labels: int) -> None:
    """A table whose rows match 95 % of the lake's files (1 % of them with another version)
    plus 1 % of rows whose file does not exist; 8 features, 2 PCA values per row."""
    import numpy as np
    import pyarrow as pa

    from fruitdask.lake import keys, tasks
    from fruitdask.lake import table as delta
    from fruitdask.schema import TABLE_SCHEMA

    state = delta.open_table(str(out), {})
    sink = tasks.Sink(delta.table_url(str(out)), "synthetic", "s", {})
    in_table = int(n * 0.95)
    adds, per_file, hashes = [], 100_000, []
    gone = int(n * 0.01)
    for start in range(0, in_table + gone, per_file):
        idx = np.arange(start, min(start + per_file, in_table + gone))
        names = [f"Label {i % labels:04d}/img_{i:08d}.jpg" if i < in_table else f"Label 0000/gone_{i:08d}.jpg" for i in idx]
        versions = []
        for i, name in zip(idx, names, strict=True):
            p = root / name
            st = p.stat() if p.exists() else None
            v = keys.source_version(st.st_size, st.st_mtime_ns) if st else "0:0"
            versions.append(v if i % 100 else "0:changed")
        m = len(idx)
        t = pa.table({
            "image_key": names, "path": [str(root / x) for x in names], "label": [x.split("/")[0] for x in names],
            "source_version": versions, "settings": ["s"] * m, "run_id": ["synthetic"] * m,
            "featurized_at": pa.array([0] * m, pa.timestamp("us", tz="UTC")),
            "features": tasks._list_array(np.zeros((m, 8), np.float32)),
            "pca": tasks._list_array(np.zeros((m, 2), np.float32)), "pca_fit": ["0001-synthetic"] * m,
        }, schema=TABLE_SCHEMA)
        a = tasks.write_file(t, sink, f"part-synthetic-{start // per_file:05d}.parquet")
        adds.append({"path": a["file"], "size": a["size"], "rows": a["rows"], "stats": a["stats"]})
        hashes.append(keys.hash_keys(names))
    delta.commit(state, adds, [], {"settings": "s", "pca_fit": "0001-synthetic", "pca_rows": in_table + gone},
                 row_keys=np.concatenate(hashes))


def measure(root: Path, out: Path, part_size: int) -> dict:
    """The plan of one run, timed, in this (fresh) process."""
    from fruitdask.lake import plan as lake_plan
    from fruitdask.lake import table as delta
    from fruitdask.lake.update import MAX_MOMENT_FEATURES  # noqa: F401 - the run's imports, before the baseline
    from fruitdask.storage import listing

    base = vm_rss()
    t = {}
    t0 = time.perf_counter()
    state = delta.open_table(str(out), {})
    t["open_table_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as spill:
        t0 = time.perf_counter()
        listed = lake_plan.list_input(str(root), {}, None, spill, "bench")
        t["listing_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        keys_ = lake_plan.table_keys(state)
        t["table_keys_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan = lake_plan.make_plan(listed, keys_, None, manifest_url=str(Path(spill) / "manifest.parquet"), storage_options={},
                                   part_size=part_size, keep_deleted=False, rebuild=False)
        t["diff_and_manifest_s"] = time.perf_counter() - t0
        hashes = listed.key_hash.nbytes + listed.version_hash.nbytes + sum(
            a.nbytes for a in (keys_.key_hash, keys_.version_hash, keys_.file_index, keys_.row_index))
    n = listed.n_images
    leaves = len(plan.part_sizes) + len(plan.rewrite) + len(plan.keep)
    return {
        "listed": n, "threads": listing.LIST_THREADS, **{k: round(v, 3) for k, v in t.items()},
        "added": plan.added, "updated": plan.updated, "removed": plan.removed, "unchanged": plan.unchanged,
        "client_peak_above_baseline_bytes": vm_hwm() - base, "peak_bytes_per_image": round((vm_hwm() - base) / n, 1),
        "hash_bytes_per_image": round(hashes / n, 1),
        "tasks": {"featurize": len(plan.part_sizes), "rewrite": len(plan.rewrite),
                  "refit_moment_leaves": leaves, "refit_merges": max(0, -(-leaves // 8))},
    }


def child(n: int, labels: int, part_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fruitdask-scale-") as tmp:
        root, out = Path(tmp) / "lake", Path(tmp) / "out"
        t0 = time.perf_counter()
        make_lake(root, n, labels)
        made = time.perf_counter() - t0
        me = [sys.executable, __file__]
        subprocess.run([*me, "--make-table", str(root), str(out), str(n), str(labels)], check=True, cwd=REPO)
        proc = subprocess.run([*me, "--measure", str(root), str(out), str(part_size)], check=True, cwd=REPO,
                              capture_output=True, text=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["make_lake_s"] = round(made, 1)
        return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--labels", type=int, default=200)
    p.add_argument("--partition-size", type=int, default=64)
    p.add_argument("--json", type=Path)
    p.add_argument("--make-table", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.make_table:
        root, out, n, labels = args.make_table
        make_table(Path(root), Path(out), int(n), int(labels))
        return 0
    if args.measure:
        root, out, part = args.measure
        print(json.dumps(measure(Path(root), Path(out), int(part))))
        return 0
    results = []
    for n in args.sizes:
        r = child(n, args.labels, args.partition_size)
        results.append(r)
        print(f"{n:>10,} paths: listing {r['listing_s']} s, table keys {r['table_keys_s']} s, diff+manifest "
              f"{r['diff_and_manifest_s']} s; client peak +{r['client_peak_above_baseline_bytes'] / 2**20:,.0f} MiB "
              f"({r['peak_bytes_per_image']} B/image, hashes {r['hash_bytes_per_image']} B/image); tasks {r['tasks']}",
              flush=True)
    if len(results) >= 2:
        a, b = results[-2], results[-1]
        scale = 10_000_000 / b["listed"]
        # Per image at the margin: the difference between the two sizes (the fixed part,
        # buffers sized by a folder or a table file, cancels out).
        marginal = (b["client_peak_above_baseline_bytes"] - a["client_peak_above_baseline_bytes"]) / (b["listed"] - a["listed"])
        est = {k: round(b[k] * scale, 1) for k in ("listing_s", "table_keys_s", "diff_and_manifest_s")}
        est["client_marginal_bytes_per_image"] = round(marginal, 1)
        est["client_peak_bytes"] = int(b["client_peak_above_baseline_bytes"] + marginal * (10_000_000 - b["listed"]))
        est["featurize_tasks_first_run"] = int(10_000_000 / args.partition_size)
        print(f"10^7 estimate (linear from {b['listed']:,}; {a['listed']:,} -> {b['listed']:,} paths took "
              f"x{b['listing_s'] / max(a['listing_s'], 1e-9):.1f} the listing time): {est}")
        results.append({"estimate_10_7": est})
    if args.json:
        args.json.write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
