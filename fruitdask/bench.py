"""``fruitdask bench``: raw single-process Keras vs the Dask pipeline vs the Spark pipeline.

One invocation, the same images (copied once into a work folder) and the same weights for
every engine. Each engine runs in its own child process, so that its memory is measured
alone (psutil samples the child's process tree: the driver, Spark's JVM, the workers) and no
engine inherits another's warm caches, threads or JVM.

Definitions (printed with the results):

- **images/s (end to end)**: images / (start-up + weights broadcast + featurize).
- **steady-state images/s**: measured after every parallel slot finished its first piece of
  work, so it excludes start-up, the broadcast, imports and model builds. Raw: images after
  the first batch / time after the first batch. Pipelines: images in the partitions that
  finished after the first wave (one partition per slot) / time from the end of the first
  wave to the end of the last partition.
- **fixed cost**: start-up + broadcast + featurize − images / steady-state rate, i.e. the
  time spent beyond what steady-state throughput needs (cluster or JVM start, weights
  shipping, worker imports and model builds, first batch, tail imbalance).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import KubeSettings, RunConfig, StorageSettings
from .errors import ConfigError

logger = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
#: ``../shared/data/fruits360-bench`` beside the repository, as CI and the sessions have it.
BENCH_IMAGES = PACKAGE_ROOT.parent / "shared" / "data" / "fruits360-bench"
ENGINES = ("raw", "dask", "spark")
QUIET_LOAD = 0.7
STAGES = ("startup", "listing", "broadcast", "featurize", "pca", "write")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import add_run_options

    g = p.add_argument_group("bench")
    g.add_argument("--images", type=int, default=200, help="how many images of --input to use (default: 200)")
    g.add_argument("--pick", choices=("even", "first"), default="even",
                   help="even: evenly spaced over the sorted listing (every label); first: the first N (default: even)")
    g.add_argument("--backends", default="raw,dask,spark", help="engines to run, comma-separated (default: raw,dask,spark)")
    g.add_argument("--out", default="bench-results", help="folder for bench.json and bench.md (default: ./bench-results)")
    g.add_argument("--no-unpooled-pca", dest="unpooled_pca", action="store_false",
                   help="skip the PCA timing on unpooled (--pooling none) features")
    g.add_argument("--pca-timeout", type=float, default=600.0, help="seconds before a PCA-only run is stopped (default: 600)")
    g.add_argument("--fill-doc", help="also write the Markdown between <!-- bench:SECTION --> markers of this file")
    g.add_argument("--doc-section", default=None, help="marker name for --fill-doc (default: the image size)")
    add_run_options(p)
    p.set_defaults(weights="random", partition_size=32)


# --- the parent: pick images, run each engine in a child, sample memory ------------------


def pick(n_total: int, n: int, how: str) -> list[int]:
    """Indices of ``n`` images out of ``n_total``: the first ``n``, or evenly spaced."""
    n = min(n, n_total)
    if how == "first":
        return list(range(n))
    return [int((i + 0.5) * n_total / n) for i in range(n)]


def steady_rate(ends: list[float], n_images: int, slots: int) -> float | None:
    """Images/s after the first wave of equal partitions (``None`` without a second wave)."""
    ends = sorted(ends)
    m = len(ends)
    if m <= slots or slots < 1:
        return None
    span = ends[-1] - ends[slots - 1]
    return (m - slots) * (n_images / m) / span if span > 0 else None


class MemorySampler:
    """Peak RSS of a process tree, split into driver, JVM and workers (sampled every 0.2 s)."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.peak = {"driver_mb": 0.0, "jvm_mb": 0.0, "workers_mb": 0.0, "worker_max_mb": 0.0, "n_workers": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        try:
            driver = self.root.memory_info().rss
            kids = self.root.children(recursive=True)
        except psutil.Error:
            return
        jvm, workers = 0, []
        for k in kids:
            try:
                rss, name = k.memory_info().rss, k.name().lower()
            except psutil.Error:
                continue
            if "java" in name:
                jvm += rss
            else:
                workers.append(rss)
        mb = 1 / 2**20
        self.peak["driver_mb"] = max(self.peak["driver_mb"], driver * mb)
        self.peak["jvm_mb"] = max(self.peak["jvm_mb"], jvm * mb)
        self.peak["workers_mb"] = max(self.peak["workers_mb"], sum(workers) * mb)
        self.peak["worker_max_mb"] = max(self.peak["worker_max_mb"], max(workers, default=0) * mb)
        self.peak["n_workers"] = max(self.peak["n_workers"], len(workers))

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {k: round(v, 1) for k, v in self.peak.items()}


