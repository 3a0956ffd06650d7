"""The children of a bench, one engine run each (``python -m fruitdask.bench TASK ...``).

Each writes ``TASK-PREC-REPEAT.json`` in the work folder for :func:`fruitdask.bench.engine.run_child`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fruitdask.bench.summary import first_wave_rate
from fruitdask.config import KubeSettings, RunConfig, StorageSettings
from fruitdask.progress import Progress, steady_rate

if TYPE_CHECKING:
    from fruitdask.features.runtimes import InferenceRuntime
    from fruitdask.features.settings import FeatureSettings


def _load_config(work: Path, prec: str) -> tuple[RunConfig, bool]:
    d = json.loads((work / f"config-{prec}.json").read_text())
    unpooled = d.pop("unpooled_pca")
    storage = {**d.pop("storage")}
    storage["allowed_regions"] = tuple(storage["allowed_regions"])
    kube = KubeSettings(**d.pop("kube"))
    return RunConfig(**d, storage=StorageSettings(**storage), kube=kube), unpooled


def child_raw(cfg: RunConfig, work: Path, unpooled: bool, label: str) -> dict:
    """A plain single-process Keras script doing the pipelines' work: list, load weights,
    build VGG16, featurize batch by batch, standardize + PCA (scikit-learn), write Parquet.

    It uses the pipelines' own batch functions, so the features are the same; only the
    orchestration (and its cost) differs.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fruitdask import storage
    from fruitdask.features import model
    from fruitdask.features.settings import FeatureSettings
    from fruitdask.features.weights_file import WeightsArrays

    timings: dict[str, float] = {}
    t = time.perf_counter()
    listing = storage.list_images(cfg.input)
    timings["listing"] = time.perf_counter() - t
    t = time.perf_counter()
    weights, info = model.load_weights(cfg.weights, image_size=cfg.image_size, seed=cfg.seed,
                                       allow_random=cfg.allow_random_weights)
    timings["weights"] = time.perf_counter() - t
    t = time.perf_counter()
    paths, labels = list(listing["path"]), list(listing["label"])
    settings = _with_calibration(FeatureSettings.from_config(cfg, info.sha256), cfg, paths, labels)
    runtime = model.cached_runtime(WeightsArrays.of(weights, info.sha256), settings, os.cpu_count())
    timings["startup"] = time.perf_counter() - t
    maps, ends = _featurize_batches(runtime, paths, cfg, "none" if unpooled else cfg.pooling)
    timings["featurize"] = ends[-1]
    pooled = _keep_features(maps, paths, cfg, work, unpooled, label)
    t = time.perf_counter()
    reduced, n_components = _raw_pca(pooled, cfg)
    timings["pca"] = time.perf_counter() - t
    t = time.perf_counter()
    out = work / f"out-raw-{label}"
    out.mkdir(exist_ok=True)
    pq.write_table(pa.table({"path": paths, "label": labels, "features": list(pooled), "pca": list(reduced)}),
                   out / "features.parquet")
    timings["write"] = time.perf_counter() - t
    n = len(paths)
    batches = [min((i + 1) * cfg.batch_size, n) for i in range(len(ends))]  # images done at each batch's end
    steady = steady_rate(list(zip(ends, batches, strict=True)), 0)  # after the first batch
    return {
        "timings_s": {k: round(v, 3) for k, v in timings.items()} | {"first_batch": round(ends[0], 3)},
        "steady_images_per_s": round(steady, 3) if steady else None,
        "slots": 1, "threads": os.cpu_count(), "weights_sha256": info.sha256, "images": n, "k": n_components,
    }


def _with_calibration(settings: FeatureSettings, cfg: RunConfig, paths: list[str], labels: list[str]) -> FeatureSettings:
    """int8: the calibration set a first ``fruitdask run`` on these images draws (same seed)."""
    if settings.precision != "int8":
        return settings
    from fruitdask.features.calibration import sample
    from fruitdask.lake.keys import image_key

    keys = [image_key(cfg.input, p) for p in paths]
    return dataclasses.replace(settings, calibration=sample(cfg.input, keys, labels, cfg.seed).to_json())


def _featurize_batches(runtime: InferenceRuntime, paths: list[str], cfg: RunConfig, pooling: str) -> tuple[np.ndarray, list[float]]:
    """Read and featurize batch by batch; the features, and when each batch ended (s)."""
    from fruitdask import storage
    from fruitdask.features import featurize

    feats, ends = [], []
    t0 = time.perf_counter()
    for i in range(0, len(paths), cfg.batch_size):
        contents = [storage.read_bytes(p) for p in paths[i : i + cfg.batch_size]]
        res = featurize.featurize_bytes(runtime, contents, cfg.image_size, pooling, cfg.batch_size)
        feats.append(res.features)
        ends.append(time.perf_counter() - t0)
    return np.concatenate(feats), ends


