"""Lost and late workers on a scheduler with Dask's DEFAULT configuration (issue 16).

A plain ``dask scheduler`` (Active Memory Manager on, as on dask/helm-chart, dask-gateway or
Coiled clusters) and ``dask worker --nthreads 1`` processes started here on 127.0.0.1, each
under its nanny (which restarts a killed worker process). A worker is SIGKILLed in the middle
of featurization, of the PCA and of the write; the run must still write every image exactly
once, with the features of an undisturbed single-process run. A worker that joins after the
weights were loaded must load them itself and featurize.

To land a kill mid-stage without sleeping blindly, that stage's task bodies are stretched by
:mod:`slow_tasks` (0.4 s each, then the real body) and a thread polls the scheduler until it
sees such a task processing, then kills that worker's process (its pid from
``client.run(os.getpid)``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import slow_tasks
from conftest import BUNDLED, SMALL_SIZE, copy_images, read_features

from fruitdask import cli, pipeline, storage
from fruitdask.backends.dask import backend as dask_backend
from fruitdask.config import TF_ENV, build_config
from fruitdask.features import frames, model
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsArrays
from fruitdask.lake import tasks

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
DASK = str(Path(sys.executable).with_name("dask"))
N_IMAGES = 16  # 8 labels x 2, in 8 partitions of 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessCluster:
    """A ``dask scheduler`` and ``dask worker`` processes with the default Dask configuration."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        # No DASK_* variable from the caller's environment: the scheduler runs on defaults.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
        self.env.update(TF_ENV)
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
        port = self.address.rsplit(":", 1)[1]
        self._start("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", port,
                                  "--dashboard-address", "127.0.0.1:0", "--no-show"], self.env)

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        with (self.tmp / f"{name}.log").open("wb") as log:
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp))

    def add_worker(self, name: str, env: dict[str, str] | None = None) -> None:
        self._start(name, [DASK, "worker", self.address, "--nthreads", "1", "--name", name, "--host", "127.0.0.1",
                           "--memory-limit", "2GiB", "--no-dashboard", "--local-directory", str(self.tmp)],
                    {**self.env, **(env or {})})

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def _client(address: str):
    from distributed import Client

    deadline = time.monotonic() + 60
    while True:
        try:
            return Client(address, timeout="5s", set_as_default=False)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[ProcessCluster, object]]:
    pc = ProcessCluster(tmp_path_factory.mktemp("dask"))
    try:
        pc.add_worker("w0")
        pc.add_worker("w1")
        client = _client(pc.address)
        try:
            client.wait_for_workers(2, timeout=120)
            assert client.amm.running(), "the test scheduler must run Dask's defaults (AMM on)"
            yield pc, client
        finally:
            client.close()
    finally:
        pc.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return copy_images(BUNDLED, tmp_path_factory.mktemp("lost") / "in", 8, 2)


@pytest.fixture(scope="module")
def reference(images, weights_file) -> pd.DataFrame:
    """Features of an undisturbed, single-process run over the same images."""
    weights, info = model.load_weights(str(weights_file))
    out = frames.featurize_frame(storage.list_images(str(images)), WeightsArrays.of(weights, info.sha256),
                                 FeatureSettings(info.sha256, SMALL_SIZE, "avg", 32))
    return out.sort_values("path").reset_index(drop=True)


def _flags(images: Path, out: Path, address: str, weights_file: Path, **more) -> dict:
    return {"input": str(images), "output": str(out), "cluster": address, "image_size": SMALL_SIZE,
            "weights": str(weights_file), "partition_size": 2, "components": 4, "quiet": True, "precision": "float32", **more}


def _check_output(out: Path, reference: pd.DataFrame) -> None:
    """Every image exactly once, in one file per partition, with the reference's features."""
    from fruitdask.lake import table as delta

    parts = [u.removeprefix("file://") for u in delta.load(str(out), {}).file_uris()]
    df = read_features(out)
    df = df.sort_values("path").reset_index(drop=True)
    assert len(df) == N_IMAGES and df["path"].is_unique
    assert sum(pq.read_metadata(p).num_rows for p in parts) == N_IMAGES
    assert list(df["path"]) == list(reference["path"])
    np.testing.assert_allclose(frames.matrix(df["features"]), frames.matrix(reference["features"]), rtol=1e-5, atol=1e-5)
    assert not list(out.rglob("_fruitdask*")), "the run's internal files reached the output"
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"images_listed": N_IMAGES, "labels": 8, "rows_written": N_IMAGES, "errors": 0, "listed": N_IMAGES,
                             "added": N_IMAGES, "updated": 0, "removed": 0, "unchanged": 0, "featurized": N_IMAGES}
    assert delta.load(str(out), {}).version() == 0, "one run, one version"


Picker = Callable[[dict, dict], "str | None"]


def _killer(client, pick: Picker, killed: list, stop: threading.Event) -> threading.Thread:
    """A thread that polls the scheduler (processing and held keys per worker) every 20 ms and
    SIGKILLs the process of the first worker ``pick`` names."""
    pids = client.run(os.getpid)

    def loop():
        while not stop.is_set():
            victim = pick(client.processing(), client.has_what())
            if victim:
                os.kill(pids[victim], signal.SIGKILL)
                killed.append(victim)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def _keys(keys, name: str) -> list:
    return [k for k in keys if name in str(k)]


