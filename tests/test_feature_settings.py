"""The featurization settings as one value: built from the run config, picklable, and the
checkpoint fingerprint it gives (unchanged from the fingerprints of earlier runs)."""

from __future__ import annotations

import pickle

import pandas as pd

from fruitdask import checkpoint
from fruitdask.classifier.bundle import FeatureSpec
from fruitdask.config import build_config
from fruitdask.features import frames
from fruitdask.features.settings import FeatureSettings
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


def test_bundle_spec_and_settings_convert_both_ways():
    s = FeatureSettings("w", 32, "avg", 8, "bfloat16", {"anon": True})
    spec = FeatureSpec.of(s)
    assert spec == FeatureSpec("w", 32, "avg", "bfloat16")
    assert spec.settings(8, {"anon": True}) == s


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
