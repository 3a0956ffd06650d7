"""A real headless Chromium for tests, driven over the DevTools protocol.

:func:`open_page` loads a URL in Debian's ``chromium`` and reports what a person would
notice: console errors and uncaught exceptions, images that failed to load, every request
the page made (a self-contained page makes none beyond itself), and a full-page screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
    "--disable-extensions", "--remote-debugging-port=0", "--remote-allow-origins=*",
)


def find_chromium() -> str | None:
    """The path of a Chromium binary on ``PATH``, or None."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageReport:
    """What loading one page showed."""

    title: str
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    images: int = 0
    broken_images: list[str] = field(default_factory=list)
    height: int = 0


class _DevTools:
    """The smallest CDP client: send a command, wait for its reply, keep the events."""

    def __init__(self, ws_url: str, timeout: float):
        import websocket  # websocket-client

        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.events: list[dict] = []
        self._id = 0

    def call(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {timeout}s")
            self.events.append(json.loads(self.ws.recv()))

    def close(self) -> None:
        self.ws.close()


def _devtools_port(profile: Path, proc: subprocess.Popen, timeout: float) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text().strip():
            return int(marker.read_text().split()[0])
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before opening DevTools")
        time.sleep(0.1)
    raise TimeoutError(f"chromium did not open DevTools within {timeout}s")


def _stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop the process group this helper started (chromium forks zygote, GPU and renderer
    processes into it) and wait until every member is gone."""
    pgid = proc.pid  # start_new_session=True: the group is ours alone
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    proc.wait(timeout=timeout)


def _console_errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            out.append("exception: " + p.get("exceptionDetails", {}).get("text", ""))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
    return out


IMAGES_JS = """JSON.stringify({n: document.images.length,
  broken: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.title),
  height: document.documentElement.scrollHeight, title: document.title})"""


def open_page(url: str, screenshot: Path, *, width: int = 1280, timeout: float = 60.0) -> PageReport:
    """Load ``url`` in headless Chromium, save a full-page PNG to ``screenshot``, report.

    Raises ``RuntimeError`` when no Chromium is installed.
    """
    binary = find_chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed: apt-get install -y chromium (make install-test does it)")
    profile = Path(tempfile.mkdtemp(prefix="fruitdask-chromium-"))
    log = open(profile.parent / f"{profile.name}.log", "wb")
    proc = subprocess.Popen(
        [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},1000", "about:blank"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        port = _devtools_port(profile, proc, timeout)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
            pages = [t for t in json.load(r) if t.get("type") == "page"]
        cdp = _DevTools(pages[0]["webSocketDebuggerUrl"], timeout)
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                cdp.call(f"{domain}.enable")
            cdp.events.clear()
            cdp.call("Page.navigate", url=url)
            cdp.wait_for("Page.loadEventFired", timeout)
            info = json.loads(cdp.call("Runtime.evaluate", expression=IMAGES_JS, returnByValue=True)["result"]["value"])
            height = int(info["height"])
            cdp.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
            shot = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            requests = [e["params"]["request"]["url"] for e in cdp.events if e.get("method") == "Network.requestWillBeSent"]
            requests = [u for u in requests if not u.startswith("data:")]  # embedded, not fetched
            return PageReport(
                title=info["title"], console_errors=_console_errors(cdp.events), requests=requests,
                images=int(info["n"]), broken_images=list(info["broken"]), height=height,
            )
        finally:
            cdp.close()
    finally:
        _stop_group(proc)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
        Path(log.name).unlink(missing_ok=True)
