"""The project's one lock: ``uv.lock``, solved from pyproject.toml, and its exports.

    python tools/lock.py --update   # re-solve uv.lock, rewrite requirements/*.txt (make lock)
    python tools/lock.py --check    # exit 1 with a message if either is stale (a test runs it)

``requirements/cpu.txt`` (the CPU image and ``make run``), ``gpu.txt`` (the GPU image) and
``dev.txt`` (``make test``) are ``uv export`` views of the same lock, with hashes, so the
image ships exactly the versions the tests ran.

``--check`` never reaches a package index (``uv lock --check --offline``, ``uv export
--frozen``): its verdict is the lock's own, whatever the index has published since.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: export file -> the extras it installs.
EXPORTS = {
    "cpu.txt": ["cpu", "kubernetes", "serve"],
    "gpu.txt": ["gpu", "kubernetes", "serve"],
    "dev.txt": ["dev"],
}


def uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if not found:
        raise SystemExit("uv is not installed: make install-test (it is in the dev extra)")
    return found


def _env() -> dict[str, str]:
    # The system trust store, so uv works behind TLS-inspecting proxies as pip does.
    return {**os.environ, "UV_SYSTEM_CERTS": "1"}


def export(extras: list[str]) -> str:
    cmd = [uv(), "export", "--frozen", "--no-emit-project", "--format", "requirements-txt", "--quiet"]
    for extra in extras:
        cmd += ["--extra", extra]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, check=True).stdout


def _body(text: str) -> str:
    # uv's header names the command line; compare what is pinned.
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def check() -> list[str]:
    """What is stale, as messages (empty when the lock and its exports are current)."""
    problems = []
    # Offline: a current lock is validated from its own file, so no release published since
    # can change the verdict; a stale one needs a new solve, which offline fails (uv names
    # packages "not found in the cache") or gives another lock: the check fails either way.
    cmd = [uv(), "lock", "--check", "--offline", "--quiet"]
    locked = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    if locked.returncode != 0:
        problems.append(f"uv.lock does not match pyproject.toml (checked offline): run `make lock`\n{locked.stderr.strip()}")
        return problems
    for name, extras in EXPORTS.items():
        path = REPO / "requirements" / name
        if not path.exists() or _body(path.read_text()) != _body(export(extras)):
            problems.append(f"requirements/{name} is not the export of uv.lock: run `make lock`")
    return problems


def update() -> None:
    subprocess.run([uv(), "lock", "--quiet"], cwd=REPO, env=_env(), check=True)
    (REPO / "requirements").mkdir(exist_ok=True)
    for name, extras in EXPORTS.items():
        (REPO / "requirements" / name).write_text(export(extras))
        print(f"requirements/{name}: extras {', '.join(extras)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lock.py", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--update", action="store_true", help="re-solve uv.lock and rewrite the exports")
    mode.add_argument("--check", action="store_true", help="fail if uv.lock or an export is stale")
    args = parser.parse_args(argv)
    if args.update:
        update()
        return 0
    problems = check()
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
