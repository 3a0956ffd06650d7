"""The one lock: uv.lock is current, its exports are current, pinned, hashed and agree with it,
the tests run its versions, and each export installs as the images and the Makefile install it.

None of these tests reaches a package index, so none changes its verdict when the index
publishes a release after the lock was made (issue #30: dask 2026.11.0 turned the suite red).
What reached an index before, and what does now:

* ``test_gpu_export_resolves`` ran pip's resolver over ``requirements/gpu.txt`` against the
  live index, with dependencies: replaced by the tests below on a local index made from
  ``uv.lock`` alone (:mod:`local_index`: empty wheels with the locked names, versions and
  dependencies, in ``tmp_path``), with a newer release of every locked package planted.
* ``tools/lock.py --check`` (``test_lock_and_exports_are_current``, and ``lock.check()`` in
  the stale-lock tests): ``uv lock --check`` validates a current lock from its own file, and
  now runs with ``--offline``, so it cannot consult the index even for a stale lock;
  ``uv export --frozen`` never resolves. The tests run it with no uv cache and every proxy
  on a closed port (and without ``UV_OFFLINE``: the tool keeps uv offline by itself).
* ``tests/test_containers.py`` builds the CPU image (``tools/build_image.py``, the
  Dockerfile): ``pip install --no-deps --require-hashes -r requirements/cpu.txt`` downloads
  the locked files, so it needs the index (or the build machine's pip settings) to be
  reachable, but a newer release cannot change what it installs: every line is pinned with
  ``==`` and its hashes, and ``--no-deps`` runs no resolver, so no dependency is ever chosen
  by pip; ``pip check`` then reads installed metadata only.
  ``test_export_installs_as_the_images_do`` checks that very path offline. The base image
  (``tools/base-image.sh``) comes from a Debian mirror by debootstrap, not a Python index.
* The other tests here read files and installed metadata only.

Why the install path, not the resolver, is the check: pip before 23.3, in hash-checking
mode, resolves dask-glm's unversioned ``dask[array]`` to the newest dask on the index and
refuses the export ("all requirements must have their versions pinned with ==") although
``dask==<locked>`` is in it; pip 23.3 and later tie the extra to the pinned dask.
``test_resolver_with_a_newer_release_on_the_index`` reproduces exactly that, offline.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from local_index import NEWER, REQUIREMENT, LocalIndex, build_index, locked_hashes, pip, rehash
from packaging.markers import Marker
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements"
EXPORTS = ["cpu.txt", "gpu.txt", "dev.txt"]
#: pip releases before this one refuse a hashed export once the index has a newer release
#: of a package that another one requires with an extra (``dask[array]``).
PIP_TIES_EXTRAS_TO_PINS = Version("23.3")
#: a port nothing listens on: any request for the network fails at once.
UNREACHABLE = "http://127.0.0.1:9"


def pins(path: Path) -> dict[str, str]:
    """``{name: version}`` of the lines of an export whose marker holds on this interpreter."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;\\]+)\s*(?:;\s*([^\\]+))?", line)
        if m and (not m.group(4) or Marker(m.group(4).strip()).evaluate()):
            out[canonicalize_name(m.group(1))] = m.group(3)
    return out


def lock_tool():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import lock
    finally:
        sys.path.remove(str(REPO / "tools"))
    return lock


def offline_env() -> dict[str, str]:
    """The environment with no uv cache and every proxy on a closed port: no package can come
    from anywhere but the lock's own file. ``UV_OFFLINE`` is *not* set: ``tools/lock.py``
    must keep uv offline by itself."""
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper() and k != "UV_OFFLINE"}
    env.update(UV_NO_CACHE="1", HTTP_PROXY=UNREACHABLE, HTTPS_PROXY=UNREACHABLE, ALL_PROXY=UNREACHABLE, NO_PROXY="")
    env.update(http_proxy=UNREACHABLE, https_proxy=UNREACHABLE, all_proxy=UNREACHABLE, no_proxy="")
    return env


def test_the_test_sees_every_export() -> None:
    assert sorted(lock_tool().EXPORTS) == sorted(EXPORTS)


def test_lock_and_exports_are_current(tmp_path: Path) -> None:
    """``tools/lock.py --check`` as typed, from another folder, with no network and no uv cache."""
    cmd = [sys.executable, str(REPO / "tools" / "lock.py"), "--check"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=offline_env())
    assert done.returncode == 0, done.stderr


def _copy_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    lock = lock_tool()
    (tmp_path / "requirements").mkdir()
    for name in lock.EXPORTS:
        (tmp_path / "requirements" / name).write_text((REQUIREMENTS / name).read_text())
    monkeypatch.setattr(lock, "REPO", tmp_path)
    for name in ("pyproject.toml", "uv.lock"):
        (tmp_path / name).write_text((REPO / name).read_text())
    for k in list(os.environ):
        if "PROXY" in k.upper() or k == "UV_OFFLINE":
            monkeypatch.delenv(k)
    for k, v in offline_env().items():
        monkeypatch.setenv(k, v)
    return lock


