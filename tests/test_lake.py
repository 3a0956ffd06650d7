"""The features table (issues 21 and 22): incremental runs, exactly once, the PCA as a
versioned model, settings refused, optimistic commits, bounded memory, exact PCA at d = 512.

Real runs of ``fruitdask run`` (in-process through ``cli.main``, or as a process where the
test needs one) on a LocalCluster of worker processes the module owns, at 32 px with a
seeded random weights file; the table is read back with deltalake.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import BUNDLED, SMALL_SIZE, copy_images, read_features
from PIL import Image, ImageOps

from fruitdask import cli
from fruitdask.errors import ConcurrentRunError
from fruitdask.lake import table as delta
from fruitdask.lake import update

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(module_local_cluster):
    _, client = module_local_cluster(1, 2)
    return client


def run(cluster, data: Path, out: Path, weights: Path, *extra: str) -> int:
    size = [] if "--image-size" in extra else ["--image-size", str(SMALL_SIZE)]
    return cli.main(["run", "--input", str(data), "--output", str(out), "--cluster", cluster.scheduler.address, *size,
                     "--weights", str(weights), "--precision", "float32", "--partition-size", "4", "--quiet", *extra])


def record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def grow(data: Path) -> dict:
    """2 new images, 1 changed in place, 1 deleted, 1 file that cannot be decoded."""
    apricots = sorted((data / "Apricot").glob("*.jpg"))
    for i, f in enumerate(apricots[:2]):
        ImageOps.mirror(Image.open(f)).save(data / "Apricot" / f"new_{i}.jpg")
    changed = apricots[2]
    ImageOps.flip(Image.open(changed)).save(changed)
    deleted = sorted((data / "Avocado").glob("*.jpg"))[0]
    deleted.unlink()
    (data / "Avocado" / "broken.jpg").write_bytes(b"not a jpeg")
    return {"changed": f"Apricot/{changed.name}", "deleted": f"Avocado/{deleted.name}"}


def current_keys(data: Path, skip=("broken.jpg",)) -> list[str]:
    return sorted(f"{p.parent.name}/{p.name}" for p in data.rglob("*.jpg") if p.name not in skip)


def test_runs_bring_the_table_up_to_date_exactly_once(tmp_path, cluster, weights_file):
    data = copy_images(BUNDLED, tmp_path / "in", 3, 4)
    out = tmp_path / "out"
    assert run(cluster, data, out, weights_file) == 0
    first = read_features(out)
    assert sorted(first["image_key"]) == current_keys(data)
    assert delta.load(str(out), {}).version() == 0
    doc1 = record(out)
    assert doc1["counts"]["added"] == 12 and doc1["table"]["refitted"] is True

    change = grow(data)
    assert run(cluster, data, out, weights_file) == 4  # success with a skipped file
    second = read_features(out)
    doc2 = record(out)
    assert delta.load(str(out), {}).version() == 1, "one run, one version"
    assert sorted(second["image_key"]) == current_keys(data), "exactly the current images, one row each"
    assert second["image_key"].is_unique
    c = doc2["counts"]
    assert (c["listed"], c["added"], c["updated"], c["removed"], c["unchanged"], c["featurized"]) == (14, 2, 1, 1, 10, 4)
    assert doc2["table"] == {**doc2["table"], "version_before": 0, "version_after": 1, "rows": 13, "refitted": False}
    # Unchanged rows are untouched: same run, same features, same fit.
    before = first.set_index("image_key")
    after = second.set_index("image_key")
    kept = [k for k in after.index if k in before.index and k != change["changed"]]
    assert (after.loc[kept, "run_id"] == before.loc[kept, "run_id"]).all()
    np.testing.assert_array_equal(np.stack(after.loc[kept, "features"].map(np.asarray)),
                                  np.stack(before.loc[kept, "features"].map(np.asarray)))
    assert set(second["pca_fit"]) == {doc1["table"]["pca_fit"]}, "every row's pca from the same fit"
    assert after.loc[change["changed"], "run_id"] == doc2["run_id"]
    errors = pd.read_parquet(out / "errors.parquet")
    assert list(errors["image_key"]) == ["Avocado/broken.jpg"] and list(errors["stage"]) == ["decode"]
    # Earlier records stay readable.
    assert (out / "runs" / doc1["run_id"] / "run.json").exists() and (out / "runs" / doc2["run_id"] / "report.html").exists()
    report = (out / "report.html").read_text()
    assert '"/counts/added"' in report and '"/counts/removed"' in report

    # Nothing changed: nothing to do, nothing written; the unchanged broken file is reported, not retried.
    mtime = (out / "run.json").stat().st_mtime_ns
    assert run(cluster, data, out, weights_file) == 0
    assert delta.load(str(out), {}).version() == 1 and (out / "run.json").stat().st_mtime_ns == mtime

    # The broken file fixed: retried, added; its error row gone.
    shutil.copy2(sorted((data / "Avocado").glob("*.jpg"))[0], data / "Avocado" / "broken.jpg")
    assert run(cluster, data, out, weights_file) == 0
    assert "Avocado/broken.jpg" in set(read_features(out)["image_key"])
    assert len(pd.read_parquet(out / "errors.parquet")) == 0
    # Time travel: version 0 is still the first run's table.
    assert sorted(read_features(out, version=0)["image_key"]) == sorted(first["image_key"])


def test_keep_deleted_keeps_rows_of_gone_images(tmp_path, cluster, weights_file):
    data = copy_images(BUNDLED, tmp_path / "in", 2, 3)
    out = tmp_path / "out"
    assert run(cluster, data, out, weights_file) == 0
    gone = sorted((data / "Apricot").glob("*.jpg"))[0]
    gone.unlink()
    ImageOps.mirror(Image.open(sorted((data / "Avocado").glob("*.jpg"))[0])).save(data / "Avocado" / "new.jpg")
    assert run(cluster, data, out, weights_file, "--keep-deleted") == 0
    keys = set(read_features(out)["image_key"])
    assert f"Apricot/{gone.name}" in keys and "Avocado/new.jpg" in keys and record(out)["counts"]["removed"] == 0


def test_other_settings_are_refused_in_one_line_and_rebuild_replaces(tmp_path, cluster, weights_file, capsys):
    data = copy_images(BUNDLED, tmp_path / "in", 2, 2)
    out = tmp_path / "out"
    assert run(cluster, data, out, weights_file) == 0
    capsys.readouterr()
    assert run(cluster, data, out, weights_file, "--pooling", "max") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "--rebuild" in err[0] and "--output" in err[0]
    assert delta.load(str(out), {}).version() == 0
    assert run(cluster, data, out, weights_file, "--pooling", "max", "--rebuild") == 0
    df = read_features(out)
    assert delta.load(str(out), {}).version() == 1 and len(df) == 4 and df["run_id"].nunique() == 1


def test_refit_reprojects_every_row_in_the_same_commit(tmp_path, cluster, weights_file):
    data = copy_images(BUNDLED, tmp_path / "in", 3, 3)
    out = tmp_path / "out"
    assert run(cluster, data, out, weights_file) == 0
    fit1 = record(out)["table"]["pca_fit"]
    assert run(cluster, data, out, weights_file, "--refit") == 0
    doc = record(out)
    df = read_features(out)
    assert doc["table"]["refitted"] and doc["table"]["pca_fit"] != fit1 and set(df["pca_fit"]) == {doc["table"]["pca_fit"]}
    assert doc["counts"]["featurized"] == 0, "a refit re-projects, it does not featurize"
    assert (out / "pca" / f"{fit1}.npz").exists() and (out / "pca" / f"{doc['table']['pca_fit']}.npz").exists()
    # Growth past twice the rows of the last fit refits by itself.
    for label in sorted(p for p in data.iterdir() if p.is_dir()):
        for f in sorted(label.glob("*.jpg")):
            ImageOps.flip(Image.open(f)).save(label / f"flip_{f.name}")
            ImageOps.mirror(Image.open(f)).save(label / f"mirror_{f.name}")
    assert run(cluster, data, out, weights_file) == 0
    doc = record(out)
    assert doc["table"]["refitted"] and doc["reduction"]["n_samples"] == 27 == len(read_features(out))


def test_concurrent_commits_one_wins_the_other_fails_cleanly(tmp_path):
    """Two writers that read the same version: one commits, the other gets a clear error
    and the table holds the winner's rows only (no image added twice)."""
    import pyarrow as pa

    from fruitdask.lake import tasks
    from fruitdask.lake.keys import hash_keys
    from fruitdask.schema import TABLE_SCHEMA

    out = tmp_path / "out"

    def files(state, name: str) -> list[dict]:
        sink = tasks.Sink(delta.table_url(str(out)), name, "s", {})
        t = pa.table({"image_key": [f"A/{name}.jpg"], "path": ["/x"], "label": ["A"], "source_version": ["1:1"], "settings": ["s"],
                      "run_id": [name], "featurized_at": pa.array([0], pa.timestamp("us", tz="UTC")),
                      "features": tasks._list_array(np.ones((1, 4), np.float32)),
                      "pca": tasks._list_array(np.ones((1, 2), np.float32)), "pca_fit": ["f"]}, schema=TABLE_SCHEMA)
        return [tasks.write_file(t, sink, f"part-{name}.parquet")]

    empty_a, empty_b = delta.open_table(str(out), {}), delta.open_table(str(out), {})
    assert delta.commit(empty_a, files(empty_a, "a"), [], {"run_id": "a"}, row_keys=hash_keys(["A/a.jpg"])) == 0
    with pytest.raises(ConcurrentRunError, match="another run committed"):
        delta.commit(empty_b, files(empty_b, "b"), [], {"run_id": "b"}, row_keys=hash_keys(["A/b.jpg"]))
    v0_a, v0_b = delta.open_table(str(out), {}), delta.open_table(str(out), {})
    assert delta.commit(v0_a, files(v0_a, "c"), [], {"run_id": "c"}, row_keys=hash_keys(["A/a.jpg", "A/c.jpg"])) == 1
    with pytest.raises(ConcurrentRunError):
        delta.commit(v0_b, files(v0_b, "d"), [], {"run_id": "d"}, row_keys=hash_keys(["A/a.jpg", "A/d.jpg"]))
    df = read_features(out)
    assert sorted(df["run_id"]) == ["a", "c"] and delta.load(str(out), {}).version() == 1