def run_child(task: str, work: Path, timeout: float | None = None) -> dict:
    """Run ``python -m fruitdask.bench TASK WORK`` and return its result with memory peaks."""
    out = work / f"{task}.json"
    log = work / f"{task}.log"
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        # cwd: the child imports this very checkout, installed or not.
        proc = subprocess.Popen([sys.executable, "-m", "fruitdask.bench", task, str(work)], cwd=PACKAGE_ROOT, stdout=f, stderr=subprocess.STDOUT)
        sampler = MemorySampler(proc.pid)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        finally:
            memory = sampler.stop()
    wall = round(time.perf_counter() - t0, 2)
    if code is None:
        return {"status": f"stopped after {timeout:.0f} s", "wall_s": wall, "memory": memory}
    if code != 0 or not out.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        return {"status": f"failed (exit {code}): " + " | ".join(tail), "wall_s": wall, "memory": memory}
    result = json.loads(out.read_text())
    result.update(wall_s=wall, memory=memory)
    return result


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)}
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except (ImportError, OSError):
        pass
    return info


def command(args: argparse.Namespace) -> int:
    from . import storage
    from .cli import config_from_args

    if args.input is None:
        args.input = str(BENCH_IMAGES)
    engines = [e.strip() for e in args.backends.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown or not engines:
        raise ConfigError(f"--backends {args.backends!r}: use a comma-separated subset of {','.join(ENGINES)}")
    if args.images < 2:
        raise ConfigError(f"--images {args.images}: the PCA needs at least 2 images")
    out_dir = Path(args.out).resolve()
    with tempfile.TemporaryDirectory(prefix="fruitdask-bench-") as tmp:
        work = Path(tmp)
        cfg = config_from_args(args, input=str(work / "images"), output=str(work / "out"), overwrite=True, quiet=True)
        # Nothing is read before the input and the weights pass the region guard.
        storage.guard_regions([args.input, cfg.weights], cfg.storage)
        listing = storage.list_images(args.input, cfg.storage.storage_options())
        chosen = listing.iloc[pick(len(listing), args.images, args.pick)]
        for path, label in zip(chosen["path"], chosen["label"], strict=True):
            dest = work / "images" / label / path.rsplit("/", 1)[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(storage.read_bytes(path, cfg.storage.storage_options()))
        (work / "config.json").write_text(json.dumps({**cfg.to_dict(), "unpooled_pca": args.unpooled_pca}))
        before = machine()
        if before["load_1min"] > QUIET_LOAD:
            logger.warning("load average %.2f > %.1f: other work is running, the timings below are not trustworthy",
                           before["load_1min"], QUIET_LOAD)
        results: dict[str, Any] = {}
        for engine in engines:
            logger.info("bench: %s on %d images at %dpx ...", engine, len(chosen), cfg.image_size)
            results[engine] = run_child(engine, work)
        pca: dict[str, Any] = {}
        if args.unpooled_pca and (work / "unpooled.npy").exists():
            for engine in ("dask", "spark"):
                if engine in engines:
                    logger.info("bench: %s PCA on unpooled features ...", engine)
                    pca[engine] = run_child(f"pca-{engine}", work, timeout=args.pca_timeout)
        parity = _parity(work, engines)
    report = summarize(cfg, args, len(chosen), results, pca, parity, before, machine())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    md = markdown(report)
    (out_dir / "bench.md").write_text(md)
    if args.fill_doc:
        fill_doc(Path(args.fill_doc), args.doc_section or str(cfg.image_size), md)
    print(md)
    logger.info("wrote %s and %s", out_dir / "bench.json", out_dir / "bench.md")
    return 0


def _parity(work: Path, engines: list[str]) -> dict:
    """Largest |feature difference| of each pipeline's output against the raw run."""
    if not (work / "raw_features.npz").exists():
        return {}
    import pyarrow.parquet as pq

    with np.load(work / "raw_features.npz") as z:
        raw = dict(zip(z["paths"].tolist(), z["features"], strict=True))
    out = {}
    for engine in engines:
        folder = work / f"out-{engine}" / "features"
        if engine == "raw" or not folder.exists():
            continue
        t = pq.read_table(folder, columns=["path", "features"]).to_pydict()
        diffs = [float(np.max(np.abs(np.asarray(f, np.float32) - raw[p]))) for p, f in zip(t["path"], t["features"], strict=True)]
        out[engine] = {"rows": len(diffs), "max_abs_diff_vs_raw": max(diffs, default=None)}
    return out


def summarize(cfg: RunConfig, args, n: int, results: dict, pca: dict, parity: dict, before: dict, after: dict) -> dict:
    raw_rate = (results.get("raw") or {}).get("steady_images_per_s")
    raw_e2e = (results.get("raw") or {}).get("images_per_s")
    for r in results.values():
        if "engine_s" in r:
            r["ratio_to_raw_steady"] = round(r["steady_images_per_s"] / raw_rate, 3) if raw_rate and r.get("steady_images_per_s") else None
            r["ratio_to_raw_e2e"] = round(r["images_per_s"] / raw_e2e, 3) if raw_e2e else None
    return {
        "command": "python -m fruitdask bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {**after, "load_1min_before": before["load_1min"], "load_1min_after": after["load_1min"],
                    "quiet": max(before["load_1min"], after["load_1min"]) <= QUIET_LOAD},
        "images": n, "image_size": cfg.image_size, "pooling": cfg.pooling, "batch_size": cfg.batch_size,
        "partition_size": cfg.partition_size, "weights": cfg.weights, "input": args.input,
        "engines": results, "pca_unpooled": pca, "parity": parity,
        "same_weights": len({r["weights_sha256"] for r in results.values() if "weights_sha256" in r}) == 1,
        "definitions": {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in DEFINITIONS.strip().splitlines())},
    }


