"""``fruitdask bench``: raw single-process Keras vs the Dask pipeline vs the Spark pipeline.

One invocation, the same images (copied once into a work folder) and the same weights for
every engine. Each engine runs in its own child process, so that its memory is measured
alone (psutil samples the child's process tree: the driver, Spark's JVM, the workers) and no
engine inherits another's warm caches, threads or JVM. Each engine runs ``--repeats`` times
(default 3), interleaved with the others, and ``--precisions float32,bfloat16`` adds a
precision axis in the same invocation.

Definitions (printed with the results):

- **end to end**: the wall time of the whole command, from process start to exit, for every
  engine: imports, listing, weights, cluster or JVM start, featurize, PCA, Parquet write.
  Raw Keras is a plain one-process script doing the same work (its TensorFlow import and
  model build count, as the pipelines' do). Reported as median (min-max) over the runs.
- **steady-state images/s**: measured after every parallel slot finished its first piece of
  work, so it excludes start-up, the broadcast, imports and model builds. Raw: images after
  the first batch / time after the first batch. Pipelines: images in the partitions that
  finished after the first wave (one partition per slot) / time from the end of the first
  wave to the end of the last partition.
- **fixed cost**: end to end - images / steady-state rate, i.e. the time spent beyond what
  steady-state throughput needs (imports, cluster or JVM start, weights, model builds,
  first batch, tail imbalance, PCA and write).
- **quiet**: the CPU busy share is sampled for 2 s right before each engine run (not after
  the previous one, whose tail a load average would still hold).
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

from fruitdask.config import KubeSettings, RunConfig, StorageSettings
from fruitdask.errors import ConfigError
from fruitdask.progress import Progress

logger = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
#: ``../shared/data/fruits360-bench`` beside the repository, as CI and the sessions have it.
BENCH_IMAGES = PACKAGE_ROOT.parent / "shared" / "data" / "fruits360-bench"
ENGINES = ("raw", "dask", "spark")
#: A run counts as quiet when the CPU was at most this busy just before it started (2 idle
#: cores read 1-5 %; another helper's test run reads 50 % or more).
QUIET_CPU_PCT = 25.0
QUIET_SAMPLE_S = 2.0
STAGES = ("startup", "listing", "weights", "featurize", "pca", "write")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fruitdask.cli import add_run_options

    g = p.add_argument_group("bench")
    g.add_argument("--images", type=int, default=200, help="how many images of --input to use (default: 200)")
    g.add_argument("--pick", choices=("even", "first"), default="even",
                   help="even: evenly spaced over the sorted listing (every label); first: the first N (default: even)")
    g.add_argument("--backends", default="raw,dask,spark", help="engines to run, comma-separated (default: raw,dask,spark)")
    g.add_argument("--out", default="bench-results", help="folder for bench.json and bench.md (default: ./bench-results)")
    g.add_argument("--no-unpooled-pca", dest="unpooled_pca", action="store_false",
                   help="skip the PCA timing on unpooled (--pooling none) features")
    g.add_argument("--pca-timeout", type=float, default=600.0, help="seconds before a PCA-only run is stopped (default: 600)")
    g.add_argument("--repeats", type=int, default=3, help="runs of each engine, interleaved; median and min/max reported (default: 3)")
    g.add_argument("--precisions", help="comma-separated precisions to compare in one invocation, e.g. float32,bfloat16 "
                   "(default: --precision); bench.json gets the speed ratio and held-out accuracy of each")
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


def run_child(task: str, work: Path, *, prec: str = "float32", repeat: int = 0, timeout: float | None = None) -> dict:
    """Run ``python -m fruitdask.bench TASK WORK PREC REPEAT`` and return its result.

    ``wall_s`` is the child's whole life as the parent saw it (interpreter start, imports,
    everything, exit): the end-to-end time of that engine.
    """
    name = f"{task}-{prec}-{repeat}"
    out = work / f"{name}.json"
    log = work / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        # cwd: the child imports this very checkout, installed or not.
        proc = subprocess.Popen([sys.executable, "-m", "fruitdask.bench", task, str(work), prec, str(repeat)],
                                cwd=PACKAGE_ROOT, stdout=f, stderr=subprocess.STDOUT)
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
    result.update(status="ok", wall_s=wall, memory=memory, precision=prec)
    n, steady = result.get("images"), result.get("steady_images_per_s")
    if n:
        result["images_per_s_e2e"] = round(n / wall, 3)
        result["fixed_cost_s"] = round(wall - n / steady, 3) if steady else None
    return result


def machine(cpuinfo: str | None = None) -> dict:
    """CPU model, core count, memory and the bf16 flags that decide ``--precision auto``."""
    from fruitdask.features import precision

    text = precision.read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = precision.cpu_flags(text)
    info: dict[str, Any] = {
        "cpus": os.cpu_count(), "cpu": precision.cpu_model(text),
        "cpu_flags": {f: f in flags for f in ("avx512f", *precision.BF16_CPU_FLAGS)},
        "gpu_compute_capabilities": precision.gpu_compute_capabilities(),
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    return info


def sample_load(seconds: float = QUIET_SAMPLE_S) -> dict:
    """How busy the machine is *now*, right before an engine starts (nothing of the bench runs).

    The verdict uses the CPU busy share over the last ``seconds``; the 1-minute load average
    is kept for the record but still holds the previous engine's tail for a minute.
    """
    import psutil

    busy = psutil.cpu_percent(interval=seconds)
    return {"cpu_busy_pct": round(busy, 1), "load_1min": round(os.getloadavg()[0], 2), "quiet": busy <= QUIET_CPU_PCT}


def parse_precisions(text: str | None, default: str) -> list[str]:
    """The ``--precisions`` axis, resolved on this machine (bfloat16 refused where emulated)."""
    from fruitdask.features import precision

    asked = [p.strip() for p in (text or default).split(",") if p.strip()]
    out: list[str] = []
    for p in asked:
        resolved = precision.detect_and_resolve(p).precision
        if resolved not in out:
            out.append(resolved)
    return out


def command(args: argparse.Namespace) -> int:
    from fruitdask import storage
    from fruitdask.cli import config_from_args

    if args.input is None:
        args.input = str(BENCH_IMAGES)
    engines = [e.strip() for e in args.backends.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown or not engines:
        raise ConfigError(f"--backends {args.backends!r}: use a comma-separated subset of {','.join(ENGINES)}")
    if args.images < 2:
        raise ConfigError(f"--images {args.images}: the PCA needs at least 2 images")
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: run each engine at least once (3 gives a median and a spread)")
    out_dir = Path(args.out).resolve()
    with tempfile.TemporaryDirectory(prefix="fruitdask-bench-") as tmp:
        work = Path(tmp)
        cfg = config_from_args(args, input=str(work / "images"), output=str(work / "out"), overwrite=True, quiet=True)
        precisions = parse_precisions(args.precisions, cfg.precision)
        # Nothing is read before the input and the weights pass the region guard.
        storage.guard_regions([args.input, cfg.weights], cfg.storage)
        listing = storage.list_images(args.input, cfg.storage.storage_options())
        chosen = listing.iloc[pick(len(listing), args.images, args.pick)]
        for path, label in zip(chosen["path"], chosen["label"], strict=True):
            dest = work / "images" / label / path.rsplit("/", 1)[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(storage.read_bytes(path, cfg.storage.storage_options()))
        for prec in precisions:
            # The unpooled maps for the PCA timing are saved once, by the first raw run.
            unpooled = args.unpooled_pca and prec == precisions[0]
            (work / f"config-{prec}.json").write_text(
                json.dumps({**dataclasses.replace(cfg, precision=prec).to_dict(), "unpooled_pca": unpooled}))
        runs: dict[str, dict[str, list[dict]]] = {p: {e: [] for e in engines} for p in precisions}
        # Interleaved (repeat > precision > engine) so a drift in machine load hits every cell alike.
        for repeat in range(args.repeats):
            for prec in precisions:
                for engine in engines:
                    load = sample_load()
                    if not load["quiet"]:
                        logger.warning("CPU %.0f%% busy before %s (%s): other work is running, this run is not trustworthy",
                                       load["cpu_busy_pct"], engine, prec)
                    logger.info("bench: %s %s, run %d/%d, %d images at %dpx ...", engine, prec, repeat + 1, args.repeats,
                                len(chosen), cfg.image_size)
                    result = run_child(engine, work, prec=prec, repeat=repeat)
                    result["load_before"] = load
                    runs[prec][engine].append(result)
        pca: dict[str, Any] = {}
        if args.unpooled_pca and (work / "unpooled.npy").exists():
            for engine in ("dask", "spark"):
                if engine in engines:
                    logger.info("bench: %s PCA on unpooled features ...", engine)
                    pca[engine] = run_child(f"pca-{engine}", work, prec=precisions[0], timeout=args.pca_timeout)
        parity = {p: _parity(work, engines, p) for p in precisions}
        comparison = compare_precisions(work, runs, precisions, cfg.seed) if len(precisions) > 1 else {}
    report = summarize(cfg, args, len(chosen), precisions, runs, pca, parity, comparison, machine())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    md = markdown(report)
    (out_dir / "bench.md").write_text(md)
    if args.fill_doc:
        fill_doc(Path(args.fill_doc), args.doc_section or str(cfg.image_size), md)
    print(md)
    logger.info("wrote %s and %s", out_dir / "bench.json", out_dir / "bench.md")
    return 0


def _parity(work: Path, engines: list[str], prec: str) -> dict:
    """Largest |feature difference| of each pipeline's output against the raw run."""
    raw_file = work / f"raw_features-{prec}.npz"
    if not raw_file.exists():
        return {}
    from fruitdask import output
    from fruitdask.features.frames import matrix

    with np.load(raw_file) as z:
        raw = dict(zip(z["paths"].tolist(), z["features"], strict=True))
    out = {}
    for engine in engines:
        folder = work / f"out-{engine}-{prec}"
        if engine == "raw" or not (folder / output.FEATURES).exists():
            continue
        t = output.read_run(str(folder)).features(["path", "features"])
        diffs = [float(np.max(np.abs(f - raw[p]))) for p, f in zip(t["path"], matrix(t["features"]), strict=True)]
        out[engine] = {"rows": len(diffs), "max_abs_diff_vs_raw": max(diffs, default=None)}
    return out


