"""End to end on the real bundled sample, through a real LocalCluster of worker processes.

One run (session fixture) on a cluster the test owns, then checks: rows and labels, Parquet
types (numbers, not strings), parity with a plain single-process Keras run, PCA accuracy
against scikit-learn's exact PCA, weights built once per worker, no large-graph warning.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import SMALL_SIZE, read_features
from PIL import Image
from runtime_doubles import count_calls, model_calls, prepare_counts

from fruitdask import cli
from fruitdask.features import model
from fruitdask.lake import table as delta
from fruitdask.reduce import Reduction

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(module_local_cluster):
    # Default Dask configuration (Active Memory Manager on), as on most shared clusters.
    _, client = module_local_cluster(2, 1)
    client.run(count_calls)  # the test double's counters, in each worker process
    return client


@pytest.fixture(scope="module")
def run_output(tmp_path_factory, cluster, bundled_sample, weights_file):
    out = tmp_path_factory.mktemp("run") / "out"
    args = ["run", "--input", str(bundled_sample), "--output", str(out), "--cluster", cluster.scheduler.address,
            "--image-size", str(SMALL_SIZE), "--weights", str(weights_file), "--partition-size", "10", "--precision", "float32", "--quiet"]
    handler = _ListHandler()
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = cli.main(args)
    finally:
        logging.getLogger().removeHandler(handler)
    assert code == 0
    messages = [str(w.message) for w in caught] + handler.messages
    return out, messages


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _expected_rows(root: Path) -> pd.DataFrame:
    rows = [(str(p), p.parent.name) for p in sorted(root.rglob("*.jpg"))]
    return pd.DataFrame(rows, columns=["path", "label"]).sort_values("path").reset_index(drop=True)


def test_output_has_one_row_per_image_with_the_folder_label(run_output, bundled_sample):
    out, _ = run_output
    assert (out / "_SUCCESS").exists()
    df = read_features(out, arrow=False).sort_values("path").reset_index(drop=True)
    expected = _expected_rows(bundled_sample)
    assert len(df) == len(expected) == 120
    assert df["path"].is_unique
    pd.testing.assert_frame_equal(df[["path", "label"]].astype(str), expected.astype(str))
    assert set(df["label"]) >= {"Cherry 1", "Grape Blue", "Tomato 1"}  # labels with spaces survive


def test_features_are_numbers_for_pandas_and_pyarrow(run_output):
    out, _ = run_output
    dataset = delta.load(str(out), {}).to_pyarrow_dataset()
    schema = dataset.schema
    assert schema.field("features").type == pa.list_(pa.float32())
    assert schema.field("pca").type == pa.list_(pa.float32())
    df = read_features(out, arrow=False)
    first = df["features"].iloc[0]
    assert isinstance(first, np.ndarray) and first.dtype == np.float32 and first.shape == (512,)
    table = dataset.to_table()
    flat = table.column("features").combine_chunks().flatten().to_numpy()
    assert flat.dtype == np.float32 and len(flat) == 120 * 512


def test_features_match_a_plain_single_process_keras_run(run_output, weights_file):
    import keras
    from keras.applications.vgg16 import preprocess_input

    out, _ = run_output
    df = read_features(out, arrow=False).sort_values("path")
    vgg = keras.applications.VGG16(weights=None, include_top=False, input_shape=(SMALL_SIZE, SMALL_SIZE, 3))
    vgg.load_weights(str(weights_file))
    images = [
        np.asarray(Image.open(p).convert("RGB").resize((SMALL_SIZE, SMALL_SIZE), Image.Resampling.BICUBIC), dtype=np.float32)
        for p in df["path"]
    ]
    reference = vgg.predict(preprocess_input(np.stack(images)), verbose=0).mean(axis=(1, 2))
    ours = np.stack(df["features"].to_numpy())
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_pca_matches_sklearn_exact_pca(run_output):
    from sklearn.decomposition import PCA

    out, _ = run_output
    run = json.loads((out / "run.json").read_text())
    red = Reduction.from_npz((out / "reduction.npz").read_bytes())
    df = read_features(out, arrow=False)
    x = np.stack(df["features"].to_numpy()).astype(np.float64)
    std = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)
    exact = PCA().fit(z)
    n = len(red.explained_variance_ratio)
    np.testing.assert_allclose(red.explained_variance_ratio, exact.explained_variance_ratio_[:n], atol=1e-3)
    k = run["reduction"]["k"]
    assert np.cumsum(exact.explained_variance_ratio_)[k - 1] >= 0.95 - 1e-3
    assert k == 1 or np.cumsum(exact.explained_variance_ratio_)[k - 2] < 0.95 + 1e-3
    pca = np.stack(df["pca"].to_numpy())
    assert pca.shape == (120, k)
    np.testing.assert_allclose(np.abs(pca), np.abs(exact.transform(z)[:, :k]), atol=2e-3 * np.abs(pca).max())


def test_run_json_records_the_run(run_output, weights_file):
    out, _ = run_output
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"images_listed": 120, "labels": 12, "rows_written": 120, "errors": 0, "listed": 120, "added": 120, "updated": 0, "removed": 0, "unchanged": 0, "featurized": 120}
    assert run["per_label"]["Cherry 1"] == 10
    assert run["weights"]["kind"] == "file" and run["weights"]["random"] is False
    assert set(run["timings_s"]) >= {"listing", "weights", "startup", "broadcast", "featurize", "pca", "write"}
    assert run["images_per_second"]["featurize"] > 0
    assert run["cluster"]["n_workers"] == 2
    assert run["reduction"]["variance_reached"] >= 0.95
    for name in ("scree.png", "reduction.npz", "errors.parquet", "dask-report.html"):
        assert (out / name).stat().st_size > 0
    assert (out / "scree.png").read_bytes()[:4] == b"\x89PNG"


def test_weights_reach_each_worker_once(run_output, cluster):
    """12 partitions on 2 workers, AMM on: each worker that featurized read the weights file
    once and gave them to one model (nothing is scattered, so nothing travels again)."""
    out, _ = run_output
    run = json.loads((out / "run.json").read_text())
    key = run["weights"]["sha256"]
    builds = cluster.run(prepare_counts)
    loads = cluster.run(model.load_counts)
    calls = cluster.run(model_calls)
    warm = cluster.run(model.warm_counts)
    assert len(builds) == len(loads) == 2
    assert sum(c.get("images", 0) for c in calls.values()) == 120
    for w in builds:
        # A worker whose warm-up took long may see every partition done by the other one.
        used = 1 if calls[w].get("images", 0) else 0
        assert builds[w].get(key, 0) == loads[w].get(key, 0) == used, (builds, loads, calls)
        # Its graph was built by the warm-up sent when the cluster came up (while the client
        # listed and read the weights); the model then only received the weights.
        assert warm[w].get("built") == 1 and warm[w].get("used", 0) == used, warm
    assert run["extra"]["weights_loads"] == {w: c.get(key, 0) for w, c in loads.items()}
    assert not [p for p in out.rglob("*") if "_fruitdask" in p.parts], "the run's internal files reached the output"


def test_no_large_graph_warning(run_output):
    _, messages = run_output
    assert not [m for m in messages if "large graph" in m.lower()]
