"""bench.json: per precision and engine, the runs, their median and spread, the ratios to raw."""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from fruitdask.bench.machine import QUIET_CPU_PCT, QUIET_SAMPLE_S
from fruitdask.config import RunConfig
from fruitdask.progress import steady_rate

STAGES = ("startup", "listing", "weights", "featurize", "pca", "write")


def first_wave_rate(ends: list[float], n_images: int, slots: int) -> float | None:
    """:func:`fruitdask.progress.steady_rate` after the first wave of equal partitions, one per
    slot (``ends``: each partition's end, in seconds; ``None`` without a second wave)."""
    ends = sorted(ends)
    marks = [(t, (i + 1) * n_images / len(ends)) for i, t in enumerate(ends)]
    return steady_rate(marks, slots - 1) if slots >= 1 else None


def stats(runs: list[dict], key: str) -> dict[str, Any] | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return None
    return {"median": round(float(np.median(values)), 3), "min": round(min(values), 3), "max": round(max(values), 3), "n": len(values)}


def ratio(a: dict | None, b: dict | None) -> float | None:
    return round(a["median"] / b["median"], 3) if a and b and b["median"] else None


#: Per-run keys kept in bench.json (the children's partition end times etc. are dropped).
RUN_KEYS = ("status", "wall_s", "images_per_s_e2e", "steady_images_per_s", "fixed_cost_s", "timings_s", "memory",
            "load_before", "slots", "k", "images", "weights_sha256", "precision")


def summarize(cfg: RunConfig, input_url: str, repeats: int, n: int, precisions: list[str], runs: dict, pca: dict, parity: dict, comparison: dict,
              mach: dict) -> dict:
    """The bench.json document: per precision and engine, the runs and their median/spread."""
    results: dict[str, dict[str, Any]] = {}
    for prec in precisions:
        results[prec] = {}
        for engine, engine_runs in runs[prec].items():
            ok = [r for r in engine_runs if r.get("status") == "ok"]
            stages = sorted({k for r in ok for k in r["timings_s"]})
            results[prec][engine] = {
                "runs": [{k: r[k] for k in RUN_KEYS if k in r} for r in engine_runs],
                "ok_runs": len(ok),
                "wall_s": stats(ok, "wall_s"),
                "images_per_s_e2e": stats(ok, "images_per_s_e2e"),
                "steady_images_per_s": stats(ok, "steady_images_per_s"),
                "fixed_cost_s": stats(ok, "fixed_cost_s"),
                "stages_s": {s: round(float(np.median([r["timings_s"][s] for r in ok if s in r["timings_s"]])), 3) for s in stages},
                "memory": {k: max((r["memory"][k] for r in engine_runs if "memory" in r), default=0) for k in MEMORY_KEYS},
            }
        raw = results[prec].get("raw", {})
        for r in results[prec].values():
            r["ratio_to_raw_e2e"] = ratio(r["images_per_s_e2e"], raw.get("images_per_s_e2e"))
            r["ratio_to_raw_steady"] = ratio(r["steady_images_per_s"], raw.get("steady_images_per_s"))
    samples = [r["load_before"] for p in runs.values() for rs in p.values() for r in rs if "load_before" in r]
    return {
        "command": "python -m fruitdask bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {**mach, "quiet": all(s["quiet"] for s in samples),
                    "cpu_busy_pct_before_runs": {"max": max((s["cpu_busy_pct"] for s in samples), default=None),
                                                 "median": float(np.median([s["cpu_busy_pct"] for s in samples])) if samples else None},
                    "quiet_rule": f"CPU busy <= {QUIET_CPU_PCT:g}% over the {QUIET_SAMPLE_S:g} s before every engine run"},
        "images": n, "image_size": cfg.image_size, "pooling": cfg.pooling, "batch_size": cfg.batch_size,
        "partition_size": cfg.partition_size, "weights": cfg.weights, "input": input_url, "repeats": repeats,
        "precisions": precisions, "results": results, "precision_comparison": comparison,
        "pca_unpooled": pca, "parity": parity,
        "same_weights": len({r.get("weights_sha256") for p in runs.values() for rs in p.values() for r in rs
                             if r.get("weights_sha256")}) == 1,
        "definitions": {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in DEFINITIONS.strip().splitlines())},
    }


MEMORY_KEYS = ("driver_mb", "jvm_mb", "workers_mb", "worker_max_mb", "n_workers")


DEFINITIONS = """
end_to_end_s: wall time of the whole command in its own process, from process start to exit: imports, listing, weights, cluster or JVM start, featurize, PCA, Parquet write; for every engine, raw Keras included (its TensorFlow import and model build count too)
images_per_s_e2e: images / end_to_end_s
steady_images_per_s: after every slot finished its first partition (raw: after the first batch); excludes start-up, broadcast, imports, model builds
fixed_cost_s: end_to_end_s - images / steady rate: everything beyond steady-state throughput
median (min-max): over --repeats runs of each engine, interleaved with the other engines and precisions
quiet: the CPU busy share sampled right before each engine run (not after the previous one) stayed under the threshold
memory: peak RSS over the runs, sampled every 0.2 s; driver = the engine's Python process, jvm = Spark's JVM (driver and executor in local mode), workers = every other process of the tree (RSS double-counts pages shared after fork)
"""
