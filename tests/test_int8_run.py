"""``fruitdask run --precision int8`` as a user types it: OpenVINO after NNCF's quantization on
a calibration sample of the lake, recorded in the table and reused; a TensorFlow table refuses
int8 without --rebuild; ``auto`` keeps an OpenVINO table's runtime. Real images at 32 px,
seeded random weights, a local cluster of one worker.

Every test here fails on the code before the int8 runtime (``--precision int8`` and
``--runtime`` were unknown flags)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED, REPO, SMALL_SIZE, copy_images, read_features

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def fruitdask(cwd: Path, cache: Path, *args: str, code: int = 0) -> subprocess.CompletedProcess:
    """``python -m fruitdask ARGS`` in ``cwd`` with its own converted-model cache; it must exit
    ``code`` and log no failed preload of the workers' imports."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "FRUITDASK_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "fruitdask", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == code, f"fruitdask {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "preloading the workers' imports failed" not in proc.stderr, proc.stderr[-3000:]
    return proc


def described(out: Path) -> dict:
    """The table's recorded feature settings (its Delta description)."""
    from fruitdask.lake import table as delta

    d = delta.open_table(str(out), {}).description
    assert d is not None
    return dict(d.feature_settings)


def cache_state(cache: Path) -> dict[str, float]:
    return {str(p.relative_to(cache)): p.stat().st_mtime for p in (cache / "openvino").rglob("*") if p.is_file()}


