"""The Spark backend: its guards (no JVM), and parity with the Dask backend on real images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import BUNDLED, SMALL_SIZE, copy_images, read_features

from fruitdask.backends.spark.session import spark_conf
from fruitdask.cli import main
from fruitdask.config import RunConfig
from fruitdask.errors import ReductionError
from fruitdask.features.settings import FeatureSettings
from fruitdask.lake import table as delta


def _java_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "java" in p.name().lower()]


@pytest.fixture
def no_jvm_left():
    """Fails the test when a Spark JVM (or PySpark gateway) outlives the run."""
    assert not _java_children()
    yield
    from pyspark import SparkContext

    assert SparkContext._gateway is None, "the Py4J gateway was left open"
    assert not _java_children(), "a JVM was left running"


def test_features_too_wide_for_the_moments_are_refused_before_spark_starts():
    """The refusal follows the capability each backend declares (``supports_wide_fit``), not
    its name: the Spark backend's start refuses 224 px unpooled features before any JVM."""
    from contextlib import ExitStack
    from types import SimpleNamespace

    from fruitdask.backends.dask.backend import DaskBackend
    from fruitdask.backends.spark.backend import SparkBackend
    from fruitdask.lake.update import check_wide
    from fruitdask.progress import Progress

    assert DaskBackend.supports_wide_fit and not SparkBackend.supports_wide_fit
    spark = SparkBackend(RunConfig(input="x", output="y"), SimpleNamespace(storage_options={}), Progress())
    with pytest.raises(ReductionError, match=r"25,088 features .* Spark backend .* --backend dask"), ExitStack() as stack:
        spark.start(stack, FeatureSettings("w", 224, "none", 8))
    assert not hasattr(spark, "session") and not _java_children()
    check_wide(FeatureSettings("w", 64, "none", 8).feature_dim, False, "spark")  # 2 x 2 x 512: summed
    check_wide(25088, True, "dask")  # the Dask backend streams them


def test_spark_conf_ties_arrow_batches_to_batch_size():
    conf = spark_conf(RunConfig(input="x", output="y", batch_size=17, spark_master="local[2]"), "/tmp/l.properties")
    assert conf["spark.sql.execution.arrow.maxRecordsPerBatch"] == "17"
    assert conf["spark.master"] == "local[2]"
    assert conf["spark.ui.showConsoleProgress"] == "false"
    assert conf["spark.executorEnv.TF_ENABLE_ONEDNN_OPTS"] == "1"


def test_cli_refuses_unpooled_spark_pca_with_the_flag_to_pass(tiny_images, tmp_path, capsys, no_jvm_left):
    code = main(["run", "--backend", "spark", "--input", str(tiny_images), "--output", str(tmp_path / "out"),
                 "--weights", "random", "--pooling", "none", "--image-size", "224", "--quiet"])
    assert code == ReductionError.exit_code
    err = capsys.readouterr().err
    assert "--backend dask" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _images(tmp_path: Path) -> Path:
    """12 real images, one per-case extension, a name Spark's lister hides, and a broken file."""
    root = copy_images(BUNDLED, tmp_path / "Training", 3, 4)
    apricot = root / "Apricot"
    first = sorted(apricot.iterdir())[0]
    shutil.copy2(first, apricot / "UPPER_CASE.JPG")
    shutil.copy2(first, apricot / "_underscore.jpeg")  # Hadoop hides "_" names; list_images keeps them
    (apricot / "broken.jpg").write_bytes(b"not a jpeg")
    (apricot / "notes.txt").write_text("not an image")
    return root


def _read(out: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, str], np.ndarray]:
    doc = json.loads((out / "run.json").read_text())
    table = read_features(out, arrow=False).to_dict(orient="list")
    feats = {p: np.asarray(f, dtype=np.float32) for p, f in zip(table["path"], table["features"], strict=True)}
    labels = dict(zip(table["path"], table["label"], strict=True))
    ratios = np.load(out / "reduction.npz")["explained_variance_ratio"]
    return doc, feats, labels, ratios


