"""``fruitdask bench``: its arithmetic, its report, and a tiny real run (not a timing test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED, SMALL_SIZE

from fruitdask import bench
from fruitdask.cli import main
from fruitdask.config import RunConfig
from fruitdask.errors import ConfigError


def test_pick_first_or_evenly_spaced():
    assert bench.pick(10, 3, "first") == [0, 1, 2]
    assert bench.pick(10, 3, "even") == [1, 5, 8]
    assert bench.pick(4, 10, "even") == [0, 1, 2, 3]


def test_steady_rate_excludes_the_first_wave():
    # 2 slots, 6 partitions of 10 images: the first wave (warm-up) ends at 10 s, then one
    # partition per slot every 2 s.
    assert bench.steady_rate([10, 10, 12, 12, 14, 14], 60, 2) == pytest.approx(40 / 4)
    assert bench.steady_rate([5, 6], 20, 2) is None  # no second wave: not measurable


def test_fill_doc_replaces_only_its_section(tmp_path):
    doc = tmp_path / "review.md"
    doc.write_text("intro\n<!-- bench:224 start -->\nold\n<!-- bench:224 end -->\nrest\n")
    bench.fill_doc(doc, "224", "| new |\n")
    assert doc.read_text() == "intro\n<!-- bench:224 start -->\n| new |\n<!-- bench:224 end -->\nrest\n"
    with pytest.raises(ConfigError, match="bench:100 start"):
        bench.fill_doc(doc, "100", "x")


def test_unpooled_pca_children_time_dask_and_refuse_large_spark(tmp_path):
    cfg = RunConfig(input="x", output="y", image_size=224)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "unpooled.npy", rng.normal(size=(6, 7 * 7 * 512)).astype(np.float32))
    spark = bench._child_pca(cfg, tmp_path, "spark")  # refused before any JVM starts
    assert spark["status"] == "refused" and "--spark-allow-large-pca" in spark["reason"] and spark["d"] == 25088
    np.save(tmp_path / "unpooled.npy", rng.normal(size=(6, 64)).astype(np.float32))
    dask = bench._child_pca(cfg, tmp_path, "dask")
    assert dask["status"] == "ok" and dask["d"] == 64 and dask["fit_s"] > 0


def test_unknown_backend_is_a_config_error(tmp_path, capsys):
    assert main(["bench", "--backends", "raw,flink", "--out", str(tmp_path)]) == ConfigError.exit_code
    assert "raw,dask,spark" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
def test_bench_smoke_run_writes_json_and_markdown(tmp_path):
    doc = tmp_path / "review.md"
    doc.write_text("<!-- bench:smoke start -->\n<!-- bench:smoke end -->\n")
    out = tmp_path / "bench"
    code = main(["bench", "--input", str(BUNDLED), "--images", "8", "--image-size", str(SMALL_SIZE),
                 "--backends", "raw,dask,spark", "--no-unpooled-pca", "--out", str(out),
                 "--workers", "1", "--spark-master", "local[1]",
                 "--fill-doc", str(doc), "--doc-section", "smoke", "--quiet"])
    assert code == 0
    rep = json.loads((out / "bench.json").read_text())
    assert rep["images"] == 8 and rep["image_size"] == SMALL_SIZE and rep["same_weights"]
    assert set(rep["engines"]) == {"raw", "dask", "spark"}
    for name, r in rep["engines"].items():
        assert r["images"] == 8, name
        for key in ("images_per_s", "steady_images_per_s", "fixed_cost_s", "ratio_to_raw_e2e", "timings_s", "memory", "wall_s"):
            assert key in r, (name, key)
        assert r["memory"]["driver_mb"] > 0
    for name in ("dask", "spark"):
        assert {"startup", "listing", "featurize", "pca", "write"} <= set(rep["engines"][name]["timings_s"])
        assert rep["engines"][name]["memory"]["workers_mb"] > 0
        assert rep["parity"][name]["rows"] == 8 and rep["parity"][name]["max_abs_diff_vs_raw"] <= 1e-5
    assert rep["engines"]["spark"]["memory"]["jvm_mb"] > 0
    assert rep["machine"]["cpus"] and "load_1min_before" in rep["machine"]
    md = (out / "bench.md").read_text()
    assert "| spark |" in md and "steady" in md and md in doc.read_text()
    assert Path(rep["input"]) == BUNDLED