def test_nothing_to_do_exits_fast_without_tensorflow_or_a_cluster(tmp_path, cluster, weights_file):
    data = copy_images(BUNDLED, tmp_path / "in", 2, 2)
    out = tmp_path / "out"
    assert run(cluster, data, out, weights_file) == 0
    code = ("import sys, json; from fruitdask import cli; rc = cli.main(sys.argv[1:]); "
            "print(json.dumps({'rc': rc, 'tf': 'tensorflow' in sys.modules, 'dask': 'distributed' in sys.modules}))")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "run", "--input", str(data), "--output", str(out), "--image-size",
                           str(SMALL_SIZE), "--weights", str(weights_file), "--precision", "float32"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[0]) == {"output": str(out), "up_to_date": True, "version": 0}
    assert json.loads(lines[-1]) == {"rc": 0, "tf": False, "dask": False}
    assert "up to date" in proc.stderr
    assert seconds < 30  # a generous bound on a loaded CI machine; the benchmark measures it (about 1 s)


def test_a_weights_file_the_table_knows_is_hashed_not_parsed(tmp_path, cluster, weights_file, monkeypatch):
    """An update with the very weights file the table was written with decides from its sha256
    alone; other bytes (here: a byte appended, same arrays) are parsed again, then compared."""
    from fruitdask.features import weights_file as wf

    data = copy_images(BUNDLED, tmp_path / "in", 2, 2)
    out, weights = tmp_path / "out", tmp_path / "vgg16.weights.h5"
    shutil.copyfile(weights_file, weights)
    assert run(cluster, data, out, weights) == 0
    assert delta.history(str(out), {}, 1)[0][delta.META_KEY]["feature_settings"]["weights_file_sha256"]
    parsed = []
    real = wf.read_h5
    monkeypatch.setattr(wf, "read_h5", lambda source: parsed.append(source) or real(source))
    assert run(cluster, data, out, weights) == 0
    assert record(out)["table"]["version_after"] == 0 and parsed == []  # up to date, file never parsed
    with open(weights, "ab") as f:
        f.write(b"\0")
    assert run(cluster, data, out, weights) == 0
    assert len(parsed) == 1 and delta.load(str(out), {}).version() == 0  # parsed, same arrays: still up to date


