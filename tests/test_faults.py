"""Lost workers, an unreachable scheduler, Ctrl-C and SIGTERM: no crash, nothing lost,
nothing doubled, nothing left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from conftest import BUNDLED, SMALL_SIZE, copy_images, read_features

from fruitdask import cli, pipeline
from fruitdask.backends.dask.cluster import dask_client
from fruitdask.config import TF_ENV, build_config
from fruitdask.errors import ClusterError
from fruitdask.features import frames
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsArrays

REPO = Path(__file__).resolve().parents[1]


def _features(out: Path) -> pd.DataFrame:

    df = read_features(out)
    return df.sort_values("path").reset_index(drop=True)


@pytest.fixture
def process_cluster(local_cluster):
    """A LocalCluster of 2 single-threaded worker processes that the test owns (Dask's
    default configuration: the Active Memory Manager is on)."""
    return local_cluster(2, 1, memory_limit="2GiB")


def _kill_a_busy_worker(client, stop: threading.Event, killed: list) -> None:
    """Once a worker is featurizing a partition (others done or waiting), SIGKILL it: that
    partition must be featurized again elsewhere, and no image may be written twice."""
    while not stop.is_set():
        busy = {w: [k for k in keys if "featurize" in str(k)] for w, keys in client.processing().items()}
        busy = {w: keys for w, keys in busy.items() if keys}
        if busy:
            victim = next(iter(busy))
            pid = client.run(os.getpid, workers=[victim])[victim]
            os.kill(pid, signal.SIGKILL)
            killed.append((victim, pid, len(busy[victim])))
            return
        time.sleep(0.02)


def _reference_features(listing: pd.DataFrame, weights_file: Path) -> pd.DataFrame:
    """Features of an undisturbed, single-process run over the same images."""
    from fruitdask.features import model

    weights, info = model.load_weights(str(weights_file))
    out = frames.featurize_frame(listing, WeightsArrays.of(weights, info.sha256), FeatureSettings(info.sha256, SMALL_SIZE, "avg", 32))
    return out.sort_values("path").reset_index(drop=True)


@pytest.mark.integration
@pytest.mark.slow
def test_lost_worker_during_featurization(tmp_path, process_cluster, weights_file):
    from fruitdask import storage

    cluster, client = process_cluster
    images = copy_images(BUNDLED, tmp_path / "in", 12, 2)  # 24 images, 12 partitions
    cfg = build_config({
        "input": str(images), "output": str(tmp_path / "out"), "image_size": SMALL_SIZE, "weights": str(weights_file),
        "partition_size": 2, "cluster": cluster.scheduler_address, "quiet": True, "components": 4, "precision": "float32",
    }, {})
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_busy_worker, args=(client, stop, killed), daemon=True)
    killer.start()
    try:
        result = pipeline.run(cfg)
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was killed: the run finished before the killer saw results"
    assert result.counts == {"images_listed": 24, "labels": 12, "rows_written": 24, "errors": 0, "listed": 24, "added": 24, "updated": 0, "removed": 0, "unchanged": 0, "featurized": 24}
    hit = _features(tmp_path / "out")
    ref = _reference_features(storage.list_images(str(images)), weights_file)
    assert hit["path"].is_unique and len(hit) == 24
    assert list(hit["path"]) == list(ref["path"])
    np.testing.assert_allclose(frames.matrix(hit["features"]), frames.matrix(ref["features"]), rtol=1e-5, atol=1e-5)
    # The nanny restarted the killed process, and the replacement joined the cluster.
    client.wait_for_workers(2, timeout=60)
    assert killed[0][1] not in client.run(os.getpid).values()


def test_unreachable_scheduler_fails_fast_with_a_clear_error(tmp_path, capsys):
    cfg = build_config({"input": "x", "output": "y", "cluster": "tcp://127.0.0.1:9", "cluster_timeout": 2}, {})
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=r"cannot reach the Dask scheduler at 'tcp://127.0.0.1:9' within 2s"):
        with dask_client(cfg):
            pass
    assert time.monotonic() - t0 < 15

    images = copy_images(BUNDLED, tmp_path / "in", 1, 2)
    rc = cli.main([
        "run", "--input", str(images), "--output", str(tmp_path / "out"), "--cluster", "tcp://127.0.0.1:9",
        "--cluster-timeout", "2", "--weights", "random", "--image-size", str(SMALL_SIZE), "-q",
    ])
    assert rc == ClusterError.exit_code != 0
    assert "cannot reach the Dask scheduler" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


#: ``python -m fruitdask`` with the signal dispositions of a terminal: a process started from
#: a background shell job or some CI runners inherits an *ignored* SIGINT (and Python keeps
#: it ignored), so Ctrl-C would never reach the run and the test would pass or fail by how
#: pytest was started. The child sets them itself, before fruitdask starts.
DEFAULT_SIGNALS_PYTHON = [
    sys.executable, "-c",
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "signal.signal(signal.SIGTERM, signal.SIG_DFL); sys.argv[0] = 'fruitdask'; "
    "runpy.run_module('fruitdask', run_name='__main__', alter_sys=True)",
]


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code", "whole_group"), [
    (signal.SIGINT, cli.EXIT_INTERRUPTED, True),  # Ctrl-C in a terminal reaches the whole group
    (signal.SIGTERM, cli.EXIT_TERMINATED, False),  # kill / Kubernetes signal the main process
])
def test_signal_mid_run_closes_the_cluster_and_commits_nothing(tmp_path, weights_file, sig, code, whole_group):
    images = copy_images(BUNDLED, tmp_path / "in", 12, 10)
    out = tmp_path / "out"
    env = {**os.environ, **TF_ENV, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [*DEFAULT_SIGNALS_PYTHON, "run", "--input", str(images), "--output", str(out),
         "--image-size", str(SMALL_SIZE), "--weights", str(weights_file), "--workers", "1",
         "--threads-per-worker", "1", "--partition-size", "2"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    lines: list[str] = []
    started = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("cluster:"):
                started.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert started.wait(120), "the run never reached its cluster:\n" + "".join(lines)
        time.sleep(1.0)  # into the weights broadcast / featurization
        family = _descendants(proc.pid)
        assert family, "the local cluster should have worker processes"
        assert proc.poll() is None, "the run finished before it could be interrupted"
        if whole_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        assert proc.wait(timeout=90) == code, "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=5)
    _, alive = psutil.wait_procs(family, timeout=15)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"orphan processes after {sig.name}: {[p.pid for p in alive]}"
    assert "nothing committed" in "".join(lines)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.fruitdask-tmp-*"))
