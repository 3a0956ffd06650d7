"""A Docker engine for the container tests, and the fruitdask image built in it.

The engine: the one ``docker`` already reaches (``DOCKER_HOST`` or the default socket), or
else a private ``dockerd`` this module starts as root, with no bridge and no iptables
(containers run with ``--network host``, so nothing but loopback is ever used), its data
root kept across runs (``FRUITDASK_DOCKER_ROOT``, default ``/var/lib/fruitdask-docker``)
so the base image and the image layers are built once per machine; it is stopped by its
pid at the end of the session.

The image: ``tools/base-image.sh`` (Debian bookworm's python3 by debootstrap, since no
registry is reachable) and ``tools/build_image.py`` (the repository's Dockerfile, the
machine's pip settings served on loopback), exactly what ``make image BASE=...`` runs.

Whatever cannot be had raises :class:`EngineUnavailable` with the reason: the tests fail
with it, they are never skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = "fruitdask-base:bookworm"
IMAGE_REPOSITORY = "fruitdask"
IMAGE_TAG = "test"
#: label on every container a test starts, so a crashed session's leftovers can be found.
LABEL = "io.fruitdask.test"


class EngineUnavailable(RuntimeError):
    """No Docker engine could be reached or started here (the message says why)."""


@dataclass
class Engine:
    """A reachable Docker engine: the client binary and the environment that reaches it."""

    client: str
    env: dict[str, str]
    #: pid of the dockerd this session started (None when it was already running).
    started_pid: int | None = None
    log: Path | None = None
    containers: list[str] = field(default_factory=list)

    def run(self, *args: str, check: bool = True, timeout: float = 600, input: bytes | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run([self.client, *args], env=self.env, capture_output=True, timeout=timeout, input=input)
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args[:3])} ... failed ({done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}")
        return done

    def ok(self) -> bool:
        try:
            return self.run("info", "--format", "{{.ServerVersion}}", check=False, timeout=20).returncode == 0
        except subprocess.TimeoutExpired:
            return False


def _client() -> str:
    found = shutil.which("docker")
    if not found:
        raise EngineUnavailable("the docker client is not installed: run `make system-deps` (Debian's docker.io, as root)")
    return found


def start_engine() -> Engine:
    """Reach a running engine, or start a private dockerd (root only)."""
    client = _client()
    existing = Engine(client, dict(os.environ))
    if existing.ok():
        return existing
    root = Path(os.environ.get("FRUITDASK_DOCKER_ROOT", "/var/lib/fruitdask-docker"))
    run_dir = Path("/run/fruitdask-docker")
    sock = f"unix://{run_dir}/docker.sock"
    ours = Engine(client, {**os.environ, "DOCKER_HOST": sock})
    if ours.ok():  # left running by an earlier session: use it, leave it running
        return ours
    dockerd = shutil.which("dockerd")
    if not dockerd:
        raise EngineUnavailable("dockerd is not installed: run `make system-deps` (Debian's docker.io, as root)")
    if os.geteuid() != 0:
        raise EngineUnavailable("no Docker engine is reachable and starting dockerd needs root")
    root.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = root / "dockerd.log"
    cmd = [
        dockerd,
        # No bridge, no NAT, no firewall rules: every container uses the host's network
        # (loopback only in the tests), so dockerd never creates an interface.
        "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
        "--data-root", str(root), "--exec-root", str(run_dir / "exec"),
        "--pidfile", str(run_dir / "dockerd.pid"), "-H", sock,
    ]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    ours.started_pid, ours.log = proc.pid, log
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineUnavailable(f"dockerd exited with {proc.returncode}: {_tail(log)}")
        if ours.ok():
            return ours
        time.sleep(0.5)
    stop_engine(ours)
    raise EngineUnavailable(f"dockerd did not answer within 60 s: {_tail(log)}")


def stop_engine(engine: Engine) -> None:
    """Remove the containers the tests started; stop dockerd if this session started it."""
    for cid in engine.containers:
        engine.run("rm", "--force", cid, check=False, timeout=60)
    engine.containers.clear()
    pid = engine.started_pid
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def build_image(engine: Engine) -> str:
    """Build (or reuse the cached layers of) the CPU image; return its reference."""
    env = engine.env
    if engine.run("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        if not shutil.which("debootstrap"):
            raise EngineUnavailable("debootstrap is not installed: run `make system-deps` (Debian's debootstrap, as root)")
        base = subprocess.run(["bash", str(REPO / "tools" / "base-image.sh"), BASE_IMAGE], env=env, capture_output=True, text=True)
        if base.returncode != 0:
            raise EngineUnavailable(f"could not make the base image from Debian packages: {base.stderr[-2000:]}")
    ref = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
    cmd = [sys.executable, str(REPO / "tools" / "build_image.py"), "--base-image", BASE_IMAGE, "--tag", ref, "--docker", engine.client]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"docker build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return ref


def engine_session() -> Iterator[Engine]:
    """Generator for a session fixture: the engine, stopped (if started) at the end."""
    engine = start_engine()
    try:
        yield engine
    finally:
        stop_engine(engine)
