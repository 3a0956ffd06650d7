"""Shared fixtures: real Fruits-360 images, a tiny image size, helpers to run the CLI."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext
from pathlib import Path

import pytest
from s3_server import s3, s3_server  # noqa: F401 - the moto S3 fixtures, for every test module

from fruitdask.config import TF_ENV

for _k, _v in TF_ENV.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
#: CI clones the repo beside shared/, as the sessions have it.
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE = SHARED_DATA / "fruits360-sample"
BENCH = SHARED_DATA / "fruits360-bench"
BUNDLED = REPO / "fruitdask" / "sample_data" / "Training"
SMALL_SIZE = 32  # the real VGG16 graph, at the smallest input it accepts


def read_features(output, storage_options: dict | None = None, *, arrow: bool = True, version: int | None = None):
    """The current rows of an output's features table (Delta), sorted by path: Arrow-backed
    columns (``arrow``) or plain pandas (list columns as numpy arrays)."""

    from fruitdask.output import CommittedRun

    if arrow:
        df = CommittedRun(str(output), {}, storage_options).features(version=version)
    else:  # as pandas.read_parquet gives them: numpy arrays per row
        from fruitdask.lake import table as delta

        df = delta.load(str(output), storage_options, version).to_pyarrow_dataset().to_table().to_pandas()
    return df.sort_values("path").reset_index(drop=True)


def copy_images(src: Path, dest: Path, labels: int, per_label: int) -> Path:
    """Copy ``per_label`` images of the first ``labels`` labels of ``src`` into ``dest``."""
    for label_dir in sorted(p for p in src.iterdir() if p.is_dir())[:labels]:
        target = dest / label_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted(label_dir.iterdir())[:per_label]:
            shutil.copy2(f, target / f.name)
    return dest


def after_a_killed_run(ttl_s: float) -> None:
    """Before running a SIGKILLed run again: nothing to wait where this host can tell the
    dead holder of the output lock (boot, pid namespace and pid start time known), since the
    next run then takes the lock over at once, whether or not its lease ran out
    (``fruitdask.storage.lease.gone``; test_lease's
    ``test_a_run_killed_with_sigkill_leaves_a_lock_the_next_run_takes_over_at_once``);
    elsewhere, the lease's TTL and a second, for it to run out."""
    from fruitdask.storage import lease

    doc = lease.document("probe", ttl_s)
    if None in (doc["boot_id"], doc["pid_ns"], doc["pid_start"]):
        time.sleep(ttl_s + 1)


@pytest.fixture(scope="session")
def bundled_sample() -> Path:
    """The 120 real images shipped in the package (12 labels x 10)."""
    return BUNDLED


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """3 labels x 4 real images: the smallest input that still exercises everything."""
    return copy_images(BUNDLED, tmp_path_factory.mktemp("tiny") / "Training", 3, 4)


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """Seeded random VGG16 (no top) weights saved the way users save real ones."""
    from fruitdask.features.runtimes.tensorflow import build_vgg16, import_keras

    path = tmp_path_factory.mktemp("weights") / "vgg16_notop.weights.h5"
    keras = import_keras()
    keras.utils.set_random_seed(1234)
    build_vgg16(SMALL_SIZE).save_weights(str(path))
    return path


def _cluster_factory() -> Iterator[Callable]:
    """Body of the ``local_cluster`` fixtures: a factory, and teardown of all it started."""
    import dask
    from distributed import Client

    from fruitdask.backends.dask.cluster import start_local_cluster

    with ExitStack() as stack:

        def start(n_workers: int = 1, threads_per_worker: int = 1, *, processes: bool = True, amm: bool = True,
                  client: bool = True, set_as_default: bool = True, **kwargs):
            """Start a LocalCluster (``kwargs`` go to it: ``memory_limit``, ``env``, ``lifetime``...).

            ``amm=False`` starts the scheduler without the Active Memory Manager; otherwise
            Dask's configuration decides (its default has it on). Returns ``(cluster, client)``; ``client`` is ``None`` when the
            test reaches the cluster only by address.
            """
            no_amm = {"distributed.scheduler.active-memory-manager.start": False}
            with dask.config.set(no_amm) if not amm else nullcontext():
                cluster = start_local_cluster(n_workers, threads_per_worker, processes=processes, **kwargs)
            stack.callback(cluster.close)
            if not client:
                return cluster, None
            c = Client(cluster, set_as_default=set_as_default)
            stack.callback(c.close)  # closed before its cluster: callbacks run last in, first out
            return cluster, c

        yield start


@pytest.fixture
def local_cluster() -> Iterator[Callable]:
    """Factory of LocalClusters (and clients) closed at the end of the test."""
    yield from _cluster_factory()


@pytest.fixture(scope="module")
def module_local_cluster() -> Iterator[Callable]:
    """The same factory, for module fixtures: its clusters are closed after the module."""
    yield from _cluster_factory()


@pytest.fixture(scope="session")
def serve_model(tmp_path_factory, weights_file) -> dict:
    """`run` on the bundled sample (12 labels x 10) at 32 px, then `train` against 2 Test photos per label.

    One per session: test_serve and test_app_page serve it; nothing writes to it."""
    from fruitdask.cli import main

    root = tmp_path_factory.mktemp("serve")
    test_dir = copy_images(SAMPLE / "Test", root / "Test", 12, 2)
    rc = main(["run", "--input", str(BUNDLED), "--output", str(root / "run"), "--image-size", str(SMALL_SIZE),
               "--weights", str(weights_file), "--workers", "1", "--threads-per-worker", "2", "--precision", "float32", "--quiet"])
    assert rc == 0
    rc = main(["train", "--features", str(root / "run"), "--test-input", str(test_dir), "--model-out", str(root / "model"), "--quiet"])
    assert rc == 0
    photos = sorted(p for p in test_dir.rglob("*.jpg"))
    assert len(photos) == 24
    return {"model": root / "model", "photos": photos, "root": root}
