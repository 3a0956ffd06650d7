"""The service follows the registry's champion (issue #32, service part).

Fast tests (no TensorFlow): the micro-batcher computes each batch with the one model it read
for that batch while the reference flips under it, and every caller learns which model
computed its row; the follower swaps in a new champion, keeps the old one when the new one
fails to load (and says why), does not reload a broken champion at each poll but does on
SIGHUP's wake, and clears the error when the alias comes back.

The integration test serves a registry of three versions made from today's bundle (the
release fixture) in a subprocess, as a user types it, under continuous load from several
clients, while `fruitdask model promote` and `model rollback` move the champion: zero failed
requests, and every answer names a version that was champion when it was computed. All of
these fail on the code before this change (no ``submit_to_model``, no ``follow`` module,
``--model`` took no registry and answers had no ``version``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from fruitdask.classifier.bundle import LinearClassifier
from fruitdask.classifier.registry import CHAMPION, Registry, new_version
from fruitdask.serve.batcher import MicroBatcher
from fruitdask.serve.follow import Champion, Follower
from fruitdask.serve.metrics import ServeMetrics
from fruitdask.serve.settings import ServeSettings
from fruitdask.serve.state import ServeState
from fruitdask.storage import alias

FIXTURE = REPO / "tests" / "fixtures" / "release-0.1.0"
PROMOTED = float(int(time.time()) - 3600)  # when the champions of the follower's tests were promoted


# --- the batcher: one model per batch -----------------------------------------------------


class Model:
    """A stand-in model whose rows say who computed them."""

    def __init__(self, ident: int, image_size: int = 32) -> None:
        self.ident, self.image_size = ident, image_size


def test_a_batch_is_computed_by_one_model_while_the_reference_flips():
    models = [Model(1), Model(2)]
    current = {"model": models[0]}
    calls: list[tuple[int, int]] = []

    def infer(model: Model, images: np.ndarray) -> np.ndarray:
        time.sleep(0.002)  # the reference flips while the batch runs
        calls.append((model.ident, len(images)))
        return np.column_stack([images[:, 0], np.full(len(images), model.ident)])

    async def flip(stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            current["model"] = models[i % 2]
            await asyncio.sleep(0.0007)

    async def scenario() -> list:
        b = MicroBatcher(infer, current=lambda: current["model"], max_batch=8, max_wait_s=0.001, max_queue=1024)
        b.start()
        stop = asyncio.Event()
        flipper = asyncio.get_running_loop().create_task(flip(stop))
        try:
            out = []
            for wave in range(20):
                out += await asyncio.gather(*(b.submit_to_model(np.array([wave * 100 + i]), current["model"])
                                              for i in range(25)))
            return out
        finally:
            stop.set()
            await flipper
            await b.stop()

    out = asyncio.run(scenario())
    assert len(out) == 500
    for i, (row, model) in enumerate(out):
        assert row[0] == (i // 25) * 100 + i % 25  # each caller its own row
        assert row[1] == model.ident  # ... computed by the model it is told about
    # Both models computed batches of several images: the flips fell between batches.
    assert {m for m, _ in calls} == {1, 2} and max(n for _, n in calls) > 1


def test_an_item_decoded_for_another_input_size_is_computed_by_its_own_model():
    small, large = Model(1, 32), Model(2, 64)
    current = {"model": large}

    def infer(model: Model, images: np.ndarray) -> np.ndarray:
        assert images.shape[1] == model.image_size  # never a photo of the wrong size
        return np.full((len(images), 1), model.ident)

    async def scenario():
        b = MicroBatcher(infer, current=lambda: current["model"], fits=lambda m, p: m.image_size == p.image_size,
                         max_batch=8, max_wait_s=0.02)
        b.start()
        try:
            return await asyncio.gather(b.submit_to_model(np.zeros((32, 1)), small),
                                        b.submit_to_model(np.zeros((64, 1)), large),
                                        b.submit_to_model(np.zeros((32, 1)), small))
        finally:
            await b.stop()

    out = asyncio.run(scenario())
    assert [m.ident for _, m in out] == [1, 2, 1] and [int(r[0]) for r, _ in out] == [1, 2, 1]


# --- the follower -------------------------------------------------------------------------


class Loaded:
    """What the follower needs of a loaded model."""

    def __init__(self, version: str, promoted_at: float) -> None:
        self.version, self.promoted_at, self.load_seconds = version, promoted_at, 0.01


def _point(registry: Registry, version: str) -> None:
    read = registry.champion()
    doc = {"version": version, "promoted_at": dt.datetime.fromtimestamp(PROMOTED, dt.timezone.utc).isoformat()}
    assert alias.replace(registry.path(CHAMPION), registry.storage_options, doc, read.version)


def test_follower_swaps_keeps_the_old_one_on_failure_and_says_why(tmp_path):
    registry = Registry(str(tmp_path / "MODELS"))
    loads: list[tuple[str, str | None]] = []

    def load(champion: Champion, serving) -> Loaded:
        loads.append((champion.version, serving.version if serving else None))
        if champion.version == "broken":
            raise ValueError("classifier.npz does not fit reduction.npz")
        return Loaded(champion.version, champion.promoted_at)

    async def scenario() -> None:
        state = ServeState(ServeSettings(), ServeMetrics(["/v1/predict"]))
        _point(registry, "v1")
        state.predictor = Loaded("v1", 0.0)
        state.metrics.serving("v1", 0.0)
        follower = Follower(registry, load, poll_s=60)
        await follower.check(state)
        assert loads == [] and state.predictor.version == "v1"  # nothing new

        _point(registry, "v2")
        await follower.check(state)
        assert state.predictor.version == "v2" and loads == [("v2", "v1")] and state.switch_error is None
        assert state.predictor.promoted_at == pytest.approx(PROMOTED)  # champion.json's promoted_at

        _point(registry, "broken")
        await follower.check(state)
        assert state.predictor.version == "v2"  # the old one serves on
        assert "champion broken could not be loaded" in state.switch_error and "does not fit" in state.switch_error
        await follower.check(state)
        assert loads.count(("broken", "v2")) == 1  # not reloaded at each poll ...
        await follower.check(state, retry=True)
        assert loads.count(("broken", "v2")) == 2  # ... but on SIGHUP
        text = state.metrics.exposition()[0].decode()
        assert "fruitdask_model_switch_failures_total 2.0" in text
        assert 'fruitdask_model_info{version="v2"} 1.0' in text and 'version="v1"' not in text
        age = float(re.search(r"^fruitdask_model_champion_age_seconds (\S+)$", text, re.M).group(1))
        assert abs(age - (time.time() - PROMOTED)) < 60

        _point(registry, "v2")  # rolled back to the one serving: the error is over
        await follower.check(state)
        assert state.switch_error is None and state.predictor.version == "v2"

    asyncio.run(scenario())


def test_a_registry_on_s3_is_detected_and_followed(s3):
    """On S3 (moto on loopback) as locally: a prefix holding champion.json is a registry, a
    bundle's prefix is not, and a promotion there is swapped in at the next check."""
    from fruitdask.serve.follow import read_champion, registry_at

    s3.bucket("fruits-models", "eu-west-3")
    opts = s3.storage_options
    s3.fs.pipe("fruits-models/bundle/bundle.json", b"{}")
    assert registry_at("s3://fruits-models/bundle", opts) is None
    registry = Registry("s3://fruits-models/models", opts)
    assert registry_at(registry.url, opts) is None  # no alias yet: not (yet) a registry
    _point(registry, "v1")
    found = registry_at(registry.url, opts)
    assert found is not None and read_champion(found) == Champion("v1", "s3://fruits-models/models/v1", PROMOTED)

    async def scenario() -> None:
        state = ServeState(ServeSettings(), ServeMetrics(["/v1/predict"]))
        state.predictor = Loaded("v1", PROMOTED)
        follower = Follower(found, lambda c, serving: Loaded(c.version, c.promoted_at), poll_s=60)
        _point(registry, "v2")
        await follower.check(state)
        assert state.predictor.version == "v2" and state.switch_error is None

    asyncio.run(scenario())