def test_small_files_are_merged_in_the_runs_one_commit(tmp_path, cluster, weights_file, monkeypatch):
    """Past MERGE_AFTER_FILES small files, an update merges them on the workers into one file,
    in its one commit: same rows, one file, none of its merged-away files left behind."""
    monkeypatch.setattr(update, "MERGE_AFTER_FILES", 4)
    data = copy_images(BUNDLED, tmp_path / "in", 3, 4)
    out = tmp_path / "out"
    assert run(cluster, data, out, weights_file) == 0  # 12 images, partitions of 4: 3 files (a fit: no merge)
    assert len(delta.load(str(out), {}).file_uris()) == 3
    before = read_features(out).set_index("image_key")
    changed = grow(data)["changed"]
    assert run(cluster, data, out, weights_file) == 4  # 2 files rewritten, 1 kept, 1 new: 4 small files
    dt = delta.load(str(out), {})
    doc = record(out)
    assert dt.version() == 1 and len(dt.file_uris()) == 1 and doc["table"]["files_added"] == 1
    df = read_features(out)
    assert df["image_key"].is_unique and sorted(df["image_key"]) == current_keys(data)
    assert doc["table"]["rows"] == len(df) == int(dt.get_add_actions(flatten=True).column("num_records")[0].as_py())
    same = sorted(set(before.index) & set(df["image_key"]) - {changed})
    after = df.set_index("image_key")
    for key in same:  # rows moved, not recomputed
        np.testing.assert_array_equal(np.asarray(after.loc[key, "features"]), np.asarray(before.loc[key, "features"]))
    mine = sorted(p.name for p in (out / "features").glob(f"part-{doc['run_id']}-*.parquet"))
    assert mine == [dt.file_uris()[0].rsplit("/", 1)[-1]]  # the merged-away files of this run are gone


