"""The output contract in one module: the names, the run record that writes ``run.json``
(exactly the keys runs have always written), and a committed run read back."""

from __future__ import annotations

import datetime as dt
import json

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest

from fruitdask import output, storage
from fruitdask.config import build_config
from fruitdask.errors import InputError
from fruitdask.features import frames
from fruitdask.features.model import WeightsInfo
from fruitdask.reduce import fit_incremental_pca
from fruitdask.runinfo import StageTimer

#: The top-level keys of run.json, and of its fixed-shape sections, as written before the
#: output contract had a module of its own.
RUN_JSON_KEYS = {
    "fruitdask_version", "run_id", "backend", "input", "output", "started_at", "duration_s", "counts", "per_label",
    "errors_by_stage", "reduction", "timings_s", "images_per_second", "cluster", "precision", "weights", "warnings",
    "extra", "versions", "config", "files",
}
COUNTS_KEYS = {"images_listed", "labels", "rows_written", "errors"}
WEIGHTS_KEYS = {"requested", "kind", "source", "sha256", "file_sha256", "random", "warning"}
FILES = {"features": "features/", "errors": "errors.parquet", "reduction": "reduction.npz", "scree": "scree.png",
         "performance_report": "dask-report.html", "report": "report.html"}


def _reduction():
    x = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    with dask.config.set(scheduler="sync"):
        return fit_incremental_pca(da.from_array(x, chunks=10), components=3, variance=0.95, batch_size=None), x


def _record(tmp_path, reduction) -> output.RunRecord:
    cfg = build_config({"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "image_size": 32}, {})
    timer = StageTimer()
    for stage in ("startup", "listing", "featurize", "write"):
        with timer.stage(stage):
            pass
    errors = pd.DataFrame({"path": ["/in/A/x.jpg"], "label": ["A"], "stage": ["decode"], "reason": ["not an image"]})
    return output.RunRecord(
        cfg=cfg, run_id="r1", started=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), timer=timer, n_listed=21, n_images=21,
        per_label={"A": 11, "B": 10}, errors=errors, rows=20, reduction=reduction, cluster={"backend": "dask", "threads": 2},
        precision={"requested": "float32", "precision": "float32", "reason": "asked"},
        weights=WeightsInfo("random", "random", "seed 0", "ab" * 32), extra={"performance_report": "dask-report.html"},
    )


def test_run_record_writes_the_keys_of_run_json(tmp_path):
    reduction, _ = _reduction()
    doc = _record(tmp_path, reduction).document()
    assert set(doc) == RUN_JSON_KEYS
    assert set(doc["counts"]) == COUNTS_KEYS and set(doc["weights"]) == WEIGHTS_KEYS and doc["files"] == FILES
    assert doc["counts"] == {"images_listed": 21, "labels": 2, "rows_written": 20, "errors": 1}
    assert doc["errors_by_stage"] == {"decode": 1}
    assert list(doc["timings_s"]) == ["startup", "listing", "featurize", "write"]
    assert doc["weights"]["random"] is True and doc["started_at"] == "2026-01-01T00:00:00+00:00"
    assert doc["reduction"] == reduction.summary() and doc["config"]["image_size"] == 32
    json.dumps(doc)  # plain JSON


def test_a_committed_run_reads_back(tmp_path):
    reduction, x = _reduction()
    record = _record(tmp_path, reduction)
    target = storage.OutputTarget.open(str(tmp_path / "out"), None, False)
    with storage.committed(target):
        features = pd.DataFrame({"path": [f"/in/A/{i}.jpg" for i in range(20)], "label": ["A"] * 20})
        features["features"] = frames.list_column(x, 20, features.index)
        out = frames.add_pca(features, reduction)
        storage.write_parquet_part(out, target.staging_path(output.FEATURES, "part-00000.parquet"), frames.OUTPUT_SCHEMA, None)
        target.write_bytes(output.ERRORS, output.errors_parquet(record.errors))
        target.write_bytes(output.REDUCTION, reduction.to_npz())
        doc = record.write(target)
    run = output.read_run(str(tmp_path / "out"))
    assert run.record == json.loads(json.dumps(doc))
    np.testing.assert_allclose(run.reduction().components, reduction.components)
    assert list(run.features(["path", "label"])["path"]) == list(features["path"])
    assert run.errors().to_dict(orient="records") == record.errors.to_dict(orient="records")
    assert len(run.feature_parts()) == 1
    settings = run.feature_settings()
    assert (settings.weights_key, settings.image_size, settings.pooling) == ("ab" * 32, 32, "avg")
    with pytest.raises(InputError, match=r"is not a completed fruitdask run output \(no scree.png\)"):
        run.scree()


def test_an_unfinished_or_foreign_folder_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text("{}")
    with pytest.raises(InputError, match=r"not a completed fruitdask run output \(no _SUCCESS\)"):
        output.read_run(str(tmp_path / "half"))
    assert output.read_run(str(tmp_path / "half"), committed=False).record == {}
    (tmp_path / "half" / "run.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        output.read_run(str(tmp_path / "half"), committed=False)