DEFINITIONS = """
images_per_s: images / (start-up + broadcast + featurize), per engine
steady_images_per_s: after every slot finished its first partition (raw: after the first batch); excludes start-up, broadcast, imports, model builds
fixed_cost_s: start-up + broadcast + featurize - images / steady rate
memory: peak RSS sampled every 0.2 s; driver = the engine's Python process, jvm = Spark's JVM (driver and executor in local mode), workers = every other process of the tree (RSS double-counts pages shared after fork)
"""


def _fmt(v, spec: str = ".2f") -> str:
    return "n/m" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = [
        f"Command: `{rep['command']}`  ",
        f"Machine: {m.get('cpus')} CPUs ({m.get('cpu')}), {m.get('memory_gb')} GB; 1-min load {m['load_1min_before']} before, "
        f"{m['load_1min_after']} after ({'quiet' if m['quiet'] else 'NOT quiet: timings not trustworthy'}); {rep['date']}  ",
        f"{rep['images']} images at {rep['image_size']} px, pooling {rep['pooling']}, batch {rep['batch_size']}, "
        f"partition {rep['partition_size']}, weights {rep['weights']}",
        "",
        "| engine | images/s end to end | ratio to raw | steady images/s | ratio to raw (steady) | fixed cost s "
        "| start-up s | listing s | broadcast s | featurize s | PCA s | write s | driver MB | JVM MB | workers MB |",
        "|---|" + "---:|" * 14,
    ]
    for name, r in rep["engines"].items():
        if "engine_s" not in r:
            lines.append(f"| {name} | {r.get('status')} |" + " |" * 14)
            continue
        t, mem = r["timings_s"], r["memory"]
        lines.append("| " + " | ".join([
            name, _fmt(r["images_per_s"]), _fmt(r.get("ratio_to_raw_e2e"), ".3f"), _fmt(r.get("steady_images_per_s")),
            _fmt(r.get("ratio_to_raw_steady"), ".3f"), _fmt(r.get("fixed_cost_s")),
            *(_fmt(t.get(s)) for s in STAGES),
            _fmt(mem["driver_mb"], ".0f"), _fmt(mem["jvm_mb"] or None, ".0f"), _fmt(mem["workers_mb"] or None, ".0f"),
        ]) + " |")
    if rep["pca_unpooled"]:
        lines += ["", "PCA on unpooled features (`--pooling none`, from the raw run's feature maps):", "",
                  "| engine | features | status | fit s | wall s | driver MB | JVM MB | workers MB |", "|---|---:|---|---:|---:|---:|---:|---:|"]
        for name, r in rep["pca_unpooled"].items():
            mem = r["memory"]
            lines.append(f"| {name} | {_fmt(r.get('d'), ',')} | {r.get('status')} | {_fmt(r.get('fit_s'))} | {_fmt(r.get('wall_s'))} "
                         f"| {_fmt(mem['driver_mb'], '.0f')} | {_fmt(mem['jvm_mb'] or None, '.0f')} | {_fmt(mem['workers_mb'] or None, '.0f')} |")
    if rep["parity"]:
        lines += ["", "Same features: " + "; ".join(
            f"{k} vs raw max |diff| {_fmt(v['max_abs_diff_vs_raw'], '.2e')} over {v['rows']} rows" for k, v in rep["parity"].items())]
    lines += ["", "Definitions:", ""] + [f"- **{k}**: {v}" for k, v in rep["definitions"].items()] + ["", "n/m: not measured."]
    return "\n".join(lines) + "\n"


