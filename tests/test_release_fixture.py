"""Release 0.1.0's outputs, frozen in ``tests/fixtures/release-0.1.0/``, stay usable (issue #30).

Today's code must read, update, train from and serve what the release wrote: a features table
with two versions, its ``pca/`` fits, ``run.json``, a model bundle (how they were made:
``tests/fixtures/release-0.1.0/README.md`` and ``make_release_fixture.py``). A later change to
keys, settings, fingerprints, table columns or bundles keeps these tests green, with a
migration where the format moves; it does not edit the fixture.

Every test works on a copy in ``tmp_path`` with the images' mtimes restored from
``mtimes.json`` (git keeps none, and the diff compares size + mtime), and runs each command
in a subprocess as a user types it, from that folder.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import deltalake
import numpy as np
import pytest
from conftest import BUNDLED, REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIXTURE = REPO / "tests" / "fixtures" / "release-0.1.0"
LABELS = ["Apricot", "Cherry 1", "Lemon"]
DAY1 = ["105_100.jpg", "142_100.jpg", "191_100.jpg", "241_100.jpg"]
DAY2 = ["277_100.jpg", "r_105_100.jpg"]
#: The weights as the fixture recorded them: seeded random, float32 (not ``auto``), 32 px.
RUN_FLAGS = ["--image-size", "32", "--weights", "random", "--seed", "0", "--precision", "float32",
             "--partition-size", "4", "--workers", "1", "--threads-per-worker", "2"]
#: An image the release never saw: added by the update test.
NEW_IMAGE = ("Lemon", "r_154_100.jpg")


def copy_fixture(dest: Path) -> Path:
    """The fixture copied to ``dest``, its images' mtimes as the release's table recorded them."""
    shutil.copytree(FIXTURE, dest)
    for rel, v in json.loads((dest / "mtimes.json").read_text()).items():
        os.utime(dest / rel, ns=(v["mtime_ns"], v["mtime_ns"]))
    return dest


def fruitdask(cwd: Path, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m fruitdask ARGV`` from ``cwd``, as a user types it; fails the test on a non-zero exit."""
    proc = subprocess.run([sys.executable, "-m", "fruitdask", *argv], cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"fruitdask {' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def rows(output: Path, version: int | None = None):
    """A table version's rows through deltalake (the format's own reader), by image_key."""
    df = deltalake.DeltaTable(str(output / "features"), version=version).to_pandas()
    return df.sort_values(["image_key", "path"]).reset_index(drop=True)


def record() -> dict:
    return json.loads((FIXTURE / "output" / "run.json").read_text())


@pytest.fixture(scope="module")
def updated(tmp_path_factory) -> dict:
    """A copy brought up to date twice: with the same images (nothing to do), then with one more.

    ``--input`` is absolute: today's keys of a relative ``--input`` are bare file names (see
    ``test_relative_input_table_holds_bare_file_names_today``); the output is relative.
    """
    root = copy_fixture(tmp_path_factory.mktemp("release") / "release")
    images = str(root / "images")
    same = fruitdask(root, "run", "--input", images, "--output", "output", *RUN_FLAGS)
    label, name = NEW_IMAGE
    shutil.copy2(BUNDLED / label / name, root / "images" / label / name)
    grown = fruitdask(root, "run", "--input", images, "--output", "output", *RUN_FLAGS)
    return {"root": root, "same": same, "grown": grown}


def test_the_fixture_weights_are_todays_random_weights():
    """Precondition of every test below: ``--weights random --seed 0`` still gives the weights
    the release's table recorded (a Keras whose seeded initializers change would make the
    table refuse every run as "other settings"; this says why)."""
    from fruitdask.features import model

    _, info = model.load_weights("random", seed=0)
    assert info.sha256 == record()["weights"]["sha256"] == "c7ce9347285f12ce33bcffdef011b7aac71574349afa26212934c2217b3b4807"


def test_table_show_and_history_read_both_versions(tmp_path):
    root = copy_fixture(tmp_path / "release")
    latest = json.loads(fruitdask(root, "table", "show", "output", "--json").stdout)
    assert (latest["version"], latest["rows"], latest["labels"]) == (1, 18, {lab: 6 for lab in LABELS})
    first = json.loads(fruitdask(root, "table", "show", "output", "--version", "0", "--json").stdout)
    assert (first["version"], first["rows"], first["labels"]) == (0, 12, {lab: 4 for lab in LABELS})
    assert latest["pca_fits"] == first["pca_fits"] == [record()["table"]["pca_fit"]]
    history = json.loads(fruitdask(root, "table", "history", "output", "--json").stdout)
    assert [h["version"] for h in history] == [1, 0]
    assert [h["fruitdask"]["counts"]["added"] for h in history] == [6, 12]
    assert [h["fruitdask"]["rows"] for h in history] == [18, 12]
    assert history[0]["fruitdask"]["run_id"] == record()["run_id"]


def test_deltalake_reads_the_rows_and_the_pca_fit_projects_them(tmp_path):
    from fruitdask.reduce import Reduction

    root = copy_fixture(tmp_path / "release")
    mtimes = json.loads((root / "mtimes.json").read_text())
    df = rows(root / "output")
    keys = sorted(f"{lab}/{n}" for lab in LABELS for n in DAY1 + DAY2)
    assert list(df["image_key"]) == keys, "one row per image, keyed <label>/<name>"
    assert list(df["label"]) == [k.split("/")[0] for k in keys]
    assert list(df["source_version"]) == [mtimes[f"images/{k}"]["source_version"] for k in keys]
    assert set(df["settings"]) == {"7125176bc017c1ce"}
    assert sorted(rows(root / "output", version=0)["image_key"]) == sorted(f"{lab}/{n}" for lab in LABELS for n in DAY1)
    # The rows' pca column is the projection of their features by the fit they name.
    (fit,) = set(df["pca_fit"])
    reduction = Reduction.from_npz((root / "output" / "pca" / f"{fit}.npz").read_bytes())
    features = np.stack(df["features"].map(np.asarray)).astype(np.float32)
    assert features.shape == (18, 512)
    np.testing.assert_allclose(reduction.transform(features), np.stack(df["pca"].map(np.asarray)), rtol=1e-4, atol=1e-4)


def test_same_input_again_is_nothing_to_do(updated):
    """Nothing to featurize; the release's table is migrated once, in place: its settings move
    from commit info into the table's description (version 2, a metadata-only ``describe``
    commit: docs/lake.md), its rows untouched."""
    assert json.loads(updated["same"].stdout) == {"output": "output", "up_to_date": True, "version": 2}
    assert "nothing to do" in updated["same"].stderr
    history = json.loads(fruitdask(updated["root"], "table", "history", "output", "--json", "--limit", "2").stdout)
    assert [(h["version"], h["action"]) for h in history] == [(3, "run"), (2, "describe")]
    assert history[1]["added"] == history[1]["updated"] == history[1]["removed"] == 0


def test_one_more_image_is_one_more_version_and_one_more_row(updated):
    out = updated["root"] / "output"
    summary = json.loads(updated["grown"].stdout)
    assert (summary["version"], summary["rows"], summary["added"], summary["updated"], summary["removed"]) == (3, 19, 1, 0, 0)
    assert deltalake.DeltaTable(str(out / "features")).version() == 3
    before, after = rows(FIXTURE / "output").set_index("image_key"), rows(out).set_index("image_key")
    new_key = "/".join(NEW_IMAGE)
    assert sorted(after.index) == sorted([*before.index, new_key])
    old = after.loc[before.index]
    for column in ("run_id", "source_version", "pca_fit", "settings", "path"):
        assert list(old[column]) == list(before[column]), column
    for column in ("features", "pca"):
        np.testing.assert_array_equal(np.stack(old[column].map(np.asarray)), np.stack(before[column].map(np.asarray)))
    assert after.loc[new_key, "pca_fit"] == record()["table"]["pca_fit"], "no refit: projected with the release's fit"


def test_the_release_records_read_as_one_settings_value(tmp_path):
    """The release's ``run.json`` (no ``features``), its table's commit info (no batch size,
    no runtime) and its bundle read as one compatible ``FeatureSettings`` of the tensorflow
    runtime, whose table fingerprint is the one the release's rows hold: nothing to migrate."""
    from fruitdask import output
    from fruitdask.classifier.bundle import ModelBundle
    from fruitdask.features.settings import FeatureSettings, differences
    from fruitdask.lake import keys
    from fruitdask.lake import table as delta

    root = copy_fixture(tmp_path / "release")
    run = output.read_run(str(root / "output")).feature_settings()
    described = delta.open_table(str(root / "output"), {}).description
    assert described is not None
    table = FeatureSettings.from_dict(described.feature_settings)
    model = ModelBundle.load(str(root / "model")).spec
    assert (run.runtime, table.runtime, model.runtime) == ("tensorflow",) * 3 and run.calibration is None
    assert differences(table, run) == [] and differences(model, table) == []
    assert {keys.settings_fingerprint(s) for s in (run, table, model)} == {described.settings} == {"7125176bc017c1ce"}


def test_the_updated_table_records_the_value_under_the_release_fingerprint(updated):
    """After the update, the run's commit describes its settings in today's serialization
    (runtime included) and the table's fingerprint is still the release's (its description,
    migrated once, is not rewritten): every row keeps its meaning."""
    from fruitdask.lake import table as delta

    out = updated["root"] / "output"
    described = delta.open_table(str(out), {}).description
    assert described is not None and described.settings == "7125176bc017c1ce"
    committed = delta.history(str(out), {}, 1)[0][delta.META_KEY]
    assert committed["settings"] == "7125176bc017c1ce"
    assert (committed["feature_settings"]["runtime"], committed["feature_settings"]["image_size"]) == ("tensorflow", 32)
    assert json.loads((out / "run.json").read_text())["features"]["runtime"] == "tensorflow"
    assert set(rows(out)["settings"]) == {"7125176bc017c1ce"}


def test_train_from_the_updated_output(updated):
    root = updated["root"]
    proc = fruitdask(root, "train", "--features", "output", "--test-input", "test-images", "--model-out", "model-new")
    summary = json.loads(proc.stdout)
    assert summary["n_test"] == 6 and summary["skipped"] == 0 and summary["accuracy"] >= 0.5
    bundle = json.loads((root / "model-new" / "bundle.json").read_text())
    assert bundle["labels"] == LABELS
    assert bundle["training"]["n_train"] == 19
    assert bundle["weights"]["sha256"] == record()["weights"]["sha256"]


def test_predict_with_the_release_bundle(tmp_path):
    root = copy_fixture(tmp_path / "release")
    photos = sorted(str(p.relative_to(root)) for p in (root / "test-images").rglob("*.jpg"))
    results = json.loads(fruitdask(root, "predict", *photos, "--model", "model", "--json", "--top", "3").stdout)["results"]
    assert [r["path"] for r in results] == photos
    for r in results:
        assert sorted(p["label"] for p in r["predictions"]) == LABELS
    right = sum(r["predictions"][0]["label"] == Path(r["path"]).parent.name for r in results)
    assert right >= 5, results  # the release's report: 6 of 6; one slip allowed for other TensorFlow builds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture
def served(tmp_path) -> Iterator[dict]:
    """``fruitdask serve --model model`` on the copy, on free loopback ports, stopped by SIGTERM."""
    root = copy_fixture(tmp_path / "release")
    port, probe = free_port(), free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "fruitdask", "serve", "--model", "model", "--port", str(port), "--probe-port", str(probe),
           "--threads", "2", "--drain-seconds", "0"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"server exited {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"not ready in 300 s:\n{log.read_text()}"
            try:
                if request(probe, "GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        yield {"root": root, "port": port}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_serve_answers_with_the_release_bundle(served):
    root, port = served["root"], served["port"]
    status, model = request(port, "GET", "/v1/model")
    assert status == 200 and model["labels"] == LABELS, model
    photo = "test-images/Cherry 1/33_100.jpg"
    status, answer = request(port, "POST", "/v1/predict?top=3", (root / photo).read_bytes(), {"Content-Type": "image/jpeg"})
    assert status == 200, answer
    assert answer["model"]["weights_sha256"] == record()["weights"]["sha256"]
    # The server answers what `predict` answers for the same photo with the same bundle.
    (expected,) = json.loads(fruitdask(root, "predict", photo, "--model", "model", "--json", "--top", "3").stdout)["results"]
    assert [p["label"] for p in answer["predictions"]] == [p["label"] for p in expected["predictions"]]
    np.testing.assert_allclose([p["probability"] for p in answer["predictions"]],
                               [p["probability"] for p in expected["predictions"]], atol=2e-5)
    assert answer["predictions"][0]["label"] == "Cherry 1"


#: Where the release built its outputs: the absolute paths of the tables' ``path`` column.
BUILT_AT = Path("/tmp/fruitdask-release-0.1.0")


@pytest.fixture
def at_release_paths() -> Iterator[Path]:
    """The fixture copied where the release built it, as a user's lake that stayed in place
    while fruitdask was upgraded (the rows' ``path`` column names these files)."""
    if BUILT_AT.exists():
        shutil.rmtree(BUILT_AT)
    try:
        yield copy_fixture(BUILT_AT)
    finally:
        shutil.rmtree(BUILT_AT, ignore_errors=True)


def test_relative_input_table_is_rekeyed_once_without_featurizing(at_release_paths):
    """The release's relative ``--input`` wrote bare file names as keys (``output-relative/``:
    12 rows, 4 keys, each shared by 3 labels; every later run lost rows). Today's code, run
    the way the release was (``--input images``, relative), re-keys the table in one commit of
    its own without featurizing (the features do not change), then adds the 6 images the
    release's run never saw; the same command again is nothing to do. Fails on the release's
    code: it keeps the bare keys, and its second run removes and re-adds rows."""
    root = at_release_paths
    before = rows(root / "output-relative")
    assert before.groupby("image_key")["label"].apply(sorted).to_dict() == {name: LABELS for name in DAY1}

    first = fruitdask(root, "run", "--input", "images", "--output", "output-relative", *RUN_FLAGS)
    assert "re-keyed the table" in first.stderr
    summary = json.loads(first.stdout)
    assert (summary["added"], summary["updated"], summary["removed"], summary["rows"]) == (6, 0, 0, 18)

    history = json.loads(fruitdask(root, "table", "history", "output-relative", "--json").stdout)
    actions = {h["version"]: h["action"] for h in history}
    assert actions[0] == "run" and "rekey" in actions.values(), actions
    rekey_version = next(v for v, a in actions.items() if a == "rekey")
    rekeyed = rows(root / "output-relative", version=rekey_version)
    assert sorted(rekeyed["image_key"]) == sorted(f"{lab}/{n}" for lab in LABELS for n in DAY1), "12 rows, 12 keys"
    # Not featurized again: every row keeps its features, run and fit, found by its path.
    old, new = before.set_index("path"), rekeyed.set_index("path").loc[before["path"]]
    for column in ("run_id", "pca_fit", "source_version"):
        assert list(new[column]) == list(old[column]), column
    np.testing.assert_array_equal(np.stack(new["features"].map(np.asarray)), np.stack(old["features"].map(np.asarray)))

    latest = rows(root / "output-relative")
    assert latest["image_key"].is_unique and len(latest) == 18
    again = fruitdask(root, "run", "--input", "images", "--output", "output-relative", *RUN_FLAGS)
    assert json.loads(again.stdout)["up_to_date"] is True
    assert deltalake.DeltaTable(str(root / "output-relative" / "features")).version() == max(actions)
