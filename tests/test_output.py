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
from fruitdask.features.settings import FeatureSettings
from fruitdask.pca_streamed import fit_incremental_pca
from fruitdask.runinfo import StageTimer

#: The top-level keys of run.json, and of its fixed-shape sections, as written before the
#: output contract had a module of its own; ``features`` since the feature settings are one value.
RUN_JSON_KEYS = {
    "fruitdask_version", "run_id", "backend", "input", "output", "started_at", "duration_s", "counts", "per_label",
    "errors_by_stage", "reduction", "timings_s", "images_per_second", "cluster", "precision", "weights", "warnings",
    "extra", "versions", "config", "files", "table", "features",
}
COUNTS_KEYS = {"images_listed", "labels", "rows_written", "errors"}
WEIGHTS_KEYS = {"requested", "kind", "source", "sha256", "file_sha256", "random", "warning"}
FILES = {"features": "features/", "errors": "errors.parquet", "reduction": "reduction.npz", "scree": "scree.png",
         "performance_report": "dask-report.html", "report": "report.html", "run": "runs/r1/"}


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
        cfg=cfg, output_url=cfg.output, run_id="r1", started=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), timer=timer, n_listed=21, n_images=21,
        per_label={"A": 11, "B": 10}, errors=errors, rows=20, reduction=reduction, cluster={"backend": "dask", "threads": 2},
        precision={"requested": "float32", "precision": "float32", "reason": "asked"},
        weights=WeightsInfo("random", "random", "seed 0", "ab" * 32),
        features=FeatureSettings.from_config(cfg, "ab" * 32, "float32"), extra={"performance_report": "dask-report.html"},
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
    from fruitdask.lake import keys, tasks
    from fruitdask.lake import table as delta

    reduction, x = _reduction()
    record = _record(tmp_path, reduction)
    out = tmp_path / "out"
    fit_url = storage.write_file(str(out / "pca" / "0001-r1.npz"), reduction.to_npz())
    manifest = pd.DataFrame({"path": [f"/in/A/{i}.jpg" for i in range(20)], "label": ["A"] * 20,
                             "image_key": [f"A/{i}.jpg" for i in range(20)], "source_version": ["1:1"] * 20})
    feats = pd.DataFrame({"features": frames.list_column(x, 20, manifest.index)})
    sink = tasks.Sink(delta.table_url(str(out)), "r1", "s", {})
    written = tasks.write_rows(manifest, feats, sink, tasks.Fit("0001-r1", fit_url), "n00000")
    delta.commit(delta.open_table(str(out), {}), [written], [], {"run_id": "r1"},
                 row_keys=keys.hash_keys(manifest["image_key"]))
    storage.write_file(str(out / output.ERRORS), output.errors_parquet(record.errors))
    storage.write_file(str(out / output.REDUCTION), reduction.to_npz())
    doc = record.document()
    storage.write_file(str(out / output.RUN_JSON), json.dumps(doc, default=str).encode())
    storage.write_file(str(out / output.SUCCESS_MARKER), b"")
    run = output.read_run(str(out))
    assert run.record == json.loads(json.dumps(doc, default=str))
    np.testing.assert_allclose(run.reduction().components, reduction.components)
    assert sorted(run.features(["path", "label"])["path"]) == sorted(manifest["path"])
    np.testing.assert_allclose(frames.matrix(run.features(["pca"])["pca"]), reduction.transform(x), rtol=1e-5)
    errors = run.errors()
    assert errors[["path", "label", "stage", "reason"]].to_dict(orient="records") == record.errors.to_dict(orient="records")
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
