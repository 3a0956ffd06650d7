"""The Spark backend: its guards (no JVM), and parity with the Dask backend on real images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import BUNDLED, SMALL_SIZE, copy_images

from fruitdask.backends.spark import backend as spark_backend
from fruitdask.backends.spark.session import spark_conf
from fruitdask.cli import main
from fruitdask.config import RunConfig
from fruitdask.errors import ReductionError


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


def test_large_pca_is_refused_before_spark_starts():
    cfg = RunConfig(input="x", output="y", backend="spark", pooling="none", image_size=224)
    with pytest.raises(ReductionError) as e:
        spark_backend.check_pca_size(cfg)
    msg = str(e.value)
    assert "25,088 x 25,088" in msg and "5.0 GB" in msg and "--spark-allow-large-pca" in msg
    # The explicit opt-in goes ahead and asks for a driver big enough for it.
    allowed = RunConfig(input="x", output="y", pooling="none", image_size=224, spark_allow_large_pca=True)
    assert spark_backend.check_pca_size(allowed) == "39g"  # room for 8 copies of the 5.0 GB covariance
    # 4,608 features (100 px, unpooled) killed a default 1 GiB driver in the bench: sized up, no opt-in.
    assert spark_backend.check_pca_size(RunConfig(input="x", output="y", pooling="none", image_size=100)) == "3g"
    assert spark_backend.check_pca_size(RunConfig(input="x", output="y")) is None  # 512 features


def test_pca_beyond_spark_column_limit_is_refused_even_with_opt_in():
    cfg = RunConfig(input="x", output="y", pooling="none", image_size=384, spark_allow_large_pca=True)
    with pytest.raises(ReductionError, match="73,728 features"):
        spark_backend.check_pca_size(cfg)


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
    assert "--spark-allow-large-pca" in err and "Traceback" not in err
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
    table = pq.read_table(out / "features").to_pydict()
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
    assert s_doc["counts"] == d_doc["counts"] == {"images_listed": 15, "labels": 3, "rows_written": 14, "errors": 1}
    assert s_doc["errors_by_stage"] == {"decode": 1}
    assert s_doc["reduction"]["method"].startswith("pyspark.ml")
    assert s_doc["extra"]["hidden_from_spark"] == 1 and len(s_doc["extra"]["featurize_task_ends_s"]) >= 1
    for name in ("_SUCCESS", "scree.png", "errors.parquet", "reduction.npz"):
        assert (tmp_path / "spark" / name).exists(), name
    assert pq.read_schema(next((tmp_path / "spark" / "features").glob("*.parquet"))).names == ["path", "label", "features", "pca"]


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
    assert doc["extra"]["listing"].startswith("storage.list_images")
    assert "fruits-spark-out/run-spark/_SUCCESS" in s3.objects()
    assert all(p.startswith("s3://fruits-spark-in/") for p in pq.read_table(
        s3.fs.open("fruits-spark-out/run-spark/features/part-00000.parquet", "rb")).column("path").to_pylist())