@pytest.mark.integration
@pytest.mark.slow
def test_spark_matches_dask_end_to_end(tmp_path, weights_file, no_jvm_left):
    images = _images(tmp_path)
    common = ["--input", str(images), "--weights", str(weights_file), "--image-size", str(SMALL_SIZE),
              "--batch-size", "4", "--partition-size", "5", "--quiet"]
    assert main(["run", "--backend", "dask", "--output", str(tmp_path / "dask"), "--workers", "1", *common]) == 4
    assert main(["run", "--backend", "spark", "--output", str(tmp_path / "spark"), "--spark-master", "local[1]", *common]) == 4

    d_doc, d_feats, d_labels, d_ratios = _read(tmp_path / "dask")
    s_doc, s_feats, s_labels, s_ratios = _read(tmp_path / "spark")
    # Same rows (path, label), including the upper-case extension and the "_" name.
    assert s_labels == d_labels and len(s_labels) == 14
    assert any(p.endswith("UPPER_CASE.JPG") for p in s_labels) and any(p.endswith("_underscore.jpeg") for p in s_labels)
    for path, f in d_feats.items():
        np.testing.assert_allclose(s_feats[path], f, rtol=0, atol=1e-5, err_msg=path)
    np.testing.assert_allclose(s_ratios, d_ratios, rtol=0, atol=1e-4)
    assert s_doc["reduction"]["k"] == d_doc["reduction"]["k"]
    # Same files and run.json fields; the broken file is an error row in both.
    assert set(s_doc) == set(d_doc)
    assert s_doc["counts"] == d_doc["counts"] == {"images_listed": 15, "labels": 3, "rows_written": 14, "errors": 1,
                                                  "listed": 15, "added": 14, "updated": 0, "removed": 0, "unchanged": 0,
                                                  "featurized": 15}
    assert s_doc["errors_by_stage"] == {"decode": 1}
    assert s_doc["reduction"]["method"] == d_doc["reduction"]["method"]  # the same exact moments, summed by each engine
    assert s_doc["cluster"]["backend"] == "spark" and s_doc["extra"]["partitions"] == 3
    for name in ("_SUCCESS", "scree.png", "errors.parquet", "reduction.npz"):
        assert (tmp_path / "spark" / name).exists(), name
    # The same Delta table: one version, the same columns.
    assert delta.load(str(tmp_path / "spark"), {}).version() == 0
    assert delta.load(str(tmp_path / "spark"), {}).schema().to_arrow() == delta.load(str(tmp_path / "dask"), {}).schema().to_arrow()
    # A day later, Spark brings the table up to date as Dask does: only the new image is
    # featurized, and the file that held the deleted one is rewritten (a Spark job from the
    # update's second thread, beside the featurization).
    shutil.copy2(images / "Apricot" / "UPPER_CASE.JPG", images / "Apricot" / "new.jpg")
    gone = next(p for p in sorted(images.rglob("*.jpg")) if p.name != "new.jpg")
    gone.unlink()
    assert main(["run", "--backend", "spark", "--output", str(tmp_path / "spark"), "--spark-master", "local[1]", *common]) == 4
    doc = json.loads((tmp_path / "spark" / "run.json").read_text())
    # The broken file, unchanged, is reported again (exit 4), not retried.
    assert (doc["counts"]["added"], doc["counts"]["removed"], doc["counts"]["featurized"], doc["counts"]["errors"],
            doc["table"]["version_after"]) == (1, 1, 1, 1, 1)
    assert doc["table"]["files_removed"] == 1 and doc["table"]["rows"] == 14
    keys = sorted(read_features(tmp_path / "spark")["image_key"])
    assert len(keys) == 14 and f"{gone.parent.name}/{gone.name}" not in keys and "Apricot/new.jpg" in keys


@pytest.mark.integration
@pytest.mark.slow
def test_spark_reads_s3_through_fruitdask_storage_in_the_executors(s3, tiny_images, no_jvm_left):
    """No hadoop-aws: the executors read s3:// bytes with fsspec, with the driver's endpoint."""
    s3.bucket("fruits-spark-in", "eu-west-1")
    s3.bucket("fruits-spark-out", "eu-west-3")
    s3.upload(tiny_images, "s3://fruits-spark-in/Training")
    out = "s3://fruits-spark-out/run-spark"
    code = main(["run", "--backend", "spark", "--spark-master", "local[1]", "--input", "s3://fruits-spark-in/Training",
                 "--output", out, "--image-size", str(SMALL_SIZE), "--weights", "random", "--s3-endpoint", s3.endpoint, "--quiet"])
    assert code == 0
    doc = json.loads(s3.read("fruits-spark-out/run-spark/run.json"))
    assert doc["backend"] == "spark" and doc["counts"]["rows_written"] == 12 and doc["counts"]["errors"] == 0
    assert "fruits-spark-out/run-spark/_SUCCESS" in s3.objects()
    rows = read_features(out, s3.storage_options)
    assert len(rows) == 12 and all(p.startswith("s3://fruits-spark-in/") for p in rows["path"])