def fill_doc(path: Path, section: str, md: str) -> None:
    """Replace the text between ``<!-- bench:SECTION start -->`` and ``... end -->`` in ``path``."""
    start, end = f"<!-- bench:{section} start -->", f"<!-- bench:{section} end -->"
    text = path.read_text()
    if start not in text or end not in text:
        raise ConfigError(f"{path} has no {start} ... {end} markers: add them where the table goes, or drop --fill-doc")
    head, rest = text.split(start, 1)
    path.write_text(f"{head}{start}\n{md}{end}{rest.split(end, 1)[1]}")


# --- the children: one engine each --------------------------------------------------------


def _load_config(work: Path) -> tuple[RunConfig, bool]:
    d = json.loads((work / "config.json").read_text())
    unpooled = d.pop("unpooled_pca")
    storage = {**d.pop("storage")}
    storage["allowed_regions"] = tuple(storage["allowed_regions"])
    kube = KubeSettings(**d.pop("kube"))
    return RunConfig(**d, storage=StorageSettings(**storage), kube=kube), unpooled


def _child_raw(cfg: RunConfig, work: Path, unpooled: bool) -> dict:
    """Single-process Keras with the pipelines' own functions, batch by batch."""
    from . import featurize, model, storage

    t = time.perf_counter()
    weights, info = model.load_weights(cfg.weights, image_size=cfg.image_size, seed=cfg.seed,
                                       allow_random=cfg.allow_random_weights)
    t_weights = time.perf_counter() - t
    t = time.perf_counter()
    listing = storage.list_images(cfg.input)
    t_listing = time.perf_counter() - t
    t = time.perf_counter()
    vgg = model.cached_model(info.sha256, weights, cfg.image_size, os.cpu_count())
    t_startup = time.perf_counter() - t
    pooling = "none" if unpooled else cfg.pooling
    paths, feats, ends = list(listing["path"]), [], []
    t0 = time.perf_counter()
    for i in range(0, len(paths), cfg.batch_size):
        contents = [storage.read_bytes(p) for p in paths[i : i + cfg.batch_size]]
        res = featurize.featurize_bytes(vgg, contents, cfg.image_size, pooling, cfg.batch_size)
        feats.append(res.features)
        ends.append(time.perf_counter() - t0)
    featurize_s = ends[-1]
    maps = np.concatenate(feats)
    if unpooled:
        side = cfg.image_size // 32
        np.save(work / "unpooled.npy", maps)
        pooled = featurize.pool(maps.reshape(len(maps), side, side, 512), cfg.pooling) if cfg.pooling != "none" else maps
    else:
        pooled = maps
    np.savez(work / "raw_features.npz", paths=np.array(paths), features=pooled)
    n = len(paths)
    first = min(cfg.batch_size, n)
    steady = (n - first) / (ends[-1] - ends[0]) if len(ends) > 1 else None
    engine_s = t_startup + featurize_s
    return {
        "timings_s": {"weights": round(t_weights, 3), "listing": round(t_listing, 3), "startup": round(t_startup, 3),
                      "featurize": round(featurize_s, 3), "first_batch": round(ends[0], 3)},
        "engine_s": round(engine_s, 3), "images_per_s": round(n / engine_s, 3),
        "steady_images_per_s": round(steady, 3) if steady else None,
        "fixed_cost_s": round(engine_s - n / steady, 3) if steady else None,
        "threads": os.cpu_count(), "weights_sha256": info.sha256, "images": n,
    }


