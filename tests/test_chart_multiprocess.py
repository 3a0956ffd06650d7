"""The chart's processes on one machine: ``dask scheduler`` and two ``dask worker`` started
with the command lines and environment the rendered chart gives the pods (only addresses,
ports and paths swapped for local ones), then the helm test script and
``python -m fruitdask run --cluster tcp://127.0.0.1:PORT`` against them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import read_features
from k8s_validation import REPO, render

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
]

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "fruits360-sample" / "Training"
WORKER_RESOURCES = {"cpu": "1", "memory": "2Gi"}
DASK = str(Path(sys.executable).with_name("dask"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _container(objects: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    spec = obj["spec"] if kind == "Pod" else obj["spec"]["template"]["spec"]
    return spec["containers"][0]


def _env(container: dict[str, Any], tmp: Path) -> dict[str, str]:
    """The container's environment on this machine: its HOME/TMPDIR become local dirs."""
    env = dict(os.environ)
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
    for name, local in (("HOME", tmp / "home"), ("TMPDIR", tmp / "tmp")):
        local.mkdir(exist_ok=True)
        env[name] = str(local)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _swap(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2 :]]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[subprocess.Popen]]:
    """Every process a test starts; all are terminated and reaped afterwards."""
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                p.terminate()
        for p in started:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def _start(processes: list[subprocess.Popen], cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("wb")
    p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    out.close()
    processes.append(p)
    return p


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())


def test_chart_processes_run_the_pipeline(tmp_path: Path, processes: list[subprocess.Popen]) -> None:
    assert SAMPLE.is_dir(), f"sample images missing at {SAMPLE}: clone the repo beside shared/"
    data = tmp_path / "input"
    for label in sorted(p for p in SAMPLE.iterdir() if p.is_dir())[:2]:
        (data / label.name).mkdir(parents=True)
        for image in sorted(label.glob("*.jpg"))[:3]:
            shutil.copy(image, data / label.name / image.name)

    # Plain TCP on loopback (TLS is the chart's default: tests/test_tls_hook.py runs it for real).
    objects = render({"worker": {"resources": {"requests": WORKER_RESOURCES, "limits": WORKER_RESOURCES}},
                      "tls": {"enabled": False}})
    scheduler_c = _container(objects, "Deployment", "-scheduler")
    worker_c = _container(objects, "Deployment", "-worker")
    test_c = _container(objects, "Pod", "-test-connection")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs: list[Path] = []

    # Scheduler: the chart's command line, bound to loopback and free ports.
    assert scheduler_c["command"] == ["dask", "scheduler"]
    args = _swap(scheduler_c["args"], "--host", "127.0.0.1")
    args = _swap(args, "--port", str(port))
    args = _swap(args, "--dashboard-address", "127.0.0.1:0")
    env = _env(scheduler_c, tmp_path)
    assert "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START" not in env  # Dask's default
    logs.append(tmp_path / "scheduler.log")
    _start(processes, [DASK, "scheduler", *args], env, logs[-1])

    # Two workers: the chart's command line (sizing derived from the resources above).
    assert worker_c["command"] == ["dask", "worker"]
    base = worker_c["args"]
    assert base[0] == "tcp://fruits-fruitdask-scheduler:8786"
    assert base[base.index("--nthreads") + 1] == "1"
    assert base[base.index("--memory-limit") + 1] == str(int(2 * 2**30 * 0.9))
    for i in range(2):
        scratch = tmp_path / f"scratch-{i}"
        scratch.mkdir()
        args = [address, *base[1:]]
        args = _swap(args, "--name", f"worker-{i}")
        args = _swap(args, "--local-directory", str(scratch))
        args = _swap(args, "--worker-port", str(free_port()))
        args = _swap(args, "--nanny-port", str(free_port()))
        args = _swap(args, "--dashboard-address", "127.0.0.1:0")
        logs.append(tmp_path / f"worker-{i}.log")
        _start(processes, [DASK, "worker", *args, "--host", "127.0.0.1"], _env(worker_c, tmp_path), logs[-1])

    # The chart's helm test script, run as is: both workers must join.
    script, _, expected, _ = test_c["args"]
    assert expected == "2"
    check = subprocess.run(
        [sys.executable, "-c", script, address, expected, "180"],
        env=_env(test_c, tmp_path), capture_output=True, text=True, timeout=240,
    )
    assert check.returncode == 0, check.stdout + check.stderr + _tails(logs)
    assert "2 workers connected" in check.stdout

    # The driver, as the in-cluster Job runs it, pointed at this scheduler.
    output = tmp_path / "output"
    run = subprocess.run(
        [sys.executable, "-m", "fruitdask", "run", "--cluster", address, "--input", str(data),
         "--output", str(output), "--image-size", "32", "--weights", "random", "--quiet"],
        env=_env(scheduler_c, tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr + _tails(logs)
    for p in processes:  # nobody crashed along the way
        assert p.poll() is None, f"a chart process exited early (code {p.returncode}):\n{_tails(logs)}"


    features = read_features(output, arrow=False)
    assert len(features) == 6