def held_out_accuracy(features: np.ndarray, labels: np.ndarray, variance: float, every: int = 4) -> dict:
    """Accuracy of the project's classifier (standardize, PCA to ``variance``, logistic
    regression) trained on 3 of every 4 images of each label and tested on the 4th."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from fruitdask.classifier.classify import fit_classifier

    labels = np.asarray(labels)
    test = np.zeros(len(labels), dtype=bool)
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        test[idx[every - 1 :: every]] = True
    train = ~test
    if not test.any():
        raise ValueError(f"no label has {every} images to hold one out: bench more images (--images)")
    scaler = StandardScaler().fit(features[train])
    pca = PCA(n_components=variance if variance < 1 else None, svd_solver="full").fit(scaler.transform(features[train]))
    clf = fit_classifier(pca.transform(scaler.transform(features[train])), labels[train])
    predicted = clf.predict(pca.transform(scaler.transform(features[test])))
    return {"accuracy": round(float(np.mean(predicted == labels[test])), 4), "train": int(train.sum()), "test": int(test.sum()),
            "k": int(pca.n_components_)}


def compare_precisions(work: Path, runs: dict, precisions: list[str], seed: int) -> dict:
    """bf16 (or any second precision) against the first: speed ratios, feature error, accuracy."""
    base = precisions[0]
    cfg = json.loads((work / f"config-{base}.json").read_text())
    feats: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for prec in precisions:
        f = work / f"raw_features-{prec}.npz"
        if f.exists():
            with np.load(f) as z:
                paths = z["paths"]
                feats[prec] = (paths, z["features"], np.array([p.rsplit("/", 2)[-2] for p in paths]))
    out: dict[str, Any] = {"baseline": base, "accuracy": {}, "vs_baseline": {}}
    for prec, (_, x, y) in feats.items():
        try:
            out["accuracy"][prec] = held_out_accuracy(x, y, cfg["variance"])
        except Exception as e:  # noqa: BLE001 - a bench reports what it could not measure
            out["accuracy"][prec] = {"status": f"not measured ({type(e).__name__}: {e})"}
    for prec in precisions[1:]:
        cmp: dict[str, Any] = {"engines": {}}
        for engine, base_runs in runs[base].items():
            a, b = _stats(base_runs, "images_per_s_e2e"), _stats(runs[prec][engine], "images_per_s_e2e")
            sa, sb = _stats(base_runs, "steady_images_per_s"), _stats(runs[prec][engine], "steady_images_per_s")
            cmp["engines"][engine] = {
                "speed_ratio_e2e": _ratio(b, a), "speed_ratio_steady": _ratio(sb, sa),
            }
        if base in feats and prec in feats and np.array_equal(feats[base][0], feats[prec][0]):
            xa, xb = feats[base][1].astype(np.float64), feats[prec][1].astype(np.float64)
            cmp["features"] = {
                "relative_error": round(float(np.linalg.norm(xb - xa) / max(np.linalg.norm(xa), 1e-30)), 6),
                "correlation": round(float(np.corrcoef(xa.ravel(), xb.ravel())[0, 1]), 6),
            }
        acc_a, acc_b = out["accuracy"].get(base, {}).get("accuracy"), out["accuracy"].get(prec, {}).get("accuracy")
        if acc_a is not None and acc_b is not None:
            cmp["accuracy_points"] = round(100 * (acc_b - acc_a), 2)
        out["vs_baseline"][prec] = cmp
    return out


def _stats(runs: list[dict], key: str) -> dict | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return None
    return {"median": round(float(np.median(values)), 3), "min": round(min(values), 3), "max": round(max(values), 3), "n": len(values)}


def _ratio(a: dict | None, b: dict | None) -> float | None:
    return round(a["median"] / b["median"], 3) if a and b and b["median"] else None


#: Per-run keys kept in bench.json (the children's partition end times etc. are dropped).
RUN_KEYS = ("status", "wall_s", "images_per_s_e2e", "steady_images_per_s", "fixed_cost_s", "timings_s", "memory",
            "load_before", "slots", "k", "images", "weights_sha256", "precision")


def summarize(cfg: RunConfig, args, n: int, precisions: list[str], runs: dict, pca: dict, parity: dict, comparison: dict,
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
                "wall_s": _stats(ok, "wall_s"),
                "images_per_s_e2e": _stats(ok, "images_per_s_e2e"),
                "steady_images_per_s": _stats(ok, "steady_images_per_s"),
                "fixed_cost_s": _stats(ok, "fixed_cost_s"),
                "stages_s": {s: round(float(np.median([r["timings_s"][s] for r in ok if s in r["timings_s"]])), 3) for s in stages},
                "memory": {k: max((r["memory"][k] for r in engine_runs if "memory" in r), default=0) for k in MEMORY_KEYS},
            }
        raw = results[prec].get("raw", {})
        for r in results[prec].values():
            r["ratio_to_raw_e2e"] = _ratio(r["images_per_s_e2e"], raw.get("images_per_s_e2e"))
            r["ratio_to_raw_steady"] = _ratio(r["steady_images_per_s"], raw.get("steady_images_per_s"))
    samples = [r["load_before"] for p in runs.values() for rs in p.values() for r in rs if "load_before" in r]
    return {
        "command": "python -m fruitdask bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {**mach, "quiet": all(s["quiet"] for s in samples),
                    "cpu_busy_pct_before_runs": {"max": max((s["cpu_busy_pct"] for s in samples), default=None),
                                                 "median": float(np.median([s["cpu_busy_pct"] for s in samples])) if samples else None},
                    "quiet_rule": f"CPU busy <= {QUIET_CPU_PCT:g}% over the {QUIET_SAMPLE_S:g} s before every engine run"},
        "images": n, "image_size": cfg.image_size, "pooling": cfg.pooling, "batch_size": cfg.batch_size,
        "partition_size": cfg.partition_size, "weights": cfg.weights, "input": args.input, "repeats": args.repeats,
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


def _fmt(v, spec: str = ".2f") -> str:
    return "n/m" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _spread(st: dict | None, spec: str = ".2f") -> str:
    if not st:
        return "n/m"
    if st["n"] == 1:
        return _fmt(st["median"], spec)
    return f"{_fmt(st['median'], spec)} ({_fmt(st['min'], spec)}–{_fmt(st['max'], spec)})"


def markdown(rep: dict) -> str:
    m = rep["machine"]
    flags = ", ".join(f for f, on in (m.get("cpu_flags") or {}).items() if on) or "none"
    busy = m["cpu_busy_pct_before_runs"]
    lines = [
        f"Command: `{rep['command']}`  ",
        f"Machine: {m.get('cpus')} CPUs ({m.get('cpu')}; flags: {flags}), {m.get('memory_gb')} GB; CPU busy before the runs: "
        f"median {_fmt(busy['median'], '.0f')} %, max {_fmt(busy['max'], '.0f')} % "
        f"({'quiet' if m['quiet'] else 'NOT quiet: timings not trustworthy'}); {rep['date']}  ",
        f"{rep['images']} images at {rep['image_size']} px, pooling {rep['pooling']}, batch {rep['batch_size']}, "
        f"partition {rep['partition_size']}, weights {rep['weights']}; each engine run {rep['repeats']} times: "
        "median (min–max)",
    ]
    for prec, engines in rep["results"].items():
        lines += ["", f"**Precision {prec}**", "",
                  "| engine | end to end s | images/s end to end | ratio to raw | steady images/s | ratio to raw (steady) "
                  "| fixed cost s | start-up s | listing s | weights s | featurize s | PCA s | write s | driver MB | JVM MB | workers MB |",
                  "|---|" + "---:|" * 15]
        for name, r in engines.items():
            if not r["ok_runs"]:
                lines.append(f"| {name} | {r['runs'][0].get('status') if r['runs'] else 'not run'} |" + " |" * 15)
                continue
            st, mem = r["stages_s"], r["memory"]
            lines.append("| " + " | ".join([
                name, _spread(r["wall_s"], ".1f"), _spread(r["images_per_s_e2e"]), _fmt(r["ratio_to_raw_e2e"], ".3f"),
                _spread(r["steady_images_per_s"]), _fmt(r["ratio_to_raw_steady"], ".3f"), _spread(r["fixed_cost_s"], ".1f"),
                *(_fmt(st.get(s)) for s in STAGES),
                _fmt(mem["driver_mb"], ".0f"), _fmt(mem["jvm_mb"] or None, ".0f"), _fmt(mem["workers_mb"] or None, ".0f"),
            ]) + " |")
    cmp = rep.get("precision_comparison") or {}
    if cmp:
        base = cmp["baseline"]
        lines += ["", f"**Precision against {base}** (ratio of medians; accuracy: the classifier trained on 3/4 of the "
                  "images of each label, tested on the rest, on the raw engine's features)", "",
                  "| precision | engine | speed ratio end to end | speed ratio steady |", "|---|---|---:|---:|"]
        for prec, c in cmp["vs_baseline"].items():
            for engine, e in c["engines"].items():
                lines.append(f"| {prec} | {engine} | {_fmt(e['speed_ratio_e2e'], '.3f')} | {_fmt(e['speed_ratio_steady'], '.3f')} |")
        lines.append("")
        acc = "; ".join(f"{p} {_fmt(a.get('accuracy'), '.4f')} ({a.get('test', '?')} held out)" if "accuracy" in a
                        else f"{p} {a.get('status')}" for p, a in cmp["accuracy"].items())
        lines.append(f"Held-out accuracy: {acc}")
        for prec, c in cmp["vs_baseline"].items():
            if "features" in c:
                lines.append(f"Features {prec} vs {base}: relative error {c['features']['relative_error']:.2e}, correlation "
                             f"{c['features']['correlation']:.6f}; accuracy difference {_fmt(c.get('accuracy_points'), '+.2f')} points")
    if rep["pca_unpooled"]:
        lines += ["", "PCA on unpooled features (`--pooling none`, from the raw run's feature maps):", "",
                  "| engine | features | status | K | fit s | wall s | driver MB | JVM MB | workers MB |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in rep["pca_unpooled"].items():
            mem = r["memory"]
            lines.append(f"| {name} | {_fmt(r.get('d'), ',')} | {r.get('status')} | {_fmt(r.get('k'), 'd')} | {_fmt(r.get('fit_s'))} "
                         f"| {_fmt(r.get('wall_s'))} | {_fmt(mem['driver_mb'], '.0f')} | {_fmt(mem['jvm_mb'] or None, '.0f')} "
                         f"| {_fmt(mem['workers_mb'] or None, '.0f')} |")
    same = [f"{k} vs raw ({p}) max |diff| {_fmt(v['max_abs_diff_vs_raw'], '.2e')} over {v['rows']} rows"
            for p, engines in rep["parity"].items() for k, v in engines.items()]
    if same:
        lines += ["", "Same features: " + "; ".join(same)]
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


def _load_config(work: Path, prec: str) -> tuple[RunConfig, bool]:
    d = json.loads((work / f"config-{prec}.json").read_text())
    unpooled = d.pop("unpooled_pca")
    storage = {**d.pop("storage")}
    storage["allowed_regions"] = tuple(storage["allowed_regions"])
    kube = KubeSettings(**d.pop("kube"))
    return RunConfig(**d, storage=StorageSettings(**storage), kube=kube), unpooled


def _child_raw(cfg: RunConfig, work: Path, unpooled: bool) -> dict:
    """A plain single-process Keras script doing the pipelines' work: list, load weights,
    build VGG16, featurize batch by batch, standardize + PCA (scikit-learn), write Parquet.

    It uses the pipelines' own batch functions, so the features are the same; only the
    orchestration (and its cost) differs.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fruitdask import storage
    from fruitdask.features import featurize, model

    timings: dict[str, float] = {}
    t = time.perf_counter()
    listing = storage.list_images(cfg.input)
    timings["listing"] = time.perf_counter() - t
    t = time.perf_counter()
    weights, info = model.load_weights(cfg.weights, image_size=cfg.image_size, seed=cfg.seed,
                                       allow_random=cfg.allow_random_weights)
    timings["weights"] = time.perf_counter() - t
    t = time.perf_counter()
    vgg = model.cached_model(info.sha256, weights, cfg.image_size, os.cpu_count(), cfg.precision)
    timings["startup"] = time.perf_counter() - t
    pooling = "none" if unpooled else cfg.pooling
    paths, labels, feats, ends = list(listing["path"]), list(listing["label"]), [], []
    t0 = time.perf_counter()
    for i in range(0, len(paths), cfg.batch_size):
        contents = [storage.read_bytes(p) for p in paths[i : i + cfg.batch_size]]
        res = featurize.featurize_bytes(vgg, contents, cfg.image_size, pooling, cfg.batch_size)
        feats.append(res.features)
        ends.append(time.perf_counter() - t0)
    timings["featurize"] = ends[-1]
    first_batch = ends[0]
    maps = np.concatenate(feats)
    if unpooled:  # for the PCA timing on wide features (once, outside the timed stages)
        side = cfg.image_size // 32
        np.save(work / "unpooled.npy", maps)
        pooled = featurize.pool(maps.reshape(len(maps), side, side, 512), cfg.pooling) if cfg.pooling != "none" else maps
    else:
        pooled = maps
    np.savez(work / f"raw_features-{cfg.precision}.npz", paths=np.array(paths), features=pooled)
    t = time.perf_counter()
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    z = StandardScaler().fit_transform(pooled.astype(np.float64))
    pca = PCA(n_components=cfg.components or (cfg.variance if cfg.variance < 1 else None), svd_solver="full")
    reduced = pca.fit_transform(z).astype(np.float32)
    timings["pca"] = time.perf_counter() - t
    t = time.perf_counter()
    out = work / f"out-raw-{cfg.precision}"
    out.mkdir(exist_ok=True)
    pq.write_table(pa.table({"path": paths, "label": labels, "features": list(pooled), "pca": list(reduced)}),
                   out / "features.parquet")
    timings["write"] = time.perf_counter() - t
    n = len(paths)
    first = min(cfg.batch_size, n)
    steady = (n - first) / (ends[-1] - ends[0]) if len(ends) > 1 else None
    return {
        "timings_s": {k: round(v, 3) for k, v in timings.items()} | {"first_batch": round(first_batch, 3)},
        "steady_images_per_s": round(steady, 3) if steady else None,
        "slots": 1, "threads": os.cpu_count(), "weights_sha256": info.sha256, "images": n, "k": int(pca.n_components_),
    }