def test_stale_export_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = _copy_project(tmp_path, monkeypatch)
    cpu = tmp_path / "requirements" / "cpu.txt"
    cpu.write_text(cpu.read_text().replace("numpy==", "numpy==0.0.1 ; python_version < '2'\nnumpy-was=="))
    assert lock.check() == ["requirements/cpu.txt is not the export of uv.lock: run `make lock`"]


def test_stale_lock_is_detected_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dependency added to pyproject.toml and not locked: the check says so, offline.

    The negative control of ``uv lock --check --offline``: a stale lock still fails although
    uv cannot re-solve it, and fails *because* it is offline (uv's hint), not after trying
    the index. Before ``--offline`` (main) uv tried the closed proxy and failed with
    "Failed to fetch", so this test failed there."""
    lock = _copy_project(tmp_path, monkeypatch)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pytest>=8,<10",', '"pytest>=8,<10",\n    "tomli-w>=1",'))
    problems = lock.check()
    assert len(problems) == 1, problems
    assert problems[0].startswith("uv.lock does not match pyproject.toml (checked offline): run `make lock`\n")
    assert "the network was disabled" in problems[0], problems[0]


def test_the_tests_run_the_locked_versions() -> None:
    locked = pins(REQUIREMENTS / "dev.txt")
    assert {"tensorflow-cpu", "dask", "distributed", "dask-ml", "numpy", "pandas", "pyarrow", "keras", "mypy"} <= set(locked)
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


def entries(export: str) -> list[tuple[str, list[str]]]:
    """``(requirement line, its --hash values)`` of each entry of an export's text."""
    out: list[tuple[str, list[str]]] = []
    for line in export.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.lstrip().startswith("--hash="):
            out[-1][1].append(line.split("sha256:", 1)[1].rstrip(" \\"))
        else:
            out.append((line, []))
    return out


@pytest.mark.parametrize("export", EXPORTS)
def test_every_export_line_is_pinned_hashed_and_locked(export: str) -> None:
    """Each entry is ``name==version`` with hashes, and each is a package and files of uv.lock."""
    files = locked_hashes(REPO / "uv.lock")
    found = entries((REQUIREMENTS / export).read_text())
    assert len(found) > 100
    for line, hashes in found:
        m = REQUIREMENT.match(line)
        assert m, f"not pinned with ==: {line}"
        key = (canonicalize_name(m.group(1)), m.group(3))
        assert key in files, f"{line}: not a package of uv.lock"
        assert hashes and set(hashes) <= files[key], f"{line}: hashes missing or not uv.lock's"


# --- the exports on a local index made from uv.lock ---------------------------------------


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> LocalIndex:
    """Empty wheels of every locked package, as uv.lock describes them (nothing newer).

    One per module: the tests only read it (their hashed exports go to their own folder)."""
    return build_index(tmp_path_factory.mktemp("lock-index") / "index", REPO / "uv.lock")


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> LocalIndex:
    """Another such index, which has since published release 2099.1.0 of every locked package
    (its own folder: ``index`` stays without the newer releases)."""
    planted = build_index(tmp_path_factory.mktemp("lock-planted") / "index", REPO / "uv.lock")
    assert {"dask", "distributed", "numpy", "tensorflow"} <= set(planted.plant_newer())
    return planted


def hashed_copy(index: LocalIndex, export: str, folder: Path, edit=lambda text: text) -> Path:
    """A copy of an export whose hashes are those of the index's wheels (``edit`` applied)."""
    copy = folder / export
    copy.write_text(edit(rehash((REQUIREMENTS / export).read_text(), index.shas)))
    return copy


def install_as_the_images_do(
    index: LocalIndex, requirements: Path, folder: Path
) -> tuple[subprocess.CompletedProcess, str, dict]:
    """The Dockerfile's and the Makefile's install into a new venv: ``pip install --no-deps
    --require-hashes -r EXPORT``, then ``pip check``. Returns the install, the check's output
    (empty when the install failed) and ``{name: version}`` of what is installed."""
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = pip(
        "--python", python, "install", "--no-deps", "--require-hashes", "--index-url", index.url, "-q", "-r", str(requirements)
    )
    if install.returncode != 0:
        return install, "", {}
    check = pip("--python", python, "check")
    (site,) = venv.glob("lib/python3*/site-packages")
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=[str(site)])}
    return install, check.stdout + check.stderr, installed


def test_pip_would_take_the_planted_releases(planted: LocalIndex) -> None:
    """The planted index is a real trap: asked for dask with no pin, pip takes 2099.1.0."""
    done = pip(
        "install", "--dry-run", "--ignore-installed", "--no-deps", "--index-url", planted.url, "--report", "-", "-q", "dask"
    )
    assert done.returncode == 0, done.stderr
    (item,) = json.loads(done.stdout)["install"]
    assert item["metadata"]["version"] == NEWER


