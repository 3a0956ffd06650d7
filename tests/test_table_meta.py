"""What the table is and what the last run did live in the table itself (issue 31, items 1-4).

- the feature settings and the table format are the table's own metadata (its description),
  which survives a history pushed past any search depth and log cleanup; a table of a newer
  format is refused unchanged; a table from before is described in place, once;

Real runs of ``fruitdask run`` at 32 px with a seeded random weights file, on a LocalCluster
the module owns: set-ups run in-process (``cli.main``), the commands whose promise is checked
run as a user types them, in a subprocess from another folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED, SMALL_SIZE, copy_images
from PIL import Image, ImageOps

from fruitdask import cli
from fruitdask.lake import keys
from fruitdask.lake import table as delta

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(module_local_cluster):
    _, client = module_local_cluster(1, 2)
    return client


def run_args(cluster, data: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return ["run", "--input", str(data), "--output", str(out), "--cluster", cluster.scheduler.address,
            "--image-size", str(SMALL_SIZE), "--weights", str(weights), "--precision", "float32",
            "--partition-size", "4", "--quiet", *extra]


def run(cluster, data: Path, out: Path, weights: Path, *extra: str) -> int:
    return cli.main(run_args(cluster, data, out, weights, *extra))


def typed(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m fruitdask ARGS`` as a user types it, from ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "fruitdask", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


def push_history(out: Path, commits: int) -> None:
    """Other writers' commits (table property changes), then a checkpoint and a log cleanup
    that deletes every commit file before it: the first commits' commit info is gone."""
    from deltalake import DeltaTable

    dt = DeltaTable(str(out / "features"))
    dt.alter.set_table_properties({"delta.logRetentionDuration": "interval 0 seconds"})
    for i in range(commits):
        dt.alter.set_table_properties({"delta.checkpointInterval": str(100 + i)})
    dt.create_checkpoint()
    dt.cleanup_metadata()


def test_settings_survive_a_history_pushed_past_the_search_depth(tmp_path, cluster, weights_file):
    """Fails before this change: the settings lived only in commit info searched 50 commits
    deep, so after 55 other commits and a log cleanup a run with other settings was accepted
    and mixed its features into the table."""
    data = copy_images(BUNDLED, tmp_path / "in", 2, 2)
    out = tmp_path / "out"
    assert run(cluster, data, out, weights_file) == 0
    push_history(out, delta.HISTORY_DEPTH + 5)
    version = delta.load(str(out), {}).version()
    assert not any(e.get(delta.META_KEY) for e in delta.history(str(out), {})), "no fruitdask commit info is left"

    proc = typed(run_args(cluster, data, out, weights_file, "--pooling", "max"), tmp_path)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0], err
    assert "pooling avg in the table, max in this run" in err[0] and "image_size" not in err[0]
    assert "--output" in err[0] and "--rebuild" in err[0]
    assert delta.load(str(out), {}).version() == version, "nothing was committed"


def test_a_newer_format_table_is_refused_unchanged(tmp_path, cluster, weights_file):
    """Fails before this change: the table's format was written but never compared, so
    ``--rebuild`` rewrote a newer fruitdask's table in the older layout (the code before has
    no ``Description`` either: the test stops there)."""
    from deltalake import DeltaTable

    data = copy_images(BUNDLED, tmp_path / "in", 2, 2)
    out = tmp_path / "out"
    assert run(cluster, data, out, weights_file) == 0
    dt = DeltaTable(str(out / "features"))
    now = delta.Description.parse(dt.metadata().description)
    assert now is not None and now.format == keys.TABLE_FORMAT
    newer = delta.Description(keys.TABLE_FORMAT + 1, now.settings, now.feature_settings)
    dt.alter.set_table_description(newer.text())
    version, files = dt.version(), sorted(p.name for p in (out / "features").rglob("*") if p.is_file())

    for extra in ((), ("--rebuild",)):
        proc = typed(run_args(cluster, data, out, weights_file, *extra), tmp_path)
        assert proc.returncode == 1, proc.stderr
        assert "newer fruitdask" in proc.stderr and f"table format {keys.TABLE_FORMAT + 1}" in proc.stderr
        assert "upgrade fruitdask" in proc.stderr and "--rebuild" not in proc.stderr
    dt = DeltaTable(str(out / "features"))
    assert dt.version() == version and delta.Description.parse(dt.metadata().description) == newer
    assert sorted(p.name for p in (out / "features").rglob("*") if p.is_file()) == files