def test_a_registry_with_no_champion_yet_says_which_command_to_run(tmp_path, capsys):
    """`serve --model MODELS` before any promotion: exit 1 at once, naming `model promote`."""
    from serve_fakes import tiny_bundle

    from fruitdask.cli import main

    version = tiny_bundle(tmp_path / "MODELS" / new_version())
    (version / "_SUCCESS").write_text("")
    rc = main(["serve", "--model", str(tmp_path / "MODELS"), "--port", "0", "--probe-port", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "no champion yet" in err and "fruitdask model promote" in err, err


def test_a_bundle_has_no_champion_age():
    """A bundle location is no champion: no age sample, so the chart's alert cannot fire on it."""
    metrics = ServeMetrics(["/v1/predict"])
    metrics.serving(None, None)
    text = metrics.exposition()[0].decode()
    assert "fruitdask_model_champion_age_seconds" not in text
    assert re.search(r"^fruitdask_model_switch_timestamp_seconds \d", text, re.M)


def test_sighup_to_a_server_of_a_bundle_is_logged_not_fatal(tmp_path):
    """SIGHUP reads a registry's alias; a server of a bundle follows nothing and stays up
    (before this change SIGHUP's default action ended the process)."""
    from test_serve_limits import fake_server

    with fake_server(tmp_path) as srv:
        srv["proc"].send_signal(signal.SIGHUP)
        deadline = time.time() + 30
        while "follows no registry" not in srv["log"].read_text():
            assert srv["proc"].poll() is None and time.time() < deadline, srv["log"].read_text()
            time.sleep(0.05)
        status, body = call(srv["probe"], "GET", "/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok", "version": None, "following": None,
                                                      "last_switch_error": None}
        assert srv["proc"].poll() is None


# --- the service under load, following the champion -----------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def fruitdask(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "fruitdask", *argv], cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"fruitdask {' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def make_registry(root: Path) -> list[str]:
    """MODELS/ with three versions of today's bundle: v1 as it is, v2 with its classifier's
    rows rolled by one (another model: other answers for the same photo), v3 broken (its
    classifier does not fit its PCA). Lineage points at the fixture's table, as `train --models`
    writes it."""
    models = root / "MODELS"
    versions = [new_version() for _ in range(3)]
    src = root / "model"
    labels = json.loads((src / "bundle.json").read_text())["labels"]
    lineage = {"table_uri": str(root / "output"), "table_version": 1, "trigger": "train"}
    for i, v in enumerate(versions):
        dest = models / v
        shutil.copytree(src, dest)
        clf = LinearClassifier.from_npz((src / "classifier.npz").read_bytes())
        metrics = {"labels": labels, "accuracy": 1.0, "macro_f1": 1.0}
        if i == 1:
            clf.coef, clf.intercept = np.roll(clf.coef, 1, axis=0), np.roll(clf.intercept, 1)
        if i == 2:
            clf.coef = np.hstack([clf.coef, clf.coef[:, :1]])
            clf.mean, clf.scale = np.append(clf.mean, 0.0), np.append(clf.scale, 1.0)
            metrics["labels"] = []
        (dest / "classifier.npz").write_bytes(clf.to_npz())
        doc = json.loads((dest / "bundle.json").read_text())
        doc["labels"] = clf.classes
        (dest / "bundle.json").write_text(json.dumps(doc))
        (dest / "metrics.json").write_text(json.dumps(metrics))
        (dest / "lineage.json").write_text(json.dumps(lineage))
    return versions


class Clients:
    """Client threads posting photos without pause until stopped; every answer recorded."""

    def __init__(self, port: int, photos: list[Path], per_client_limit: int = 4000) -> None:
        self.port, self.photos, self.limit = port, photos, per_client_limit
        self.answers: list[dict] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(p,), daemon=True) for p in photos]

    def _run(self, photo: Path) -> None:
        body = photo.read_bytes()
        for _ in range(self.limit):
            if self.stop.is_set():
                return
            start = time.time()
            try:
                status, raw = call(self.port, "POST", "/v1/predict?top=3", body, {"Content-Type": "image/jpeg"})
                doc = json.loads(raw)
            except (OSError, ValueError) as e:
                status, doc = -1, {"error": repr(e)}
            self.answers.append({"photo": photo.name + photo.parent.name, "start": start, "end": time.time(),
                                 "status": status, "doc": doc})

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def served_version(port: int) -> str | None:
    return json.loads(call(port, "GET", "/v1/model")[1]).get("version")