def _keep_features(maps: np.ndarray, paths: list[str], cfg: RunConfig, work: Path, unpooled: bool, label: str) -> np.ndarray:
    """Save the features for the parity and precision checks (and, with ``unpooled``, the
    feature maps for the PCA timing on wide features); return the pooled features."""
    from fruitdask.features import featurize

    if unpooled:  # for the PCA timing on wide features (once, outside the timed stages)
        side = cfg.image_size // 32
        np.save(work / "unpooled.npy", maps)
        pooled = featurize.pool(maps.reshape(len(maps), side, side, 512), cfg.pooling) if cfg.pooling != "none" else maps
    else:
        pooled = maps
    np.savez(work / f"raw_features-{label}.npz", paths=np.array(paths), features=pooled)
    return pooled


def _raw_pca(pooled: np.ndarray, cfg: RunConfig) -> tuple[np.ndarray, int]:
    """Standardize + exact PCA with scikit-learn, as a plain script would: ``(reduced, K)``."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    z = StandardScaler().fit_transform(pooled.astype(np.float64))
    pca = PCA(n_components=cfg.components or (cfg.variance if cfg.variance < 1 else None), svd_solver="full")
    reduced = pca.fit_transform(z).astype(np.float32)
    return reduced, int(pca.n_components_)


#: The engines that run the pipeline as ``fruitdask run`` does (start, exit included).
PIPELINE_TASKS = ("dask", "spark")


def child_pipeline(cfg: RunConfig, work: Path, backend: str, label: str) -> dict:
    from fruitdask.backends import start_early

    cfg = dataclasses.replace(cfg, backend=backend, output=str(work / f"out-{backend}-{label}"))
    start_early(cfg)  # what `fruitdask run` does before its imports
    from fruitdask import pipeline

    ends: list[float] = []

    class PartitionEnds(Progress):  # Dask: when each featurize partition finished
        def start(self, total: int) -> None:
            self.t0 = time.perf_counter()

        def advance(self, images: int) -> None:
            ends.append(round(time.perf_counter() - self.t0, 3))

    result = pipeline.run(cfg, progress=PartitionEnds() if backend == "dask" else None)
    ends = ends or result.extra.get("featurize_task_ends_s", [])
    t, n = dict(result.timings_s), result.counts["images_listed"]
    slots = result.cluster.get("threads") or 1
    steady = first_wave_rate(ends, n, slots)
    return {
        "timings_s": t, "steady_images_per_s": round(steady, 3) if steady else None,
        "partitions": len(ends), "slots": slots, "weights_sha256": result.weights_sha256,
        "images": n, "k": result.k, "pca_method": result.pca_method,
    }


def child_pca(cfg: RunConfig, work: Path, engine: str) -> dict:
    """Time the standardize + PCA fit alone on the raw run's unpooled features."""
    from fruitdask.pca_streamed import fit_incremental_pca

    X = np.load(work / "unpooled.npy")
    n, d = X.shape
    unpooled = dataclasses.replace(cfg, pooling="none")
    if engine == "dask":
        import dask.array as da

        t = time.perf_counter()
        red = fit_incremental_pca(da.from_array(X, chunks=(min(n, 256), d)), components=cfg.components, variance=cfg.variance,
                                  batch_size=cfg.pca_batch_size, power_iterations=cfg.pca_power_iterations, seed=cfg.seed)
        return {"status": "ok", "d": d, "n": n, "fit_s": round(time.perf_counter() - t, 3), "k": red.k, "method": red.method}
    from fruitdask.backends.spark.backend import SparkBackend
    from fruitdask.backends.spark.session import spark_session
    from fruitdask.errors import ReductionError
    from fruitdask.lake.update import check_wide
    from fruitdask.pca_moments import Moments, fit, merge_all

    try:
        check_wide(d, SparkBackend.supports_wide_fit, SparkBackend.name)
    except ReductionError as e:
        return {"status": "refused", "d": d, "n": n, "reason": str(e)}
    with spark_session(unpooled) as spark:
        sc = spark.sparkContext
        chunks = sc.parallelize([X[i : i + 256] for i in range(0, n, 256)]).cache()
        chunks.count()
        t = time.perf_counter()
        moments = chunks.map(Moments.of).treeReduce(lambda a, b: merge_all([a, b]))
        red = fit(moments, components=cfg.components, variance=cfg.variance)
        return {"status": "ok", "d": d, "n": n, "fit_s": round(time.perf_counter() - t, 3), "k": red.k, "method": red.method}


def main(argv: list[str]) -> int:
    task, work = argv[0], Path(argv[1])
    prec, repeat = (argv[2], int(argv[3])) if len(argv) > 3 else ("float32", 0)
    from fruitdask.config import TF_ENV

    for key, value in TF_ENV.items():
        os.environ.setdefault(key, value)
    cfg, unpooled = _load_config(work, prec)
    if task == "raw":
        # A plain script's logging: importing the CLI would import distributed, not a raw cost.
        logging.basicConfig(level=logging.WARNING)
        result = child_raw(cfg, work, unpooled and repeat == 0, prec)
    else:
        from fruitdask.logs import setup_logging

        setup_logging(quiet=True, debug=False)
        if task in PIPELINE_TASKS:
            result = child_pipeline(cfg, work, task, prec)
        else:
            result = child_pca(cfg, work, task.removeprefix("pca-"))
    (work / f"{task}-{prec}-{repeat}.json").write_text(json.dumps(result))
    return 0