def _processing(name: str) -> Picker:
    def pick(processing, has_what):
        busy = [w for w, keys in processing.items() if _keys(keys, name)]
        return busy[0] if busy else None

    return pick


def _run_with_a_kill(monkeypatch, cluster, flags: dict, patch: tuple, pick: Picker) -> None:
    _, client = cluster
    client.wait_for_workers(2, timeout=120)  # the nanny restarted the last test's victim
    monkeypatch.setattr(*patch)
    stop, killed = threading.Event(), []
    thread = _killer(client, pick, killed, stop)
    try:
        pipeline.run(build_config(flags, {}))
    finally:
        stop.set()
        thread.join()
    assert killed, "no worker was killed: the stage ended before the killer saw it"


def test_worker_killed_during_featurization(tmp_path, cluster, images, weights_file, reference, monkeypatch, capsys):
    pc, client = cluster
    client.wait_for_workers(2, timeout=120)
    monkeypatch.setattr(dask_backend, "featurize_on_worker", slow_tasks.slow_featurize)

    seen: set = set()

    def pick(processing, has_what):
        # Most partitions featurized (their files written), others still running: kill a
        # worker in the middle of one, so it must be featurized again, and written once.
        running = {w: _keys(keys, "slow_featurize") for w, keys in processing.items()}
        seen.update(k for keys in running.values() for k in keys)
        busy = [w for w, keys in running.items() if keys]
        return busy[0] if busy and len(seen) >= N_IMAGES // 2 else None

    stop, killed = threading.Event(), []
    thread = _killer(client, pick, killed, stop)
    out = tmp_path / "out"
    args = ["run", "--input", str(images), "--output", str(out), "--cluster", pc.address, "--image-size", str(SMALL_SIZE),
            "--weights", str(weights_file), "--partition-size", "1", "--components", "4", "--precision", "float32", "--quiet"]
    try:
        code = cli.main(args)
    finally:
        stop.set()
        thread.join()
    assert killed, "no worker was killed: featurization ended before the killer saw it"
    assert code == 0, capsys.readouterr().err + pc.logs()
    _check_output(out, reference)


def test_worker_killed_during_pca(tmp_path, cluster, images, weights_file, reference, monkeypatch):
    out = tmp_path / "out"
    _run_with_a_kill(monkeypatch, cluster, _flags(images, out, cluster[0].address, weights_file),
                     (tasks, "moments_part", slow_tasks.slow_moments), _processing("slow_moments"))
    _check_output(out, reference)


def test_worker_killed_during_write(tmp_path, cluster, images, weights_file, reference, monkeypatch):
    out = tmp_path / "out"
    _run_with_a_kill(monkeypatch, cluster, _flags(images, out, cluster[0].address, weights_file),
                     (tasks, "project_part", slow_tasks.slow_project), _processing("slow_project"))
    _check_output(out, reference)


def test_worker_joining_after_the_weights_loads_them(tmp_path, images, weights_file, reference, monkeypatch):
    """One worker loads the weights and featurizes, then is held back; a second worker joins,
    must read the weights file itself (nothing to copy from a peer) and featurize the rest."""
    gate = tmp_path / "gate"
    (tmp_path / "dask").mkdir()
    pc = ProcessCluster(tmp_path / "dask")
    try:
        pc.add_worker("first", {slow_tasks.GATE_ENV: str(gate)})
        client = _client(pc.address)
        try:
            client.wait_for_workers(1, timeout=120)
            monkeypatch.setattr(dask_backend, "featurize_on_worker", slow_tasks.slow_featurize)
            out = tmp_path / "out"
            flags = _flags(images, out, pc.address, weights_file, partition_size=1)
            result: dict = {}

            def run():
                try:
                    result["run"] = pipeline.run(build_config(flags, {}))
                except BaseException as e:  # noqa: BLE001 - handed to the test thread below
                    result["error"] = e

            runner = threading.Thread(target=run, daemon=True)
            runner.start()
            _wait(lambda: sum(client.run(slow_tasks.featurized).values()) >= 2, runner, pc)
            gate.touch()  # hold the first worker back from here on
            (first,) = client.scheduler_info()["workers"]
            pc.add_worker("late")
            _wait(lambda: len(client.scheduler_info()["workers"]) == 2, runner, pc)
            late = next(w for w in client.scheduler_info()["workers"] if w != first)
            _wait(lambda: client.run(slow_tasks.featurized, workers=[late]).get(late, 0) >= 2, runner, pc)
            gate.unlink()
            runner.join(timeout=300)
            assert "error" not in result, result
            key = result["run"].weights_sha256
            loads = client.run(model.load_counts)
            assert loads[first].get(key) == 1 and loads[late].get(key) == 1, loads
            assert result["run"].extra["weights_loads"] == {first: 1, late: 1}
            _check_output(out, reference)
        finally:
            client.close()
    finally:
        gate.unlink(missing_ok=True)
        pc.close()


def _wait(condition: Callable[[], bool], runner: threading.Thread, pc: ProcessCluster, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert runner.is_alive(), "the run ended before the test could set the stage up"
        assert time.monotonic() < deadline, pc.logs()
        time.sleep(0.05)