def switch_window(port: int, version: str, log: Path) -> tuple[float, float]:
    """``(last time /v1/model named another version, first time it named version)``: the
    swap happened in between (polled every 50 ms)."""
    last_other = time.time()
    deadline = last_other + 120
    while True:
        asked = time.time()
        if served_version(port) == version:
            return last_other, time.time()
        last_other = asked
        assert time.time() < deadline, f"not serving {version} within 120 s\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


def wait_for(predicate, what: str, log: Path, timeout: float = 120) -> float:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"{what}: not within {timeout} s\n{log.read_text()[-4000:]}"
        time.sleep(0.05)
    return time.time()


@pytest.mark.integration
@pytest.mark.slow
def test_the_service_follows_the_champion_under_load_with_no_failed_request(tmp_path):
    root = tmp_path / "day"
    root.mkdir()
    for name in ("model", "output", "test-images"):
        shutil.copytree(FIXTURE / name, root / name)
    v1, v2, v3 = make_registry(root)
    fruitdask(root, "model", "promote", "MODELS", v1)  # the first champion
    port, probe = free_port(), free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "fruitdask", "serve", "--model", "MODELS", "--model-poll-seconds", "0.5",
           "--port", str(port), "--probe-port", str(probe), "--threads", "2", "--drain-seconds", "0"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
    champions: list[tuple[float, str]] = [(0.0, v1)]  # (when the command that moved the alias began, version)
    windows: list[tuple[float, float]] = []  # each swap happened between these two times
    try:
        def ready() -> bool:
            assert proc.poll() is None, f"server exited {proc.returncode}:\n{log.read_text()}"
            try:
                return call(probe, "GET", "/readyz")[0] == 200
            except OSError:
                return False

        wait_for(ready, "ready", log, 300)
        assert served_version(port) == v1
        photos = sorted((root / "test-images").rglob("*.jpg"))[::2]  # three clients, one label each
        with Clients(port, photos) as clients:
            time.sleep(2)
            for argv, version in ((("model", "promote", "MODELS", v2, "--force"), v2), (("model", "rollback", "MODELS"), v1)):
                champions.append((time.time(), version))
                fruitdask(root, *argv)
                windows.append(switch_window(port, version, log))
                time.sleep(2)
            champions.append((time.time(), v3))
            fruitdask(root, "model", "promote", "MODELS", v3, "--force")

            def refused() -> bool:
                return v3 in (json.loads(call(probe, "GET", "/healthz")[1]).get("last_switch_error") or "")

            wait_for(refused, "the broken champion refused", log)
            proc.send_signal(signal.SIGHUP)  # try it again now
            wait_for(lambda: "fruitdask_model_switch_failures_total 2.0" in call(probe, "GET", "/metrics")[1].decode(),
                     "SIGHUP retried the broken champion", log)
            time.sleep(1)
        metrics = call(probe, "GET", "/metrics")[1].decode()
        health = json.loads(call(probe, "GET", "/healthz")[1])
        ready_status, _ = call(probe, "GET", "/readyz")
        final = served_version(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    answers = clients.answers
    failed = [a for a in answers if a["status"] != 200]
    assert not failed, failed[:5]
    assert len(answers) > 50
    # Each answer names a version that was champion while it was being answered: the alias
    # named it at some moment before the answer came back, and the service had not yet seen
    # a later champion when the request was sent.
    moved = [t for t, _ in champions[1:]] + [float("inf")]
    served_from = [0.0, *(new for _, new in windows), float("inf")]  # v1, v2, v1 again, and v3 never
    for a in answers:
        version = a["doc"]["model"]["version"]
        assert version in (v1, v2), a
        ok = [i for i, (t, v) in enumerate(champions[:3])
              if v == version and t <= a["end"] and a["start"] <= max(moved[i], served_from[i + 1])]
        assert ok, (a, champions, windows)
    # One model per answer: a photo gets the same labels from the same version every time,
    # and v1 and v2 (classifier rows rolled) answer differently: an answer that named one
    # version but took its row from the other would add a second ranking.
    by = {}
    for a in answers:
        by.setdefault((a["photo"], a["doc"]["model"]["version"]), set()).add(
            tuple(p["label"] for p in a["doc"]["predictions"]))
    assert all(len(s) == 1 for s in by.values()), by
    for photo in {a["photo"] for a in answers}:
        if (photo, v1) in by and (photo, v2) in by:
            assert by[(photo, v1)] != by[(photo, v2)]
    assert {a["doc"]["model"]["version"] for a in answers} == {v1, v2}
    # The broken champion left v1 serving, and the probe port says why.
    assert final == v1 and ready_status == 200
    assert v3 in health["last_switch_error"] and health["version"] == v1 and health["following"] == "MODELS"
    assert f'fruitdask_model_info{{version="{v1}"}} 1.0' in metrics and f'version="{v2}"' not in metrics
    age = float(re.search(r"^fruitdask_model_champion_age_seconds (\S+)$", metrics, re.M).group(1))
    assert 0 <= age < 600  # the rollback made v1 champion again a moment ago
    switched = float(re.search(r"^fruitdask_model_switch_timestamp_seconds (\S+)$", metrics, re.M).group(1))
    assert windows[-1][0] - 1 <= switched <= windows[-1][1]  # the rollback's swap
    text = log.read_text()
    assert "VGG16 kept" in text  # the same feature settings: only the PCA and classifier changed hands
    # The report: the longest request during a switch against the median (no time limit asserted).
    # "During a switch": the request overlapped the bracket in which the swap happened.
    during = [a["end"] - a["start"] for a in answers if any(a["start"] <= new and a["end"] >= old for old, new in windows)]
    seconds = sorted(a["end"] - a["start"] for a in answers)
    print(f"\n{len(answers)} requests from {len(photos)} clients, 0 failed; median {1000 * statistics.median(seconds):.1f} ms, "
          f"p99 {1000 * seconds[int(0.99 * (len(seconds) - 1))]:.1f} ms, longest {1000 * seconds[-1]:.1f} ms; "
          f"longest during a switch {1000 * max(during, default=0):.1f} ms ({len(during)} requests overlapped the "
          f"{len(windows)} swaps)")
