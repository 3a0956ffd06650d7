"""Benchmark (not a test): the LocalCluster shape (workers x threads) against raw Keras.

    python benchmarks/local_shape.py --shapes 16x1,8x2,4x4,2x8,1x16 [--images 667] [--image-size 224]
        [--precision float32] [--repeats 1] [--partition-size 16] [--input DIR] [--weights FILE] [--out DIR]

For each shape, one ``fruitdask bench --backends raw,dask --workers W --threads-per-worker T``
invocation: the raw Keras baseline runs in the same invocation as the shape it is compared
with. Prints one line per shape (end to end and steady ratios to raw, Dask's fixed cost)
and writes ``shapes.json`` in ``--out``, with every bench.json kept under it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def run_shape(shape: str, args: argparse.Namespace) -> dict:
    workers, threads = (int(x) for x in shape.lower().split("x"))
    out = Path(args.out) / f"shape-{workers}x{threads}"
    cmd = [sys.executable, "-m", "fruitdask", "bench", "--backends", "raw,dask", "--no-unpooled-pca", "--quiet",
           "--images", str(args.images), "--image-size", str(args.image_size), "--repeats", str(args.repeats),
           "--precisions", args.precision, "--workers", str(workers), "--threads-per-worker", str(threads),
           "--partition-size", str(args.partition_size), "--out", str(out)]
    cmd += ["--input", args.input] if args.input else []
    cmd += ["--weights", args.weights] if args.weights else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"shape": shape, "status": f"failed (exit {done.returncode}): {done.stderr.strip()[-500:]}"}
    bench = json.loads((out / "bench.json").read_text())
    res = bench["results"][args.precision]
    raw, dask = res["raw"], res["dask"]
    if not (dask.get("steady_images_per_s") and raw.get("steady_images_per_s")):
        return {"shape": shape, "status": "no steady rate: fewer partitions than two waves (more --images, smaller --partition-size)"}
    return {
        "shape": shape, "status": "ok", "cpus": bench["machine"]["cpus"], "cpu": bench["machine"]["cpu"],
        "cpu_flags": bench["machine"]["cpu_flags"], "quiet": bench["machine"]["quiet"],
        "raw_e2e_s": raw["wall_s"]["median"] if "wall_s" in raw else None,
        "dask_e2e_s": dask["wall_s"]["median"] if "wall_s" in dask else None,
        "raw_steady": raw["steady_images_per_s"]["median"], "dask_steady": dask["steady_images_per_s"]["median"],
        "ratio_e2e": dask["ratio_to_raw_e2e"], "ratio_steady": dask["ratio_to_raw_steady"],
        "dask_fixed_cost_s": dask["fixed_cost_s"]["median"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=f"{os.cpu_count()}x1,{max(1, (os.cpu_count() or 2) // 2)}x2,1x{os.cpu_count()}")
    p.add_argument("--images", type=int, default=667)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--partition-size", type=int, default=16,
                   help="images per partition: small enough for two waves on every slot (default: 16)")
    p.add_argument("--input")
    p.add_argument("--weights")
    p.add_argument("--out", default="shape-results")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        row = run_shape(shape, args)
        rows.append(row)
        if row["status"] != "ok":
            print(f"{shape:6s} {row['status']}", flush=True)
            continue
        print(f"{shape:6s} raw {row['raw_steady']:7.2f} img/s steady | dask {row['dask_steady']:7.2f} img/s steady "
              f"(x{row['ratio_steady']:.3f}), end to end x{row['ratio_e2e']:.3f} of raw, fixed cost "
              f"{row['dask_fixed_cost_s']:.1f} s{'' if row['quiet'] else ' (NOT quiet)'}", flush=True)
    (Path(args.out) / "shapes.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