@pytest.mark.slow
@pytest.mark.parametrize(
    ("export", "expected"), [("cpu.txt", "tensorflow-cpu"), ("gpu.txt", "nvidia-cudnn-cu12"), ("dev.txt", "pytest")]
)
def test_export_installs_as_the_images_do(planted: LocalIndex, export: str, expected: str, tmp_path: Path) -> None:
    """With a newer release of every locked package on the index, the images' install path
    installs exactly the export's pins and ``pip check`` passes: no release published after
    the lock can change this verdict, since ``--no-deps`` resolves nothing and every line is
    pinned and hashed. (On main this path was never tested; the resolver test it replaces
    failed as soon as dask 2026.11.0 was out.)"""
    install, check, installed = install_as_the_images_do(planted, hashed_copy(planted, export, tmp_path), tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    assert "No broken requirements found." in check, check
    assert installed == pins(REQUIREMENTS / export)
    assert expected in installed and NEWER not in installed.values()
    if export == "gpu.txt":  # CUDA TensorFlow, never the CPU build beside it
        assert "tensorflow" in installed and "tensorflow-cpu" not in installed


def _drop(name: str):
    def edit(text: str) -> str:
        out, dropping = [], False
        for line in text.splitlines():
            m = REQUIREMENT.match(line)
            dropping = canonicalize_name(m.group(1)) == name if m else dropping and line.startswith(" ")
            if not dropping:
                out.append(line)
        assert len(out) < len(text.splitlines()), f"{name} is not in the export"
        return "\n".join(out) + "\n"

    return edit


def _bump(name: str, locked: str):
    def edit(text: str) -> str:
        assert f"\n{name}=={locked} " in text
        return text.replace(f"\n{name}=={locked} ", f"\n{name}=={NEWER} ")

    return edit


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["dependency removed", "version changed"])
def test_a_broken_export_fails_the_images_install(planted: LocalIndex, broken: str, tmp_path: Path) -> None:
    """Negative control: the check above fails when the export is wrong. toolz (which dask
    requires) left out: ``pip check`` says so; dask pinned to the planted release with the
    locked wheel's hash: the install refuses it."""
    dask = pins(REQUIREMENTS / "gpu.txt")["dask"]
    edit = _drop("toolz") if broken == "dependency removed" else _bump("dask", dask)
    install, check, _ = install_as_the_images_do(planted, hashed_copy(planted, "gpu.txt", tmp_path, edit), tmp_path)
    if broken == "dependency removed":
        assert install.returncode == 0, install.stderr[-3000:]
        assert f"dask {dask} requires toolz, which is not installed." in check, check
    else:
        assert install.returncode != 0 and "THESE PACKAGES DO NOT MATCH THE HASHES" in install.stderr, install.stderr[-3000:]


def resolve(index: LocalIndex, requirements: Path, report: Path) -> subprocess.CompletedProcess:
    """pip's resolver, with dependencies, over an export in hash-checking mode (a dry run)."""
    args = ["install", "--dry-run", "--ignore-installed", "--require-hashes", "--index-url", index.url, "-q"]
    return pip(*args, "--report", str(report), "-r", str(requirements))


def _resolved(report: Path) -> dict[str, str]:
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


@pytest.mark.slow
@pytest.mark.parametrize("export", EXPORTS)
def test_resolver_accepts_each_export_on_the_lock_index(index: LocalIndex, export: str, tmp_path: Path) -> None:
    """pip's resolver, independent of uv's, accepts each export as a whole, dependencies
    included, and picks exactly its pins, on an index holding the lock's releases only."""
    done = resolve(index, hashed_copy(index, export, tmp_path), tmp_path / "report.json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _resolved(tmp_path / "report.json") == pins(REQUIREMENTS / export)


@pytest.mark.slow
def test_resolver_with_a_newer_release_on_the_index(planted: LocalIndex, tmp_path: Path) -> None:
    """Issue #30 reproduced offline: with newer releases on the index, pip's resolver keeps
    the GPU export's pins from pip 23.3 on; older pips refuse it, naming ``dask[array]``
    (dask-glm's requirement). That is why the images and the Makefile install an export
    with ``--no-deps`` and ``pip check`` (tested above), which no release can disturb, and
    why a user who resolves an export with its dependencies needs pip 23.3 or later.

    Run by the pip of the test environment: the assertion for that pip holds, and a pip
    upgrade past 23.3 keeps this test green with the other branch."""
    done = resolve(planted, hashed_copy(planted, "gpu.txt", tmp_path), tmp_path / "report.json")
    if Version(metadata.version("pip")) >= PIP_TIES_EXTRAS_TO_PINS:
        assert done.returncode == 0, done.stderr[-3000:]
        assert _resolved(tmp_path / "report.json") == pins(REQUIREMENTS / "gpu.txt")
    else:
        assert done.returncode != 0
        assert "must have their versions pinned with ==" in done.stderr and "dask[array]" in done.stderr, done.stderr[-3000:]