def test_a_table_from_before_is_described_in_place_once(tmp_path, cluster, weights_file):
    """A table whose settings are only in its commit info (as every table before this change):
    the next run moves them into the table's description in one metadata-only commit, once,
    and other settings are refused from then on, whatever the history. Fails before this
    change: no description was ever written."""
    from deltalake import DeltaTable

    data = copy_images(BUNDLED, tmp_path / "in", 2, 2)
    out = tmp_path / "out"
    assert run(cluster, data, out, weights_file) == 0
    dt = DeltaTable(str(out / "features"))
    expected = delta.Description.parse(dt.metadata().description)
    dt.alter.set_table_description("")  # what a table of the code before holds: no description
    assert delta.Description.parse(DeltaTable(str(out / "features")).metadata().description) is None

    proc = typed(run_args(cluster, data, out, weights_file), tmp_path)  # the same command as the first run
    assert proc.returncode == 0, proc.stderr
    dt = DeltaTable(str(out / "features"))
    assert delta.Description.parse(dt.metadata().description) == expected and dt.version() == 2
    assert json.loads(dt.history(1)[0][delta.META_KEY])["operation"] == "describe"
    assert run(cluster, data, out, weights_file) == 0
    assert DeltaTable(str(out / "features")).version() == 2, "described once"
    push_history(out, delta.HISTORY_DEPTH + 5)
    assert run(cluster, data, out, weights_file, "--image-size", "48") == 1


def _fit(path: Path):
    from fruitdask.reduce import Reduction

    return Reduction.from_npz(path.read_bytes())


