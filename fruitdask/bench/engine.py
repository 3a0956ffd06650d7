"""The parent of a bench: pick and copy the images, run each engine in a child, sample it."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fruitdask.bench.machine import MemorySampler, sample_load, variant
from fruitdask.config import RunConfig

logger = logging.getLogger(__name__)

#: The checkout this package lives in: the children run there, so they import the same code.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent
#: ``../shared/data/fruits360-bench`` beside the repository, as CI and the sessions have it.
BENCH_IMAGES = PACKAGE_ROOT.parent / "shared" / "data" / "fruits360-bench"
ENGINES = ("raw", "dask", "spark")


def pick(n_total: int, n: int, how: str) -> list[int]:
    """Indices of ``n`` images out of ``n_total``: the first ``n``, or evenly spaced."""
    n = min(n, n_total)
    if how == "first":
        return list(range(n))
    return [int((i + 0.5) * n_total / n) for i in range(n)]


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


def copy_images(input_url: str, cfg: RunConfig, work: Path, n: int, how: str) -> int:
    """Copy ``n`` images of ``input_url`` into ``work/images/<label>/``, so that every engine
    reads the same local files; return how many were copied.

    Nothing is read before the input and the weights pass the region guard.
    """
    from fruitdask import storage

    storage.guard_regions([input_url, cfg.weights], cfg.storage)
    listing = storage.list_images(input_url, storage.storage_options(cfg.storage))
    chosen = listing.iloc[pick(len(listing), n, how)]
    for path, label in zip(chosen["path"], chosen["label"], strict=True):
        dest = work / "images" / label / path.rsplit("/", 1)[-1]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(storage.read_bytes(path, storage.storage_options(cfg.storage)))
    return len(chosen)


def write_configs(work: Path, cfg: RunConfig, precisions: list[str], unpooled_pca: bool) -> None:
    """``work/config-PREC.json``: the run configuration each child reads back."""
    for prec in precisions:
        # The unpooled maps for the PCA timing are saved once, by the first raw run.
        unpooled = unpooled_pca and prec == precisions[0]
        runtime, precision = variant(prec)
        (work / f"config-{prec}.json").write_text(
            json.dumps({**dataclasses.replace(cfg, precision=precision, runtime=runtime).to_dict(), "unpooled_pca": unpooled}))


def run_engines(work: Path, engines: list[str], precisions: list[str], repeats: int, n_images: int,
                image_size: int) -> dict[str, dict[str, list[dict]]]:
    """Every engine ``repeats`` times at every precision, each run in a child; the results
    per precision and engine, each with the machine's load sampled just before it."""
    runs: dict[str, dict[str, list[dict]]] = {p: {e: [] for e in engines} for p in precisions}
    # Interleaved (repeat > precision > engine) so a drift in machine load hits every cell alike.
    for repeat in range(repeats):
        for prec in precisions:
            for engine in engines:
                load = sample_load()
                if not load["quiet"]:
                    logger.warning("CPU %.0f%% busy before %s (%s): other work is running, this run is not trustworthy",
                                   load["cpu_busy_pct"], engine, prec)
                logger.info("bench: %s %s, run %d/%d, %d images at %dpx ...", engine, prec, repeat + 1, repeats,
                            n_images, image_size)
                result = run_child(engine, work, prec=prec, repeat=repeat)
                result["load_before"] = load
                runs[prec][engine].append(result)
    return runs


def run_unpooled_pca(work: Path, engines: list[str], prec: str, timeout: float) -> dict[str, Any]:
    """The PCA alone on the raw run's unpooled feature maps, for the Dask and Spark engines."""
    pca: dict[str, Any] = {}
    if (work / "unpooled.npy").exists():
        for engine in ("dask", "spark"):
            if engine in engines:
                logger.info("bench: %s PCA on unpooled features ...", engine)
                pca[engine] = run_child(f"pca-{engine}", work, prec=prec, timeout=timeout)
    return pca