def _child_pipeline(cfg: RunConfig, work: Path, backend: str) -> dict:
    from fruitdask import pipeline

    cfg = dataclasses.replace(cfg, backend=backend, output=str(work / f"out-{backend}-{cfg.precision}"))
    ends: list[float] = []

    class PartitionEnds(Progress):  # Dask: when each featurize partition finished
        def start(self, total: int) -> None:
            self.t0 = time.perf_counter()

        def advance(self, images: int) -> None:
            ends.append(round(time.perf_counter() - self.t0, 3))

    doc = pipeline.run(cfg, progress=PartitionEnds() if backend == "dask" else None)
    ends = ends or doc["extra"].get("featurize_task_ends_s", [])
    t, n = doc["timings_s"], doc["counts"]["images_listed"]
    slots = doc["cluster"].get("threads") or 1
    steady = steady_rate(ends, n, slots)
    return {
        "timings_s": t, "steady_images_per_s": round(steady, 3) if steady else None,
        "partitions": len(ends), "slots": slots, "weights_sha256": doc["weights"]["sha256"],
        "images": n, "k": doc["reduction"]["k"], "pca_method": doc["reduction"]["method"],
    }


def _child_pca(cfg: RunConfig, work: Path, engine: str) -> dict:
    """Time the standardize + PCA fit alone on the raw run's unpooled features."""
    from fruitdask.reduce import fit_incremental_pca, plan_pca

    X = np.load(work / "unpooled.npy")
    n, d = X.shape
    unpooled = dataclasses.replace(cfg, pooling="none")
    if engine == "dask":
        import dask.array as da

        t = time.perf_counter()
        red = fit_incremental_pca(da.from_array(X, chunks=(min(n, 256), d)), components=cfg.components, variance=cfg.variance,
                                  batch_size=cfg.pca_batch_size, power_iterations=cfg.pca_power_iterations, seed=cfg.seed)
        return {"status": "ok", "d": d, "n": n, "fit_s": round(time.perf_counter() - t, 3), "k": red.k, "method": red.method}
    from fruitdask.backends.spark.backend import check_pca_size, spark_pca
    from fruitdask.backends.spark.session import spark_session
    from fruitdask.errors import ReductionError

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
    prec, repeat = (argv[2], int(argv[3])) if len(argv) > 3 else ("float32", 0)
    from fruitdask.config import TF_ENV

    for key, value in TF_ENV.items():
        os.environ.setdefault(key, value)
    cfg, unpooled = _load_config(work, prec)
    if task == "raw":
        # A plain script's logging: importing the CLI would import distributed, not a raw cost.
        logging.basicConfig(level=logging.WARNING)
        result = _child_raw(cfg, work, unpooled and repeat == 0)
    else:
        from fruitdask.cli import setup_logging

        setup_logging(quiet=True, debug=False)
        if task in ("dask", "spark"):
            result = _child_pipeline(cfg, work, task)
        else:
            result = _child_pca(cfg, work, task.removeprefix("pca-"))
    (work / f"{task}-{prec}-{repeat}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