def test_files_losing_rows_are_rewritten_beside_the_featurization(tmp_path, cluster, weights_file, monkeypatch):
    """Without a refit, the files that lose rows do not wait for the featurization: their
    rewrite is queued behind it (background priority) from another thread while it runs."""
    from fruitdask.backends.dask.backend import DaskBackend

    data = copy_images(BUNDLED, tmp_path / "in", 3, 4)
    out = tmp_path / "out"
    assert run(cluster, data, out, weights_file) == 0
    before = read_features(out).set_index("image_key")
    queued, waited = threading.Event(), []
    calls: list[bool] = []
    real_map, real_featurize = DaskBackend.map_tasks, DaskBackend.featurize_parts

    def map_tasks(self, fn, args_list, *, background=False):
        if fn.__name__ == "rewrite_file":
            calls.append(background)
            queued.set()
        return real_map(self, fn, args_list, background=background)

    def featurize_parts(self, *args):
        waited.append(queued.wait(60))  # a rewrite queued only after the featurization never comes
        return real_featurize(self, *args)

    monkeypatch.setattr(DaskBackend, "map_tasks", map_tasks)
    monkeypatch.setattr(DaskBackend, "featurize_parts", featurize_parts)
    change = grow(data)
    assert run(cluster, data, out, weights_file) == 4
    assert waited == [True] and calls == [True]
    df = read_features(out)
    assert df["image_key"].is_unique and sorted(df["image_key"]) == current_keys(data)
    after = df.set_index("image_key")
    for key in sorted(set(before.index) & set(after.index) - {change["changed"]}):
        np.testing.assert_array_equal(np.asarray(after.loc[key, "features"]), np.asarray(before.loc[key, "features"]))
    assert record(out)["table"]["files_removed"] >= 2  # the changed and the deleted image's files


def test_workers_never_hold_all_features(tmp_path, cluster, weights_file):
    """Sampled during a run, the bytes the workers hold (the PCA moments aside: ``d x d``
    each, a few fan-ins' worth whatever the number of images) stay under two partitions'
    worth of features: each partition's features go to storage as its task ends."""
    data = copy_images(BUNDLED, tmp_path / "in", 12, 8)  # 96 images, 24 partitions of 4
    out = tmp_path / "out"
    peak, stop = [0], threading.Event()

    def held(dask_worker):
        return sum(ts.nbytes for ts in dask_worker.state.tasks.values()
                   if ts.state == "memory" and not any(n in str(ts.key) for n in ("moments_part", "moments_file", "merge_all")))

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], sum(cluster.run(held).values()))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        assert run(cluster, data, out, weights_file, "--pooling", "none", "--image-size", "64") == 0
    finally:
        stop.set()
        sampler.join()
    per_partition = 4 * 2048 * 4  # 4 images x 2,048 features (64 px, no pooling: 2 x 2 x 512) x float32
    all_features = 96 * 2048 * 4
    assert len(read_features(out)) == 96
    assert 0 < peak[0] < 2 * per_partition + 16 * 2**10, f"workers held {peak[0]} bytes (all features: {all_features})"


