"""The one lock: uv.lock is current, its exports are current, the tests run its versions,
and the GPU image's export resolves (its CUDA wheels are several GB: resolved, not built)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements"


def pins(path: Path) -> dict[str, str]:
    """``{name: version}`` of the lines of an export whose marker holds on this interpreter."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;\\]+)\s*(?:;\s*([^\\]+))?", line)
        if m and (not m.group(4) or Marker(m.group(4).strip()).evaluate()):
            out[canonicalize_name(m.group(1))] = m.group(3)
    return out


def test_lock_and_exports_are_current() -> None:
    done = subprocess.run([sys.executable, str(REPO / "tools" / "lock.py"), "--check"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def test_stale_export_is_detected(tmp_path: Path, monkeypatch) -> None:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import lock
    finally:
        sys.path.remove(str(REPO / "tools"))
    fake = tmp_path / "requirements"
    fake.mkdir()
    for name in lock.EXPORTS:
        (fake / name).write_text((REQUIREMENTS / name).read_text())
    (fake / "cpu.txt").write_text((fake / "cpu.txt").read_text().replace("numpy==", "numpy==0.0.1 ; python_version < '2'\nnumpy-was=="))
    monkeypatch.setattr(lock, "REPO", tmp_path)
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (tmp_path / "uv.lock").write_text((REPO / "uv.lock").read_text())
    problems = lock.check()
    assert problems == ["requirements/cpu.txt is not the export of uv.lock: run `make lock`"]


def test_the_tests_run_the_locked_versions() -> None:
    locked = pins(REQUIREMENTS / "dev.txt")
    assert {"tensorflow-cpu", "dask", "distributed", "dask-ml", "numpy", "pandas", "pyarrow", "keras"} <= set(locked)
    wrong = {}
    for name, version in locked.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"installed versions differ from the lock (run `make install-test`): {wrong}"


def test_cpu_image_set_is_the_tested_set() -> None:
    """Every package of the CPU image is pinned to the version the tests run."""
    cpu, dev = pins(REQUIREMENTS / "cpu.txt"), pins(REQUIREMENTS / "dev.txt")
    assert "tensorflow-cpu" in cpu and "pyspark" not in cpu and "pytest" not in cpu
    assert {n: v for n, v in cpu.items() if dev.get(n) != v} == {}


@pytest.mark.slow
def test_gpu_export_resolves(tmp_path: Path) -> None:
    """pip's resolver, independent of uv's, accepts the GPU image's export as a whole."""
    report = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--require-hashes",
        "--quiet", "--report", str(report), "-r", str(REQUIREMENTS / "gpu.txt"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    names = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    gpu = pins(REQUIREMENTS / "gpu.txt")
    assert names["tensorflow"] == gpu["tensorflow"]
    assert any(n.startswith("nvidia-cudnn") for n in names)  # the CUDA wheels of tensorflow[and-cuda]
    assert "tensorflow-cpu" not in names