def test_a_run_that_fails_after_its_commit_leaves_nothing_stale(tmp_path, cluster, weights_file, monkeypatch):
    """A refit whose publishing fails after its commit: ``train`` trains with the new fit (the
    one its rows name), ``report`` and ``table show`` name the new run, and the next ``run``
    (nothing to do) copies the new run's record and fit beside the table. Fails before this
    change: ``train`` bundled the stale ``reduction.npz`` of the run before."""
    from fruitdask import output

    data = copy_images(BUNDLED, tmp_path / "in", 2, 3)
    out = tmp_path / "out"
    assert run(cluster, data, out, weights_file) == 0
    old_fit, old_run = _fit(out / "reduction.npz"), json.loads((out / "run.json").read_text())["run_id"]
    for f in sorted(data.rglob("*.jpg")):  # twice the rows: the next run refits on all of them
        ImageOps.mirror(Image.open(f)).save(f.parent / f"mirror_{f.name}")

    def fails(record, target, pages):
        raise OSError("the disk filled up while publishing")

    monkeypatch.setattr(output, "publish", fails)
    assert run(cluster, data, out, weights_file) != 0
    monkeypatch.undo()
    last = delta.history(str(out), {}, 1)[0]
    new_run, new_fit_id = last[delta.META_KEY]["run_id"], last[delta.META_KEY]["pca_fit"]
    assert last["version"] == 1 and new_run != old_run
    assert json.loads((out / "run.json").read_text())["run_id"] == old_run, "the files beside the table are stale"
    new_fit = _fit(out / "pca" / f"{new_fit_id}.npz")
    assert new_fit.n_samples == 12 != old_fit.n_samples

    proc = typed(["train", "--features", str(out), "--test-input", str(data), "--model-out", "model", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    bundled = _fit(tmp_path / "model" / "reduction.npz")
    np.testing.assert_array_equal(bundled.components, new_fit.components)
    np.testing.assert_array_equal(bundled.mean, new_fit.mean)

    proc = typed(["report", str(out), "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    page = (out / "report.html").read_text()
    assert f"fruitdask run {new_run}" in page and old_run not in page.split("</title>")[0]
    proc = typed(["table", "show", str(out), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["version"] == 1 and shown["fruitdask"]["run_id"] == new_run and shown["pca_fits"] == [new_fit_id]
    assert "record" not in shown["fruitdask"]

    assert run(cluster, data, out, weights_file) == 0  # nothing to do: the new run's files are published
    doc = json.loads((out / "run.json").read_text())
    assert doc["run_id"] == new_run and doc["table"]["version_after"] == 1 and (out / "_SUCCESS").exists()
    np.testing.assert_array_equal(_fit(out / "reduction.npz").components, new_fit.components)
    assert delta.load(str(out), {}).version() == 1


def _table_file(state: delta.TableState, run_id: str) -> list[dict]:
    """One data file of one row, written under the table root as a run's task writes it."""
    import pyarrow as pa

    from fruitdask.lake import tasks
    from fruitdask.schema import TABLE_SCHEMA

    sink = tasks.Sink(state.url, run_id, "s", dict(state.storage_options))
    t = pa.table({"image_key": [f"A/{run_id}.jpg"], "path": [f"/{run_id}"], "label": ["A"], "source_version": ["1:1"],
                  "settings": ["s"], "run_id": [run_id], "featurized_at": pa.array([0], pa.timestamp("us", tz="UTC")),
                  "features": tasks._list_array(np.ones((1, 4), np.float32)),
                  "pca": tasks._list_array(np.ones((1, 2), np.float32)), "pca_fit": ["f"]}, schema=TABLE_SCHEMA)
    return [tasks.write_file(t, sink, f"part-{run_id}.parquet")]


@pytest.mark.integration
def test_credentials_that_expire_mid_run_do_not_fail_the_commit(s3, monkeypatch):
    """The table is opened with session credentials that expire (their key is deleted, IAM
    enforced by the moto server) before the commit; the chain then hands out fresh ones. The
    commit uses the fresh ones and lands. Fails before this change: delta-rs kept the frozen
    copy taken when the table was opened, and the commit was refused."""
    import s3fs
    from s3_server import isolate_aws_env

    s3.bucket("fruits-creds", "eu-west-1")
    out, so = "s3://fruits-creds/out", s3.storage_options
    first = delta.open_table(out, so)
    assert delta.commit(first, _table_file(first, "a"), [], {"run_id": "a"}, row_keys=keys.hash_keys(["A/a.jpg"])) == 0
    allow = [{"Effect": "Allow", "Action": "s3:*", "Resource": ["arn:aws:s3:::fruits-creds", "arn:aws:s3:::fruits-creds/*"]}]
    old_key, old_secret = s3.iam_user("session-1", allow)
    new_key, new_secret = s3.iam_user("session-2", allow)

    isolate_aws_env(monkeypatch, old_key, old_secret)
    s3fs.S3FileSystem.clear_instance_cache()
    state = _opened(out, so)  # a long run starts: the table is read with the first credentials
    adds = _table_file(state, "b")
    s3.client("iam").delete_access_key(UserName="session-1", AccessKeyId=old_key)  # they expire
    isolate_aws_env(monkeypatch, new_key, new_secret)  # the chain now hands out the next ones
    s3fs.S3FileSystem.clear_instance_cache()
    s3.enforce_iam()
    try:
        assert delta.commit(state, adds, [], {"run_id": "b"}, row_keys=keys.hash_keys(["A/a.jpg", "A/b.jpg"])) == 1
    finally:
        s3.enforce_iam(False)
    assert sorted(read_features_s3(out, so)["run_id"]) == ["a", "b"]


def _opened(out: str, so: dict) -> delta.TableState:
    """:func:`delta.open_table` but for the commit history (delta-rs's history listing never
    gets its answer from the moto server: a test-bed limit, not what this test checks)."""
    from deltalake import DeltaTable

    url = delta.table_url(out)
    dt = DeltaTable(delta._uri(url), storage_options=delta.delta_options(url, so))
    return delta.TableState(url, so, dt, description=delta.Description.parse(dt.metadata().description))


def read_features_s3(out: str, so: dict):
    return delta.load(out, so).to_pyarrow_dataset().to_table(columns=["run_id"]).to_pandas()
