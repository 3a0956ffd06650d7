"""The featurization settings as one value: built from the run config, picklable, the
checkpoint and table fingerprints it gives (unchanged from the fingerprints of earlier runs),
its one serialization and its one compatibility rule."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pandas as pd
import pytest
from conftest import REPO, SMALL_SIZE, copy_images

from fruitdask import checkpoint
from fruitdask.backends.dask import preload
from fruitdask.config import build_config
from fruitdask.features import frames
from fruitdask.features.settings import FeatureSettings, differences
from fruitdask.lake import keys
from fruitdask.lake import table as delta
from fruitdask.schema import SKIPPED_COLUMNS
from fruitdask.storage.options import storage_options


def test_from_config_round_trips_through_pickle():
    cfg = build_config({"input": "i", "output": "o", "image_size": 64, "pooling": "max", "batch_size": 16, "precision": "float32"},
                       {"AWS_ENDPOINT_URL": "http://127.0.0.1:5555"})
    s = FeatureSettings.from_config(cfg, "abc")
    assert (s.weights_key, s.image_size, s.pooling, s.batch_size, s.precision) == ("abc", 64, "max", 16, "float32")
    assert s.storage_options == storage_options(cfg.storage)
    back = pickle.loads(pickle.dumps(s))
    assert back == s and back.storage_options == s.storage_options


def test_fingerprint_is_the_one_of_earlier_runs():
    # Values computed by the fingerprint(weights_key, image_size, pooling, batch_size, precision)
    # of fruitdask before the settings value existed: existing checkpoints stay found.
    assert checkpoint.fingerprint(FeatureSettings("w", 32, "avg", 8)) == "6492ed0ef7c815c1"
    assert checkpoint.fingerprint(FeatureSettings("w", 32, "avg", 8, "bfloat16")) == "d1da1fb252af26f4"
    # Where the images are read from does not change the features.
    assert checkpoint.fingerprint(FeatureSettings("w", 32, "avg", 8, storage_options={"anon": True})) == "6492ed0ef7c815c1"


def test_table_fingerprint_is_the_one_of_earlier_runs():
    # sha256("table-v1|w|32|avg|float32")[:16], the recipe of fruitdask 0.1.0's tables: a
    # tensorflow runtime without calibration adds nothing, so no table's fingerprint moves.
    assert keys.settings_fingerprint(FeatureSettings("w", 32, "avg", 8)) == "c1731a71700a141d"
    assert keys.settings_fingerprint(FeatureSettings("w", 32, "avg", 64)) == "c1731a71700a141d"  # batch size left out
    other_runtime = FeatureSettings("w", 32, "avg", 8, runtime="openvino")
    calibrated = FeatureSettings("w", 32, "avg", 8, runtime="openvino", calibration="c0ffee")
    fps = {keys.settings_fingerprint(s) for s in (FeatureSettings("w", 32, "avg", 8), other_runtime, calibrated)}
    assert len(fps) == 3
    cps = {checkpoint.fingerprint(s) for s in (FeatureSettings("w", 32, "avg", 8), other_runtime, calibrated)}
    assert len(cps) == 3


def test_batch_size_differs_compatible_image_size_differs_not():
    table = FeatureSettings("w", 32, "avg", 8, storage_options={"anon": True})
    assert differences(table, FeatureSettings("w", 32, "avg", 64)) == []  # nor do storage options count
    (diff,) = differences(table, FeatureSettings("w", 64, "avg", 8))
    assert (diff.field, diff.expected, diff.given) == ("image_size", 32, 64)
    assert diff.reason("model") == "image size 64 (model: 32)"
    assert diff.between("in the table", "in this run") == "image_size 32 in the table, 64 in this run"


def test_runtime_precision_and_calibration_make_settings_incompatible():
    base = FeatureSettings("a" * 64, 32, "avg", 8)
    given = FeatureSettings("b" * 64, 32, "max", 8, "bfloat16", runtime="openvino", calibration="c0ffee")
    assert [d.field for d in differences(base, given)] == ["pooling", "weights_sha256", "precision", "runtime", "calibration"]
    reasons = [d.reason("model") for d in differences(base, given)]
    assert reasons[:2] == ["pooling 'max' (model: 'avg')", f"weights sha256 {'b' * 12}… (model: {'a' * 12}…)"]
    assert reasons[3:] == ["runtime openvino (model: tensorflow)", "calibration c0ffee (model: None)"]


def test_one_serialization_round_trips_and_reads_older_documents():
    s = FeatureSettings("w", 32, "max", 8, "bfloat16", {"anon": True}, runtime="openvino", calibration="c0ffee")
    assert s.to_dict() == {"weights_sha256": "w", "image_size": 32, "pooling": "max", "batch_size": 8, "precision": "bfloat16",
                           "runtime": "openvino", "calibration": "c0ffee"}
    assert FeatureSettings.from_dict(s.to_dict()) == s and FeatureSettings.from_json(s.to_json()) == s
    # A table description of fruitdask 0.1.0: no batch size, runtime nor calibration.
    old = FeatureSettings.from_dict({"image_size": 32, "pooling": "avg", "weights_sha256": "w", "precision": "float32",
                                     "weights": "random", "seed": 0}, batch_size=16)
    assert old == FeatureSettings("w", 32, "avg", 16) and (old.runtime, old.calibration) == ("tensorflow", None)


def test_split_rows_separates_good_rows_and_errors():
    df = pd.DataFrame({"path": ["a", "b", "c"], "label": ["L", "L", "M"], "features": [[1.0], None, [2.0]],
                       "error_stage": [None, "decode", None], "error_reason": [None, "not an image", None]})
    good, errors = frames.split_rows(df)
    assert list(good.columns) == ["path", "label", "features"] and list(good["path"]) == ["a", "c"]
    assert list(errors.columns) == SKIPPED_COLUMNS
    assert errors.to_dict(orient="records") == [{"path": "b", "label": "L", "stage": "decode", "reason": "not an image"}]


def test_spark_featurizes_with_the_shared_partition_function(monkeypatch, tmp_path):
    """Spark's executor body hands its manifest partition to the very function every backend
    uses, with the broadcast weights and the settings, and reports the rows it featurized."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fruitdask import checkpoint
    from fruitdask.backends.spark import backend as spark_backend
    from fruitdask.features import featurize
    from fruitdask.lake import tasks
    from fruitdask.schema import MANIFEST_SCHEMA

    seen = []

    def fake(df, weights, settings, *, threads=None, contents=None):
        seen.append((list(df["path"]), settings, threads, weights))
        return frames.assemble(df, featurize.BatchResult(np.ones((len(df), 2), np.float32), list(range(len(df)))), {})

    class Broadcast:
        value = "weights"

    class Accumulator:
        value = 0

        def add(self, n):
            self.value += n

    monkeypatch.setattr(frames, "featurize_frame", fake)
    settings = FeatureSettings("k", 32, "avg", 4)
    url = str(tmp_path / "m.parquet")
    pq.write_table(pa.table([["a", "b"], ["L", "L"], ["L/a", "L/b"], ["1:1", "1:1"], ["added", "added"]], schema=MANIFEST_SCHEMA), url)
    acc = Accumulator()
    weights = spark_backend.BroadcastWeights(Broadcast(), "k")
    job = tasks.FeaturizeJob(weights, settings, checkpoint.Checkpoints(str(tmp_path / "c"), False, {}),
                             tasks.Sink(str(tmp_path / "t"), "r", "s", {}), None)
    out = spark_backend.featurize_index(0, url, job, 3, acc)
    assert seen == [(["a", "b"], settings, 3, weights)] and weights.load() == "weights"
    assert [(r.kind, r.rows) for r in out] == [(tasks.ReceiptKind.STAGED, 2)] and acc.value == 2


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_and_its_model_record_the_same_settings(bundled_sample, tmp_path):
    """The table's description, ``run.json``'s ``features`` and the bundle's ``preprocessing``
    of one small run are one serialization of one value, as typed by a user (``run`` then
    ``train``, in subprocesses, from ``tmp_path``). Fails before the value had one
    serialization: ``run.json`` had no ``features``, the table's description no batch size."""
    copy_images(bundled_sample, tmp_path / "imgs", labels=2, per_label=6)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for argv in (["run", "--input", "imgs", "--output", "out", "--image-size", str(SMALL_SIZE), "--weights", "random",
                  "--seed", "0", "--precision", "float32", "--batch-size", "3", "--workers", "1",
                  "--threads-per-worker", "2", "--quiet"],
                 ["train", "--features", "out", "--test-features", "out", "--model-out", "model", "--quiet"]):
        proc = subprocess.run([sys.executable, "-m", "fruitdask", *argv], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
    recorded = json.loads((tmp_path / "out" / "run.json").read_text())["features"]
    assert recorded == {"weights_sha256": recorded["weights_sha256"], "image_size": SMALL_SIZE, "pooling": "avg",
                        "batch_size": 3, "precision": "float32", "runtime": "tensorflow", "calibration": None}
    assert len(recorded["weights_sha256"]) == 64
    described = delta.open_table(str(tmp_path / "out"), {}).description
    assert described is not None and {k: described.feature_settings[k] for k in recorded} == recorded
    assert described.settings == keys.settings_fingerprint(FeatureSettings.from_dict(recorded))
    bundle = json.loads((tmp_path / "model" / "bundle.json").read_text())["preprocessing"]
    assert {k: bundle[k] for k in recorded} == recorded
    # The workers' preload carries the same dict.
    settings = FeatureSettings.from_dict(recorded)
    assert json.loads(preload.argv(settings)[1]) == recorded