def _child_pipeline(cfg: RunConfig, work: Path, backend: str) -> dict:
    from . import pipeline

    cfg = dataclasses.replace(cfg, backend=backend, output=str(work / f"out-{backend}"))
    ends: list[float] = []

    def progress(collection) -> None:  # Dask: when each featurize partition finished
        from distributed import as_completed, futures_of

        t0 = time.perf_counter()
        ends.extend(round(time.perf_counter() - t0, 3) for _ in as_completed(futures_of(collection)))

    doc = pipeline.run(cfg, progress=progress)
    ends = ends or doc["extra"].get("featurize_task_ends_s", [])
    t, n = doc["timings_s"], doc["counts"]["images_listed"]
    engine_s = t.get("startup", 0) + t.get("broadcast", 0) + t.get("featurize", 0)
    slots = doc["cluster"].get("threads") or 1
    steady = steady_rate(ends, n, slots)
    return {
        "timings_s": t, "engine_s": round(engine_s, 3), "images_per_s": round(n / engine_s, 3),
        "steady_images_per_s": round(steady, 3) if steady else None,
        "fixed_cost_s": round(engine_s - n / steady, 3) if steady else None,
        "partition_ends_s": ends, "slots": slots, "cluster": doc["cluster"], "weights_sha256": doc["weights"]["sha256"],
        "images": n, "k": doc["reduction"]["k"], "pca_method": doc["reduction"]["method"],
    }


def _child_pca(cfg: RunConfig, work: Path, engine: str) -> dict:
    """Time the standardize + PCA fit alone on the raw run's unpooled features."""
    from .reduce import fit_incremental_pca, plan_pca

    X = np.load(work / "unpooled.npy")
    n, d = X.shape
    unpooled = dataclasses.replace(cfg, pooling="none")
    if engine == "dask":
        import dask.array as da

        t = time.perf_counter()
        red = fit_incremental_pca(da.from_array(X, chunks=(min(n, 256), d)), components=cfg.components, variance=cfg.variance,
                                  batch_size=cfg.pca_batch_size, power_iterations=cfg.pca_power_iterations, seed=cfg.seed)
        return {"status": "ok", "d": d, "n": n, "fit_s": round(time.perf_counter() - t, 3), "k": red.k, "method": red.method}
    from .backends.spark_backend import check_pca_size, spark_pca
    from .errors import ReductionError
    from .spark_session import spark_session

    try:
        driver_memory = check_pca_size(unpooled)
    except ReductionError as e:
        return {"status": "refused", "d": d, "n": n, "reason": str(e)}
    with spark_session(unpooled, driver_memory=driver_memory) as spark:
        from pyspark.ml.linalg import Vectors

        df = spark.createDataFrame([(Vectors.dense(row.astype(np.float64)),) for row in X], ["x"]).cache()
        df.count()
        t = time.perf_counter()
        red = spark_pca(df, plan_pca(n, d, cfg.components, cfg.pca_batch_size), n, cfg.variance)
        return {"status": "ok", "d": d, "n": n, "fit_s": round(time.perf_counter() - t, 3), "k": red.k, "method": red.method}


def _child_main(argv: list[str]) -> int:
    task, work = argv[0], Path(argv[1])
    from .cli import setup_logging
    from .config import TF_ENV

    for key, value in TF_ENV.items():
        os.environ.setdefault(key, value)
    setup_logging(quiet=True, debug=False)
    cfg, unpooled = _load_config(work)
    if task == "raw":
        result = _child_raw(cfg, work, unpooled)
    elif task in ("dask", "spark"):
        result = _child_pipeline(cfg, work, task)
    else:
        result = _child_pca(cfg, work, task.removeprefix("pca-"))
    (work / f"{task}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
