"""Build the fruitdask image: ``python tools/build_image.py [--variant cpu|gpu] [--tag T]``.

What ``make image`` runs. It is ``docker build --network host`` of the repository's
Dockerfile with this machine's pip settings served on loopback for the build (see
``tools/pip_settings.py``: nothing of them is left in the image), the base image as a build
argument (``--base-image``; the default is the Dockerfile's official Python image, and
``tools/base-image.sh`` makes one from Debian packages where no registry is reachable).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pip_settings import serve_pip_settings

REPO = Path(__file__).resolve().parents[1]


def version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def build_command(docker: str, tag: str, variant: str, base_image: str | None, settings_url: str) -> list[str]:
    """The ``docker build`` command line (pure, for tests)."""
    cmd = [docker, "build", "--network", "host", "--tag", tag, "--build-arg", f"VARIANT={variant}"]
    cmd += ["--build-arg", f"PIP_SETTINGS_URL={settings_url}"]
    if base_image:
        cmd += ["--build-arg", f"PYTHON_IMAGE={base_image}"]
    return [*cmd, str(REPO)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build_image.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=["cpu", "gpu"], default="cpu", help="TensorFlow build (default: cpu)")
    parser.add_argument("--tag", help="image tag (default: fruitdask:<version>, -gpu appended for gpu)")
    parser.add_argument("--base-image", help="PYTHON_IMAGE build argument (default: the Dockerfile's)")
    parser.add_argument("--docker", default=os.environ.get("DOCKER", "docker"), help="docker client (default: docker)")
    parser.add_argument("--quiet", action="store_true", help="only print the image id")
    args = parser.parse_args(argv)
    tag = args.tag or f"fruitdask:{version()}{'-gpu' if args.variant == 'gpu' else ''}"
    # The legacy builder, explicitly: it needs no frontend image from a registry.
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    with serve_pip_settings() as url:
        cmd = build_command(args.docker, tag, args.variant, args.base_image, url)
        if args.quiet:
            cmd.insert(2, "--quiet")
        done = subprocess.run(cmd, env=env, check=False)
    if done.returncode == 0 and not args.quiet:
        print(f"built {tag}")
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