def _run_args(images: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return ["run", "--input", str(images), "--output", str(out), "--image-size", str(SMALL_SIZE), "--weights", str(weights),
            "--workers", "1", "--threads-per-worker", "1", "--quiet", *extra]


def _keras_float32(weights_file: Path, paths: list[str]) -> np.ndarray:
    from fruitdask.features import featurize
    from fruitdask.features.runtimes.tensorflow import TensorflowRuntime
    from fruitdask.features.settings import FeatureSettings
    from fruitdask.features.weights_file import WeightsArrays, read_weights

    weights = WeightsArrays.of(read_weights(str(weights_file)))
    settings = FeatureSettings(weights.sha256, SMALL_SIZE, "avg", 8, "float32")
    runtime = TensorflowRuntime(settings, threads=1)
    runtime.prepare(weights, settings)
    images = np.stack([featurize.decode_image(Path(p).read_bytes(), SMALL_SIZE) for p in paths])
    return featurize.featurize_arrays(runtime, images, "avg", 8)


def test_int8_table_records_and_reuses_its_calibration(tmp_path, weights_file):
    """First int8 run: the table records openvino/int8 and a calibration set of every listed
    image (12: fewer than 300); features' cosine to Keras float32 >= 0.99. Second run, after
    the lake grew, with --precision int8: the same calibration (keys and digest), no new or
    rewritten converted model. Third run, grown again, with no flag: auto keeps openvino/int8."""
    images = copy_images(BUNDLED, tmp_path / "lake" / "Training", 3, 4)
    out, cache = tmp_path / "out", tmp_path / "cache"
    fruitdask(tmp_path, cache, *_run_args(images, out, weights_file, "--precision", "int8"))
    first = described(out)
    assert (first["runtime"], first["precision"]) == ("openvino", "int8")
    cal = json.loads(first["calibration"])
    assert len(cal["keys"]) == 12 and len({k.split("/")[0] for k in cal["keys"]}) == 3
    assert json.loads((out / "run.json").read_text())["config"]["runtime"] == "openvino"
    converted = cache_state(cache)
    assert len({k.split("/")[1] for k in converted}) == 2  # the float32 IR and the int8 one

    df = read_features(out)
    got = np.stack(df["features"].to_numpy())
    ref = _keras_float32(weights_file, list(df["path"]))
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.99, cos.min()

    extra = sorted((BUNDLED / "Kiwi").iterdir())[0]
    (images / "Kiwi").mkdir()
    shutil.copy2(extra, images / "Kiwi" / extra.name)
    fruitdask(tmp_path, cache, *_run_args(images, out, weights_file, "--precision", "int8"))
    second = described(out)
    assert second["calibration"] == first["calibration"]
    assert cache_state(cache) == converted  # loaded from the cache: nothing converted or written again
    assert len(read_features(out)) == 13

    extra2 = sorted((BUNDLED / "Kiwi").iterdir())[1]
    shutil.copy2(extra2, images / "Kiwi" / extra2.name)
    fruitdask(tmp_path, cache, *_run_args(images, out, weights_file))
    third = described(out)
    assert (third["runtime"], third["precision"], third["calibration"]) == ("openvino", "int8", first["calibration"])
    assert len(read_features(out)) == 14
    assert cache_state(cache) == converted


def test_tensorflow_table_refuses_int8_without_rebuild(tmp_path, weights_file):
    """A table made by TensorFlow in float32 refuses an int8 run with a message that names
    the runtime and precision that differ and --rebuild; with --rebuild it becomes int8."""
    images = copy_images(BUNDLED, tmp_path / "lake" / "Training", 2, 3)
    out, cache = tmp_path / "out", tmp_path / "cache"
    fruitdask(tmp_path, cache, *_run_args(images, out, weights_file, "--runtime", "tensorflow", "--precision", "float32"))
    assert described(out).get("runtime", "tensorflow") == "tensorflow"
    refused = fruitdask(tmp_path, cache, *_run_args(images, out, weights_file, "--precision", "int8"), code=1)
    assert "precision float32 in the table, int8 in this run" in refused.stderr
    assert "runtime tensorflow in the table, openvino in this run" in refused.stderr
    assert "--rebuild" in refused.stderr
    assert described(out).get("runtime", "tensorflow") == "tensorflow"  # nothing written
    fruitdask(tmp_path, cache, *_run_args(images, out, weights_file, "--precision", "int8", "--rebuild"))
    assert (described(out)["runtime"], described(out)["precision"]) == ("openvino", "int8")


def test_tensorflow_runtime_refuses_int8(tmp_path, weights_file):
    """--runtime tensorflow with --precision int8 is refused before anything starts, naming the fix."""
    images = copy_images(BUNDLED, tmp_path / "lake" / "Training", 1, 1)
    proc = fruitdask(tmp_path, tmp_path / "cache",
                     *_run_args(images, tmp_path / "out", weights_file, "--runtime", "tensorflow", "--precision", "int8"),
                     code=2)
    assert "--precision int8 needs the OpenVINO runtime" in proc.stderr and "--runtime openvino" in proc.stderr
    assert not (tmp_path / "out" / "run.json").exists()


def test_bench_crosses_runtimes_and_precisions(tmp_path):
    """``fruitdask bench --runtimes tensorflow,openvino --precisions float32,int8`` (a tiny smoke
    run, raw engine only): one cell per runtime that has the precision (no TensorFlow int8),
    OpenVINO's against TensorFlow float32 with feature error, cosine and held-out accuracy and
    macro F1. Fails before the change (no --runtimes flag)."""
    out = tmp_path / "bench"
    proc = fruitdask(tmp_path, tmp_path / "cache", "bench", "--input", str(BUNDLED), "--images", "48", "--image-size",
                     str(SMALL_SIZE), "--backends", "raw", "--no-unpooled-pca", "--out", str(out), "--repeats", "1",
                     "--precisions", "float32,int8", "--runtimes", "tensorflow,openvino", "--quiet")
    rep = json.loads((out / "bench.json").read_text())
    assert rep["precisions"] == ["float32", "openvino-float32", "openvino-int8"], proc.stdout[-2000:]
    for label in rep["precisions"]:
        assert rep["results"][label]["raw"]["ok_runs"] == 1, rep["results"][label]["raw"]["runs"]
    cmp = rep["precision_comparison"]
    assert cmp["baseline"] == "float32"
    assert cmp["vs_baseline"]["openvino-float32"]["features"]["cosine_min"] > 0.9999
    assert cmp["vs_baseline"]["openvino-int8"]["features"]["cosine_min"] >= 0.99
    assert {"accuracy", "macro_f1"} <= set(cmp["accuracy"]["openvino-int8"])
    assert cmp["vs_baseline"]["openvino-int8"]["engines"]["raw"]["speed_ratio_steady"] is not None
