"""``fruitdask bench``: its arithmetic, its report, and a tiny real run (not a timing test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED, SMALL_SIZE

from fruitdask.bench import children, engine, machine, markdown, quality, summary
from fruitdask.cli import main
from fruitdask.config import RunConfig
from fruitdask.errors import ConfigError

ZEN4 = "model name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"


def test_pick_first_or_evenly_spaced():
    assert engine.pick(10, 3, "first") == [0, 1, 2]
    assert engine.pick(10, 3, "even") == [1, 5, 8]
    assert engine.pick(4, 10, "even") == [0, 1, 2, 3]


def test_steady_rate_excludes_the_first_wave():
    # 2 slots, 6 partitions of 10 images: the first wave (warm-up) ends at 10 s, then one
    # partition per slot every 2 s.
    assert summary.first_wave_rate([10, 10, 12, 12, 14, 14], 60, 2) == pytest.approx(40 / 4)
    assert summary.first_wave_rate([5, 6], 20, 2) is None  # no second wave: not measurable


def test_fill_doc_replaces_only_its_section(tmp_path):
    doc = tmp_path / "review.md"
    doc.write_text("intro\n<!-- bench:224 start -->\nold\n<!-- bench:224 end -->\nrest\n")
    markdown.fill_doc(doc, "224", "| new |\n")
    assert doc.read_text() == "intro\n<!-- bench:224 start -->\n| new |\n<!-- bench:224 end -->\nrest\n"
    with pytest.raises(ConfigError, match="bench:100 start"):
        markdown.fill_doc(doc, "100", "x")


def test_unpooled_pca_children_time_dask_and_refuse_large_spark(tmp_path):
    cfg = RunConfig(input="x", output="y", image_size=224)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "unpooled.npy", rng.normal(size=(6, 7 * 7 * 512)).astype(np.float32))
    spark = children.child_pca(cfg, tmp_path, "spark")  # refused before any JVM starts
    assert spark["status"] == "refused" and "--backend dask" in spark["reason"] and spark["d"] == 25088
    np.save(tmp_path / "unpooled.npy", rng.normal(size=(6, 64)).astype(np.float32))
    dask = children.child_pca(cfg, tmp_path, "dask")
    assert dask["status"] == "ok" and dask["d"] == 64 and dask["fit_s"] > 0


def test_unknown_backend_is_a_config_error(tmp_path, capsys):
    assert main(["bench", "--backends", "raw,flink", "--out", str(tmp_path)]) == ConfigError.exit_code
    assert "raw,dask,spark" in capsys.readouterr().err


def _run(wall, steady, images=10, status="ok", busy=3.0, **timings):
    return {"status": status, "wall_s": wall, "images": images, "images_per_s_e2e": round(images / wall, 3),
            "steady_images_per_s": steady, "fixed_cost_s": wall - images / steady, "timings_s": {"featurize": 1.0, **timings},
            "memory": {"driver_mb": 100.0, "jvm_mb": 0.0, "workers_mb": 50.0, "worker_max_mb": 50.0, "n_workers": 1},
            "load_before": {"cpu_busy_pct": busy, "load_1min": 0.1, "quiet": busy <= machine.QUIET_CPU_PCT},
            "partition_ends_s": list(range(500)), "weights_sha256": "w"}


def test_summary_reports_median_and_spread_and_ratios(tmp_path):
    cfg = RunConfig(input="x", output="y", image_size=32)
    runs = {"float32": {"raw": [_run(10, 2.0), _run(12, 2.0), _run(11, 2.2)],
                        "dask": [_run(20, 2.0), _run(22, 1.8, busy=60.0), _run(21, 1.9)]}}
    rep = summary.summarize(cfg, "in", 3, 10, ["float32"], runs, {}, {}, {}, machine.machine(ZEN4))
    raw, dask = rep["results"]["float32"]["raw"], rep["results"]["float32"]["dask"]
    assert raw["wall_s"] == {"median": 11.0, "min": 10.0, "max": 12.0, "n": 3}
    assert dask["ratio_to_raw_e2e"] == round(dask["images_per_s_e2e"]["median"] / raw["images_per_s_e2e"]["median"], 3)
    assert dask["ratio_to_raw_steady"] == round(1.9 / 2.0, 3)
    # One engine run started on a busy machine: the whole bench is flagged.
    assert rep["machine"]["quiet"] is False and rep["machine"]["cpu_busy_pct_before_runs"]["max"] == 60.0
    assert rep["machine"]["cpu"] == "AMD EPYC 9R14" and rep["machine"]["cpu_flags"]["avx512_bf16"] is True
    assert all("partition_ends_s" not in r for r in dask["runs"])  # bench.json stays small enough to commit
    assert len(json.dumps(rep)) < 20_000
    md = markdown.markdown(rep)
    assert "| raw | 11.0 (10.0–12.0) |" in md and "NOT quiet" in md and "avx512_bf16" in md


def test_precision_comparison_and_held_out_accuracy(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(["Apple", "Kiwi", "Pear"], 12)
    centers = {lab: rng.normal(scale=5, size=16) for lab in set(labels)}
    x32 = np.stack([centers[lab] + rng.normal(size=16) for lab in labels]).astype(np.float32)
    x16 = x32 * (1 + 1e-3 * rng.normal(size=x32.shape)).astype(np.float32)
    paths = np.array([f"/d/{lab}/{i}.jpg" for i, lab in enumerate(labels)])
    np.savez(tmp_path / "raw_features-float32.npz", paths=paths, features=x32)
    np.savez(tmp_path / "raw_features-bfloat16.npz", paths=paths, features=x16)
    (tmp_path / "config-float32.json").write_text(json.dumps({"variance": 0.95}))
    runs = {"float32": {"raw": [_run(10, 2.0), _run(10, 2.0)]}, "bfloat16": {"raw": [_run(5, 4.0), _run(5, 4.4)]}}
    cmp = quality.compare_precisions(tmp_path, runs, ["float32", "bfloat16"], 0)
    assert cmp["accuracy"]["float32"]["accuracy"] == 1.0 and cmp["accuracy"]["float32"]["test"] == 9
    vs = cmp["vs_baseline"]["bfloat16"]
    assert vs["engines"]["raw"] == {"speed_ratio_e2e": 2.0, "speed_ratio_steady": 2.1}
    assert vs["features"]["correlation"] > 0.999 and vs["accuracy_points"] == 0.0


@pytest.mark.integration
@pytest.mark.slow
def test_bench_smoke_run_writes_json_and_markdown(tmp_path):
    doc = tmp_path / "review.md"
    doc.write_text("<!-- bench:smoke start -->\n<!-- bench:smoke end -->\n")
    out = tmp_path / "bench"
    code = main(["bench", "--input", str(BUNDLED), "--images", "8", "--image-size", str(SMALL_SIZE),
                 "--backends", "raw,dask,spark", "--no-unpooled-pca", "--out", str(out), "--repeats", "1",
                 "--workers", "1", "--spark-master", "local[1]", "--precision", "float32",
                 "--fill-doc", str(doc), "--doc-section", "smoke", "--quiet"])
    assert code == 0
    rep = json.loads((out / "bench.json").read_text())
    assert rep["images"] == 8 and rep["image_size"] == SMALL_SIZE and rep["same_weights"] and rep["precisions"] == ["float32"]
    engines = rep["results"]["float32"]
    assert set(engines) == {"raw", "dask", "spark"}
    for name, r in engines.items():
        assert r["ok_runs"] == 1, (name, r["runs"])
        run = r["runs"][0]
        assert run["images"] == 8 and run["memory"]["driver_mb"] > 0
        # End to end is the child's whole life, so it exceeds the sum of the stages it timed.
        assert run["wall_s"] > sum(run["timings_s"].get(s, 0) for s in ("startup", "featurize", "pca", "write"))
        assert r["images_per_s_e2e"]["median"] == pytest.approx(8 / run["wall_s"], rel=1e-2)
        assert {"listing", "featurize", "pca", "write"} <= set(run["timings_s"]), name
        assert "load_before" in run and "cpu_busy_pct" in run["load_before"]
    for name in ("dask", "spark"):
        assert engines[name]["memory"]["workers_mb"] > 0
        assert rep["parity"]["float32"][name]["rows"] == 8 and rep["parity"]["float32"][name]["max_abs_diff_vs_raw"] <= 1e-5
    assert engines["spark"]["memory"]["jvm_mb"] > 0
    assert rep["machine"]["cpus"] and "avx512_bf16" in rep["machine"]["cpu_flags"]
    md = (out / "bench.md").read_text()
    assert "| spark |" in md and "steady" in md and md in doc.read_text()
    assert Path(rep["input"]) == BUNDLED


@pytest.mark.integration
@pytest.mark.slow
def test_bench_compares_precisions_over_repeats(tmp_path, monkeypatch):
    from fruitdask.features import precision

    # The parent resolves the axis; a Zen 4 cpuinfo lets bf16 through on any machine (the
    # children then run it, natively here, emulated elsewhere).
    monkeypatch.setattr(precision, "read_cpuinfo", lambda path="/proc/cpuinfo": ZEN4)
    out = tmp_path / "bench"
    code = main(["bench", "--input", str(BUNDLED), "--images", "48", "--image-size", str(SMALL_SIZE), "--backends", "raw",
                 "--no-unpooled-pca", "--out", str(out), "--repeats", "2", "--precisions", "float32,bfloat16", "--quiet"])
    assert code == 0
    rep = json.loads((out / "bench.json").read_text())
    assert rep["precisions"] == ["float32", "bfloat16"]
    for prec in rep["precisions"]:
        raw = rep["results"][prec]["raw"]
        assert raw["ok_runs"] == 2 and raw["wall_s"]["n"] == 2 and raw["wall_s"]["min"] <= raw["wall_s"]["max"]
        assert [r["precision"] for r in raw["runs"]] == [prec, prec]
    cmp = rep["precision_comparison"]
    assert cmp["baseline"] == "float32" and set(cmp["accuracy"]) == {"float32", "bfloat16"}
    vs = cmp["vs_baseline"]["bfloat16"]
    assert vs["engines"]["raw"]["speed_ratio_e2e"] > 0 and vs["features"]["correlation"] > 0.999
    assert vs["features"]["relative_error"] < 0.01
    assert cmp["accuracy"]["float32"]["test"] == 12 and abs(vs["accuracy_points"]) <= 100
    assert "Precision against float32" in (out / "bench.md").read_text()
