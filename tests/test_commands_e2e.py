"""Every command the README and docs name, run as a user types it (issue #30).

One output is built once for the module by real ``python -m fruitdask run`` processes, from
another folder (cwd = a tmp folder), on real Fruits-360 images at 32 px with a seeded weights
file, with relative paths for some commands and absolute ones for others; the other
commands read it in their own processes. Each test checks what the command promises, not
only its exit code.

Which test covers which documented command:

=====================================================  ==========================================================
``run`` first (relative paths)                         test_run_first_creates_version_0_with_a_row_per_image
``run`` grown (absolute paths)                         test_run_grown_adds_only_the_new_images_as_version_1
``run`` up to date                                     test_run_up_to_date_says_so_and_commits_nothing
``run --rebuild``                                      test_run_rebuild_featurizes_every_image_again
``run --refit``                                        test_run_refit_names_a_new_pca_fit_in_every_row
``table history`` (text and ``--json``)                test_table_history_lists_every_version_with_what_it_did
``table show``, ``table show --version 0``             test_table_show_and_time_travel_to_version_0
``table compact``, ``vacuum --dry-run``, ``vacuum``    test_table_compact_then_vacuum
  (default retention and ``--retain-hours 0``)
``report OUTPUT``                                      test_report_rebuilds_the_page_of_the_last_run
``train``                                              test_train_writes_a_bundle_and_its_accuracy
``predict`` (text and ``--json``)                      test_predict_names_a_label_in_text_and_json
``serve`` (starts, answers, stops)                     test_serve_answers_a_photo_then_stops_on_sigterm
``bench`` (smallest size)                              test_bench_smallest_size_writes_its_results
``table --help`` (its actions and ``--json``)          test_table_help_names_its_actions_and_json
=====================================================  ==========================================================

Elsewhere: ``--help`` of every command (tests/test_cli.py), ``python -m fruitdask --version``
and a failing run's exit code (tests/test_cli.py), the server's whole API and its limits
(tests/test_serve.py), ``report`` on s3:// (tests/test_report.py), ``run --keep-deleted``
and the table's exactness (tests/test_lake.py), a killed run (tests/test_lake_kill.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE, SMALL_SIZE, copy_images, read_features
from test_serve import call, free_port, post_image, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
#: Apricot and Avocado both have a 130_100.jpg among their first five: keys must keep the label.
FIRST_LABELS, PER_LABEL = 3, 5
GROWN_LABEL, GROWN = "Cherry 1", 3


def fruitdask(cwd: Path, *args: str, codes: tuple[int, ...] = (0,), timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m fruitdask ARGS`` in ``cwd``, as typed in a shell; its exit code must be one of ``codes``."""
    proc = subprocess.run([sys.executable, "-m", "fruitdask", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode in codes, f"fruitdask {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def last_json(stdout: str) -> dict:
    """The one JSON line a command prints last on stdout."""
    return json.loads(stdout.strip().splitlines()[-1])


def record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def version(out: Path) -> int:
    from fruitdask.lake import table as delta

    return delta.load(str(out), {}).version()


@pytest.fixture(scope="module")
def lake(tmp_path_factory, weights_file) -> dict:
    """The runs of a lake's life, in order: first, grown, up to date, --rebuild, --refit.

    cwd is ``root``; ``in``, ``out``, ``Test`` lie in it. Each step keeps its process, its
    run.json and the table version after it."""
    root = tmp_path_factory.mktemp("e2e")
    copy_images(SAMPLE / "Training", root / "in", FIRST_LABELS, PER_LABEL)
    run = ("--image-size", str(SMALL_SIZE), "--weights", str(weights_file), "--precision", "float32", "--partition-size", "4")
    steps = {}

    def step(name: str, *args: str) -> None:
        mtime = (root / "out" / "run.json").stat().st_mtime_ns if (root / "out" / "run.json").exists() else None
        proc = fruitdask(root, "run", *args, *run)
        steps[name] = {"proc": proc, "record": record(root / "out"), "version": version(root / "out"),
                       "rows": read_features(root / "out"), "run_json_mtimes": (mtime, (root / "out" / "run.json").stat().st_mtime_ns)}

    step("first", "--input", "in", "--output", "out")
    steps["first"]["keys"] = _keys(root / "in")
    grown = root / "in" / GROWN_LABEL
    grown.mkdir()
    for f in sorted((SAMPLE / "Training" / GROWN_LABEL).iterdir())[:GROWN]:
        shutil.copy2(f, grown / f.name)
    step("grown", "--input", str(root / "in"), "--output", str(root / "out"))
    step("up_to_date", "--input", "in", "--output", "out")
    step("rebuild", "--input", "in", "--output", "out", "--rebuild")
    step("refit", "--input", "./in/", "--output", "out/", "--refit")
    copy_images(SAMPLE / "Test", root / "Test", FIRST_LABELS + 1, 2)
    return {"root": root, "out": root / "out", "steps": steps, "keys": _keys(root / "in"), "weights": weights_file}


def _keys(data: Path) -> list[str]:
    return sorted(f"{p.parent.name}/{p.name}" for p in data.rglob("*.jpg"))


# --- run -----------------------------------------------------------------------------------


def test_run_first_creates_version_0_with_a_row_per_image(lake):
    """Relative --input/--output: version 0, one row per image keyed Label/name. Before the
    key fix, keys were bare file names and Apricot's and Avocado's 130_100.jpg collapsed."""
    first = lake["steps"]["first"]
    n = FIRST_LABELS * PER_LABEL
    assert first["version"] == 0
    assert sorted(first["rows"]["image_key"]) == first["keys"] and len(first["keys"]) == n
    said = last_json(first["proc"].stdout)
    assert (said["version"], said["rows"], said["added"], said["output"]) == (0, n, n, "out")
    assert Path(said["report"]) == lake["out"].resolve() / "report.html" and Path(said["report"]).exists()
    assert first["record"]["counts"]["added"] == n and first["record"]["table"]["version_after"] == 0


def test_run_grown_adds_only_the_new_images_as_version_1(lake):
    """Absolute paths on the table the relative run wrote: the same keys, only the new images."""
    grown, first = lake["steps"]["grown"], lake["steps"]["first"]
    n = FIRST_LABELS * PER_LABEL
    c = grown["record"]["counts"]
    assert grown["version"] == 1 and grown["record"]["table"]["version_before"] == 0
    assert (c["added"], c["updated"], c["removed"], c["unchanged"], c["featurized"]) == (GROWN, 0, 0, n, GROWN)
    assert sorted(grown["rows"]["image_key"]) == lake["keys"] and len(grown["rows"]) == n + GROWN
    old = grown["rows"][grown["rows"]["label"] != GROWN_LABEL]
    assert set(old["run_id"]) == {first["record"]["run_id"]}, "the first run's rows are untouched"
    assert last_json(grown["proc"].stdout)["added"] == GROWN


def test_run_up_to_date_says_so_and_commits_nothing(lake):
    same = lake["steps"]["up_to_date"]
    assert "nothing to do" in same["proc"].stderr
    assert last_json(same["proc"].stdout) == {"output": "out", "up_to_date": True, "version": 1}
    assert same["version"] == 1, "no new version"
    before, after = same["run_json_mtimes"]
    assert same["record"] == lake["steps"]["grown"]["record"] and before == after, "run.json not rewritten"


def test_run_rebuild_featurizes_every_image_again(lake):
    """A rebuild counts every row it replaces as updated, none unchanged (it said 18 added
    and 18 unchanged before)."""
    rebuild = lake["steps"]["rebuild"]
    n = len(lake["keys"])
    c = rebuild["record"]["counts"]
    assert rebuild["version"] == 2 and rebuild["record"]["table"]["refitted"]
    assert (c["featurized"], c["added"], c["updated"], c["unchanged"], c["removed"]) == (n, 0, n, 0, 0)
    assert set(rebuild["rows"]["run_id"]) == {rebuild["record"]["run_id"]} and len(rebuild["rows"]) == n


def test_run_refit_names_a_new_pca_fit_in_every_row(lake):
    refit, before = lake["steps"]["refit"], lake["steps"]["rebuild"]
    fit = refit["record"]["table"]["pca_fit"]
    assert refit["version"] == 3 and refit["record"]["table"]["refitted"]
    assert fit != before["record"]["table"]["pca_fit"] and set(refit["rows"]["pca_fit"]) == {fit}
    assert refit["record"]["counts"]["featurized"] == 0, "a refit re-projects, it does not featurize"
    assert set(refit["rows"]["run_id"]) == {before["record"]["run_id"]}, "features kept from the rebuild"
    assert (lake["out"] / "pca" / f"{fit}.npz").exists()


# --- table ---------------------------------------------------------------------------------


def test_table_history_lists_every_version_with_what_it_did(lake):
    """``table history OUTPUT``: a line per version, newest first, with the run and the rows it
    added, updated, removed and left unchanged; ``--json`` the same for machines."""
    s, n = lake["steps"], len(lake["keys"])
    first = FIRST_LABELS * PER_LABEL
    rows = json.loads(fruitdask(lake["root"], "table", "history", "out", "--json").stdout)
    assert [r["version"] for r in rows] == [3, 2, 1, 0]
    want = {  # version: run, action, added, updated, removed, unchanged, rows, new fit
        0: (s["first"], "run", first, 0, 0, 0, first, True),
        1: (s["grown"], "run", GROWN, 0, 0, first, n, False),
        2: (s["rebuild"], "rebuild", 0, n, 0, 0, n, True),
        3: (s["refit"], "run", 0, 0, 0, n, n, True),
    }
    for r in rows:
        step, *did = want[r["version"]]
        assert [r[k] for k in ("action", "added", "updated", "removed", "unchanged", "rows", "new_fit")] == did, r
        assert r["run_id"] == step["record"]["run_id"] and r["pca_fit"] == step["record"]["table"]["pca_fit"]
    text = fruitdask(lake["root"], "table", "history", str(lake["out"])).stdout.splitlines()
    assert text[0].split()[:3] == ["version", "time", "(UTC)"] and len(text) == 1 + len(rows)
    for line, r in zip(text[1:], rows, strict=True):
        words = line.split()
        assert words[0] == str(r["version"]) and r["run_id"] in words and words[3] == r["action"], line
        assert words[5:10] == [f"{r[k]:,}" for k in ("added", "updated", "removed", "unchanged", "rows")], line
    newest = fruitdask(lake["root"], "table", "history", "out", "--limit", "1", "--json").stdout
    assert json.loads(newest) == rows[:1], "--limit keeps what each version did (its fit is still new)"


def test_table_show_and_time_travel_to_version_0(lake):
    """``table show``: the latest version's rows, labels, fit; ``--version 0``: the first run's
    (it named the latest run before: delta-rs numbers a time-travelled table's history wrongly)."""
    s = lake["steps"]
    latest = fruitdask(lake["root"], "table", "show", str(lake["out"])).stdout
    assert latest.startswith(f"version 3: {len(lake['keys'])} rows in ")
    assert s["refit"]["record"]["table"]["pca_fit"] in latest and f"{GROWN_LABEL}  " in latest
    old = fruitdask(lake["root"], "table", "show", "out", "--version", "0").stdout
    assert old.startswith(f"version 0: {FIRST_LABELS * PER_LABEL} rows in ")
    # The input as the run resolved it (its real absolute path, whatever the spelling: docs/lake.md, "Keys").
    first_input = os.path.realpath(lake["root"] / "in")
    assert f"last run: {s['first']['record']['run_id']} (input {first_input})" in old and GROWN_LABEL not in old
    doc = json.loads(fruitdask(lake["root"], "table", "show", "out", "--version", "0", "--json").stdout)
    assert doc["rows"] == FIRST_LABELS * PER_LABEL and set(doc["labels"].values()) == {PER_LABEL}
    assert doc["fruitdask"]["run_id"] == s["first"]["record"]["run_id"]
    assert doc["pca_fits"] == [s["first"]["record"]["table"]["pca_fit"]]


def test_table_compact_then_vacuum(lake, tmp_path):
    """On a copy of the output: ``compact`` writes a version with the same rows in fewer files;
    ``vacuum --dry-run`` lists and deletes nothing; ``vacuum`` with the default retention
    deletes nothing recent (version 0 still reads); ``vacuum --retain-hours 0`` deletes the
    files no current version needs: the latest version reads the same rows, version 0 no longer."""
    out = tmp_path / "life"
    shutil.copytree(lake["out"], out)
    table = out / "features"
    rows = read_features(out)[["image_key", "run_id", "pca_fit"]]
    files_before = len(delta_files(out))
    assert files_before > 1

    said = fruitdask(tmp_path, "table", "compact", "life").stdout
    assert said.startswith(f"compacted: {files_before} files merged into 1")
    assert version(out) == 4 and len(delta_files(out)) == 1
    assert read_features(out)[["image_key", "run_id", "pca_fit"]].equals(rows)
    compact = json.loads(fruitdask(tmp_path, "table", "history", "life", "--limit", "1", "--json").stdout)[0]
    assert (compact["action"], compact["added"], compact["removed"], compact["rows"]) == ("compact", 0, 0, len(rows))
    assert (compact["files_added"], compact["files_removed"]) == (1, files_before)

    on_disk = sorted(p.name for p in table.glob("*.parquet"))
    dry = fruitdask(tmp_path, "table", "vacuum", str(out), "--retain-hours", "0", "--dry-run", "--json").stdout
    listed = json.loads(dry)
    assert listed["dry_run"] and sorted(listed["files"]) == sorted(set(on_disk) - set(delta_files(out)))
    assert sorted(p.name for p in table.glob("*.parquet")) == on_disk, "a dry run deletes nothing"

    kept = fruitdask(tmp_path, "table", "vacuum", "life").stdout
    assert kept.startswith("deleted 0 files no version of the last 168 hours needs")
    assert sorted(p.name for p in table.glob("*.parquet")) == on_disk
    assert f"version 0: {FIRST_LABELS * PER_LABEL} rows" in fruitdask(tmp_path, "table", "show", "life", "--version", "0").stdout

    gone = fruitdask(tmp_path, "table", "vacuum", "life", "--retain-hours", "0").stdout
    assert gone.startswith(f"deleted {len(listed['files'])} files no version of the last 0 hours needs")
    assert sorted(p.name for p in table.glob("*.parquet")) == delta_files(out)
    assert read_features(out)[["image_key", "run_id", "pca_fit"]].equals(rows), "the latest version reads the same"
    old = fruitdask(tmp_path, "table", "show", "life", "--version", "0", codes=(1,))
    assert "version 0" in old.stderr and "can no longer be read" in old.stderr and len(old.stderr.splitlines()) == 1
    actions = [r["action"] for r in json.loads(fruitdask(tmp_path, "table", "history", "life", "--json").stdout)]
    assert actions[:3] == ["vacuum end", "vacuum start", "compact"]


def delta_files(out: Path) -> list[str]:
    from fruitdask.lake import table as delta

    return sorted(Path(u).name for u in delta.load(str(out), {}).file_uris())


def test_table_help_names_its_actions_and_json(tmp_path):
    text = fruitdask(tmp_path, "table", "--help").stdout
    assert "{history,vacuum,compact,show}" in text and "--json" in text and "--retain-hours" in text


# --- report, train, predict, serve ---------------------------------------------------------


def test_report_rebuilds_the_page_of_the_last_run(lake, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(lake["out"], out)
    (out / "report.html").unlink()
    said = fruitdask(tmp_path, "report", "copy").stdout.strip()
    assert Path(said) == (out / "report.html").resolve()
    page = (out / "report.html").read_text()
    assert lake["steps"]["refit"]["record"]["run_id"] in page and "<html" in page.lower()


@pytest.fixture(scope="module")
def model(lake) -> dict:
    """``train`` on the output (relative --features and --model-out, absolute --test-input)."""
    proc = fruitdask(lake["root"], "train", "--features", "out", "--test-input", str(lake["root"] / "Test"),
                     "--model-out", "model")
    return {"proc": proc, "dir": lake["root"] / "model", "photos": sorted(p.relative_to(lake["root"])
                                                                          for p in (lake["root"] / "Test").rglob("*.jpg"))}


def test_train_writes_a_bundle_and_its_accuracy(lake, model):
    said = last_json(model["proc"].stdout)
    report = json.loads((model["dir"] / "report.json").read_text())
    bundle = json.loads((model["dir"] / "bundle.json").read_text())
    assert said["model"] == "model" and (model["dir"] / "_SUCCESS").exists()
    assert said["accuracy"] == round(report["accuracy"], 4) and 0 <= said["accuracy"] <= 1
    assert said["n_test"] == len(model["photos"]) == report["n"]
    assert sorted(bundle["labels"]) == sorted({k.split("/")[0] for k in lake["keys"]})
    assert "held-out accuracy" in model["proc"].stderr


def test_predict_names_a_label_in_text_and_json(lake, model):
    photos = [str(p) for p in model["photos"][::2]]
    labels = set(json.loads((model["dir"] / "bundle.json").read_text())["labels"])
    text = fruitdask(lake["root"], "predict", *photos, "--model", "model").stdout.splitlines()
    assert len(text) == len(photos)
    top_text = {}
    for photo, line in zip(photos, text, strict=True):
        m = re.fullmatch(rf"{re.escape(photo)}: (.+)", line)
        assert m, line
        named = re.findall(r"(.+?) (\d\.\d{3})(?:, |$)", m.group(1))
        assert len(named) == 3 and {lab for lab, _ in named} <= labels, line
        top_text[photo] = named[0][0]
    doc = json.loads(fruitdask(lake["root"], "predict", *photos, "--model", str(model["dir"]), "--json").stdout)
    assert doc["model"] == str(model["dir"]) and [r["path"] for r in doc["results"]] == photos
    for r in doc["results"]:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert r["predictions"][0]["label"] == top_text[r["path"]]


def test_serve_answers_a_photo_then_stops_on_sigterm(lake, model, tmp_path):
    """``serve --model model`` (relative, from the output's folder): ready, a photo POSTed to
    /v1/predict gets a label of the model (the one ``predict`` gives), SIGTERM exits 0."""
    port, probe = free_port(), free_port()
    log = tmp_path / "serve.log"
    photo = model["photos"][0]
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "fruitdask", "serve", "--model", "model", "--port", str(port),
                                 "--probe-port", str(probe), "--threads", "2", "--drain-seconds", "0.5"],
                                cwd=lake["root"], env=ENV, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)])
    try:
        wait_ready({"port": port, "probe": probe, "proc": proc, "log": log, "seen": []}, timeout=180)
        status, body = post_image(port, (lake["root"] / photo).read_bytes())
        assert status == 200, body
        labels = set(json.loads((model["dir"] / "bundle.json").read_text())["labels"])
        assert body["predictions"][0]["label"] in labels and len(body["predictions"]) == 3
        assert call(port, "GET", "/v1/model")[0] == 200
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        assert time.monotonic() - started < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# --- bench ---------------------------------------------------------------------------------


def test_bench_smallest_size_writes_its_results(lake, tmp_path):
    """``bench`` at its smallest: 4 images at 32 px, the Dask engine once, no unpooled PCA."""
    proc = fruitdask(tmp_path, "bench", "--input", str(lake["root"] / "in"), "--images", "4", "--image-size", str(SMALL_SIZE),
                     "--backends", "dask", "--repeats", "1", "--no-unpooled-pca", "--precision", "float32",
                     "--workers", "1", "--out", "bench")
    rep = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert rep["images"] == 4 and rep["image_size"] == SMALL_SIZE and rep["precisions"] == ["float32"]
    dask = rep["results"]["float32"]["dask"]
    assert dask["ok_runs"] == 1 and dask["runs"][0]["images"] == 4 and dask["runs"][0]["wall_s"] > 0
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "| dask |" in md and md.strip() in proc.stdout
