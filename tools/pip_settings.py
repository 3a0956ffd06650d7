"""Hand the build machine's pip settings to a ``docker build`` without baking them in.

Two halves, standard library only (the ``fetch`` half runs inside the image build, before
any package is installed):

``serve_pip_settings()``  (on the build machine)
    Reads the machine's effective pip configuration (``pip config list``: files and
    ``PIP_*`` variables), keeps what a container can use (http(s) index URLs, trusted
    hosts, timeouts, the CA bundle and client certificate *files*), writes it as a
    ``pip.conf`` plus those files into a private temporary folder and serves that folder
    on 127.0.0.1 for the duration of the build.

``python3 pip_settings.py fetch URL DEST``  (in the Dockerfile's RUN)
    Downloads that folder into DEST so ``PIP_CONFIG_FILE=DEST/pip.conf`` works; the same RUN
    deletes DEST after ``pip install``, so nothing of it is left in any layer. An empty URL
    does nothing: a build with no settings uses pip's defaults.

``file://`` indexes and find-links are left out (the build cannot see the machine's
folders), and so is anything unknown.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

#: pip options copied as they are.
PLAIN = ("timeout", "retries", "default-timeout", "trusted-host", "proxy", "prefer-binary")
#: pip options whose value is a list of URLs: only http(s) ones are kept.
URLS = ("index-url", "extra-index-url")
#: pip options whose value names a file: the file is shipped beside pip.conf.
FILES = ("cert", "client-cert")
DEST_DIR = "/tmp/pip-settings"


def effective_settings(python: str = sys.executable) -> dict[str, str]:
    """The machine's pip settings as ``{option: value}`` (later sources win, as in pip)."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    settings: dict[str, str] = {}
    # pip lists files first (global, user, site) and the environment (":env:") last, which
    # is also its precedence order.
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        option = key.split(".", 1)[-1]
        settings[option] = value.strip().strip("'\"")
    return settings


def container_config(settings: dict[str, str], folder: Path, dest_dir: str = DEST_DIR) -> str:
    """Write the files ``settings`` names into ``folder``; return the ``pip.conf`` text."""
    lines = ["[global]"]
    for option, value in sorted(settings.items()):
        if option in URLS:
            urls = [u for u in value.split() if u.startswith(("http://", "https://"))]
            if urls:
                lines.append(f"{option} = {' '.join(urls)}")
        elif option in FILES:
            src = Path(value)
            if src.is_file():
                name = f"{option}.pem"
                shutil.copyfile(src, folder / name)
                lines.append(f"{option} = {dest_dir}/{name}")
        elif option in PLAIN:
            lines.append(f"{option} = {value}")
    return "\n".join(lines) + "\n"


#: The port tried first: the URL is a build argument, part of the build cache's key, so a
#: stable URL keeps the dependency layer cached from one build to the next.
PREFERRED_PORT = 47631


def _server(handler) -> http.server.ThreadingHTTPServer:
    try:
        return http.server.ThreadingHTTPServer(("127.0.0.1", PREFERRED_PORT), handler)
    except OSError:  # taken (another build running): any free port, at the price of the cache
        return http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)


@contextlib.contextmanager
def serve_pip_settings(python: str = sys.executable) -> Iterator[str]:
    """Serve the machine's pip settings on 127.0.0.1; yield the URL for ``PIP_SETTINGS_URL``."""
    with tempfile.TemporaryDirectory(prefix="fruitdask-pip-") as tmp:
        folder = Path(tmp)
        conf = container_config(effective_settings(python), folder)
        (folder / "pip.conf").write_text(conf)
        files = sorted(p.name for p in folder.iterdir())
        (folder / "manifest.json").write_text(json.dumps(files))
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = _server(handler)
        thread = threading.Thread(target=server.serve_forever, name="pip-settings", daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def fetch(url: str, dest: str) -> int:
    """Download the served settings folder into ``dest`` (nothing when ``url`` is empty)."""
    if not url:
        return 0
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(f"{url}/manifest.json", timeout=30) as r:
        names = json.load(r)
    for name in names:
        if "/" in name or name.startswith("."):
            raise SystemExit(f"pip settings: refusing file name {name!r}")
        with urllib.request.urlopen(f"{url}/{name}", timeout=30) as r:
            (folder / name).write_bytes(r.read())
    print(f"pip settings: {len(names)} file(s) from the build machine: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "fetch":
        raise SystemExit("usage: pip_settings.py fetch URL DEST")
    raise SystemExit(fetch(sys.argv[2], sys.argv[3]))