def test_features_wider_than_the_moments_go_to_the_backends_wide_fit(tmp_path, cluster, weights_file, monkeypatch):
    """96 px unpooled: 3 x 3 x 512 = 4,608 features per image, over the moments' limit. The
    update reads the staged partitions off their typed receipts and hands them, with their
    row counts, to the backend's ``fit_wide`` (DaskBackend declares ``supports_wide_fit``);
    every row is then projected with that fit."""
    from fruitdask.backends.dask.backend import DaskBackend
    from fruitdask.pca_moments import MAX_MOMENT_FEATURES

    calls: list[list[tuple[int, int]]] = []
    real = DaskBackend.fit_wide

    def fit_wide(self, staged, *args):
        calls.append(list(staged))
        return real(self, staged, *args)

    monkeypatch.setattr(DaskBackend, "fit_wide", fit_wide)
    data = copy_images(BUNDLED, tmp_path / "in", 2, 4)
    out = tmp_path / "out"
    assert run(cluster, data, out, weights_file, "--pooling", "none", "--image-size", "96") == 0
    assert len(calls) == 1 and sum(n for _, n in calls[0]) == 8
    assert sorted(i for i, _ in calls[0]) == list(range(len(calls[0])))
    df = read_features(out)
    assert len(df) == 8 and {len(f) for f in df["features"]} == {3 * 3 * 512} and 3 * 3 * 512 > MAX_MOMENT_FEATURES
    rec = record(out)
    assert "moments" not in rec["reduction"]["method"] and rec["table"]["pca_fit"] == df["pca_fit"].iloc[0]


def test_exact_pca_from_moments_matches_scikit_learn_at_d_512():
    from sklearn.decomposition import PCA

    from fruitdask.pca_moments import Moments, fit, merge_all

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3000, 64)) @ rng.normal(size=(64, 512)) + rng.normal(size=(3000, 512)) * 0.1 + 3).astype(np.float32)
    parts = [Moments.of(x[i : i + 97]) for i in range(0, len(x), 97)]
    red = fit(merge_all(parts), components=None, variance=0.9)
    z = (x.astype(np.float64) - x.mean(0)) / x.astype(np.float64).std(0)
    ref = PCA(n_components=red.k, svd_solver="full").fit(z)
    np.testing.assert_allclose(red.explained_variance_ratio[: red.k], ref.explained_variance_ratio_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.abs(red.transform(x)), np.abs(ref.transform(z)), rtol=1e-3, atol=1e-3)
    assert red.k == int(np.searchsorted(np.cumsum(PCA().fit(z).explained_variance_ratio_), 0.9) + 1)


def test_streaming_pca_at_d_25088_on_a_small_n():
    """The wide path (IncrementalPCA over batches, no Gram matrix) against exact PCA."""
    import dask.array as da
    from sklearn.decomposition import PCA

    from fruitdask.pca_streamed import fit_incremental_pca

    rng = np.random.default_rng(1)
    x = (rng.normal(size=(160, 8)) @ rng.normal(size=(8, 25088)) + rng.normal(size=(160, 25088)) * 0.01).astype(np.float32)
    X = da.from_array(x, chunks=(40, 25088))
    red = fit_incremental_pca(X, components=None, variance=0.9, batch_size=80, gram_max_samples=50)
    assert "IncrementalPCA" in red.method
    z = (x.astype(np.float64) - x.mean(0)) / x.astype(np.float64).std(0)
    ref = PCA(n_components=red.k, svd_solver="full").fit(z)
    assert red.k == int(np.searchsorted(np.cumsum(PCA(n_components=20).fit(z).explained_variance_ratio_), 0.9) + 1)
    np.testing.assert_allclose(red.explained_variance_ratio[: red.k], ref.explained_variance_ratio_, rtol=1e-3)


def test_keys_are_the_same_from_a_relative_or_an_absolute_input(tmp_path, monkeypatch):
    """``--input in`` from its parent folder keys ``Label/name`` like ``--input /abs/in``.
    Before the fix a relative root never prefixed the listing's absolute paths: every key was
    the bare file name, and images of two labels with the same name (Fruits-360 numbers
    frames per label: ``Apricot/105_100.jpg``, ``Cherry 1/105_100.jpg``) collapsed into one row."""
    from fruitdask.lake import plan

    data = tmp_path / "in"
    for label in ("Apricot", "Cherry 1"):
        (data / label).mkdir(parents=True)
        shutil.copy2(sorted((BUNDLED / "Apricot").glob("*.jpg"))[0], data / label / "105_100.jpg")
    monkeypatch.chdir(tmp_path)
    keyed = {}
    for root in ("in", str(data), "./in/"):
        with plan.spill_dir() as spill:
            listed = plan.list_input(root, None, None, spill, "r")
            keyed[root] = sorted(pd.read_parquet(listed.spill)["image_key"])
    assert keyed["in"] == keyed[str(data)] == keyed["./in/"] == ["Apricot/105_100.jpg", "Cherry 1/105_100.jpg"]
