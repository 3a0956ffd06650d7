"""The model registry, the gate and ``fruitdask daily`` (issue #32): real runs on a
LocalCluster, locally and on the moto S3 server, with the CLI typed in a subprocess from
another folder.

Three simulated days (the lake grows and loses an image, then a label is added) each leave
one table version and one model version with its lineage; a day run twice leaves nothing
more; a worse candidate (trained on shuffled labels) is kept with the reason it was not
promoted; two promotions that read the same champion cannot both win; a daily killed at
each of its steps and run again ends as one uninterrupted day. All of these fail on the
code before this change (there was no registry, no ``model`` and no ``daily`` command).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED, SMALL_SIZE, after_a_killed_run, copy_images

from fruitdask.classifier import candidate, gate
from fruitdask.classifier.bundle import ModelBundle
from fruitdask.classifier.registry import ConflictError, Registry, new_version
from fruitdask.config import TF_ENV
from fruitdask.lake import table as delta
from fruitdask.storage import alias

REPO = Path(__file__).resolve().parents[1]
TTL = 3
LIST_FIELDS = {"version", "champion", "created_at", "table_version", "pca_fit", "metrics", "promoted", "reason"}


def _env(extra: dict | None = None) -> dict:
    return {**os.environ, **TF_ENV, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "FRUITDASK_STORAGE_LOCK_TTL": str(TTL),
            **(extra or {})}


def _fruitdask(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "fruitdask", *args], cwd=cwd, env=env or _env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"fruitdask {' '.join(args)} exited {done.returncode}: {done.stderr[-3000:]}"
    return done


def _daily_args(data: Path | str, out: str, models: str, weights: Path, *extra: str) -> list[str]:
    # --input is absolute: image keys of a relative --input are left to the lake's keys (another change).
    return ["daily", "--input", str(data), "--output", out, "--models", models, "--image-size", str(SMALL_SIZE),
            "--weights", str(weights), "--precision", "float32", "--workers", "1", "--partition-size", "10", *extra]


def _last_json(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def _daily_record(out: Path, line: dict) -> dict:
    return json.loads((out / line["daily"]).read_text())


def _listed(cwd: Path, models: str, *extra: str) -> list[dict]:
    return json.loads(_fruitdask(cwd, "model", "list", models, "--json", *extra).stdout)


# --- three days -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_days(tmp_path_factory, weights_file) -> dict:
    """Day 1: 4 labels x 9 images; day 2: a 10th image per label, one image deleted; day 3:
    a fifth label; then day 3 again (a CronJob that fires twice). Each day's JSON line,
    daily.json and registry listing are kept."""
    root = tmp_path_factory.mktemp("days")
    data = copy_images(BUNDLED, root / "in", 4, 9)
    labels = sorted(p.name for p in data.iterdir())
    args = _daily_args(data, "out", "models", weights_file)
    days: dict = {"root": root, "data": data, "labels": labels}

    def day(name: str) -> None:
        line = _last_json(_fruitdask(root, *args))
        days[name] = {"line": line, "record": _daily_record(root / "out", line), "listed": _listed(root, "models"),
                      "table_version": delta.load(str(root / "out"), {}).version(),
                      "champion": json.loads((root / "models" / "champion.json").read_text())}

    day("day1")
    for label in labels:  # the lake grows: each label's 10th image
        shutil.copy2(sorted((BUNDLED / label).iterdir())[9], data / label)
    days["deleted"] = sorted((data / labels[1]).iterdir())[0]
    days["deleted"].unlink()
    day("day2")
    new_label = sorted(p.name for p in BUNDLED.iterdir())[4]
    shutil.copytree(BUNDLED / new_label, data / new_label)
    days["new_label"] = new_label
    day("day3")
    day("day3_again")
    return days


@pytest.mark.integration
@pytest.mark.slow
def test_each_day_leaves_one_table_version_and_one_model_version_with_lineage(three_days):
    root = three_days["root"]
    for n, name in enumerate(("day1", "day2", "day3")):
        d = three_days[name]
        assert d["table_version"] == n, f"{name}: one table version per day"
        assert len(d["listed"]) == n + 1, f"{name}: one model version per day"
        newest = d["listed"][-1]
        assert set(newest) == LIST_FIELDS
        assert newest["table_version"] == n and d["line"]["candidate"] == newest["version"] and d["line"]["trained"]
        lineage = json.loads((root / "models" / newest["version"] / "lineage.json").read_text())
        assert lineage["table_uri"] == str(root / "out") and lineage["table_version"] == n
        assert lineage["trigger"] == "daily" and lineage["run_id"] == d["record"]["run_id"]
        assert lineage["pca_fit"] == newest["pca_fit"] and lineage["weights_sha256"]
        assert lineage["table_run_id"] in lineage["row_run_ids"]
        assert d["record"]["table"] == {"version_before": n - 1 if n else None, "version_after": n, "changed": True}
        # The registry holds the decision, daily.json the same; the alias agrees with it.
        assert d["record"]["promoted"] == newest["promoted"] and d["record"]["reason"] == newest["reason"]
        assert (d["champion"]["version"] == newest["version"]) == newest["promoted"]
        assert [r["version"] for r in d["listed"]] == sorted(r["version"] for r in d["listed"]), "oldest first"
        assert sum(r["champion"] for r in d["listed"]) == 1
    assert three_days["day1"]["line"]["promoted"] and "no champion yet" in three_days["day1"]["line"]["reason"]


@pytest.mark.integration
@pytest.mark.slow
def test_the_deleted_image_and_the_new_label_reach_the_candidates(three_days):
    root, deleted, new_label = three_days["root"], three_days["deleted"], three_days["new_label"]
    key = f"{deleted.parent.name}/{deleted.name}"
    keys = {v: set(delta.load(str(root / "out"), {}, v).to_pyarrow_dataset().to_table(columns=["image_key"])
                   .column("image_key").to_pylist()) for v in (0, 1)}
    assert key in keys[0] and key not in keys[1]
    day3 = three_days["day3"]["listed"][-1]
    assert new_label in day3["metrics"]["labels"] and new_label not in three_days["day2"]["listed"][-1]["metrics"]["labels"]
    comparison = three_days["day3"]["record"]["comparison"]
    assert comparison["labels_only_candidate"] == [new_label]
    assert comparison["labels_compared"] == three_days["labels"]
    assert "labels both models know" in day3["reason"]


@pytest.mark.integration
@pytest.mark.slow
def test_a_day_run_twice_adds_no_table_version_and_no_candidate(three_days):
    again, day3 = three_days["day3_again"], three_days["day3"]
    assert again["table_version"] == day3["table_version"] == 2
    assert again["listed"] == day3["listed"]
    assert again["line"]["candidate"] == day3["line"]["candidate"] and not again["line"]["trained"]
    assert again["record"]["table"]["changed"] is False and again["record"]["decided_earlier"]
    assert again["champion"] == day3["champion"]


@pytest.mark.integration
@pytest.mark.slow
def test_a_worse_candidate_is_kept_with_its_reason_and_force_and_rollback(three_days, tmp_path):
    """A candidate trained on shuffled labels of the same table version is registered but
    not promoted; the reason names the metrics; ``--force`` promotes it, ``rollback`` undoes it."""
    models = tmp_path / "models"
    shutil.copytree(three_days["root"] / "models", models)
    registry = Registry(str(models))
    champion = registry.champion().doc["version"]
    tv = candidate.read_table_version(str(three_days["root"] / "out"), {}, 2)
    rng = np.random.default_rng(0)
    tv.rows["label"] = rng.permutation(tv.rows["label"].astype(str).to_numpy())
    bad = candidate.train_candidate(tv, {}, trigger="test")
    version = registry.register(bad.bundle, bad.metrics, bad.lineage, bad.files)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    decision = json.loads(_fruitdask(cwd, "model", "promote", "../models", version).stdout)
    assert decision["promoted"] is False and decision["reason"].startswith("not promoted: accuracy")
    assert decision["comparison"]["candidate"]["accuracy"] < decision["comparison"]["champion"]["accuracy"] - 0.01
    assert registry.champion().doc["version"] == champion
    row = next(r for r in _listed(cwd, "../models") if r["version"] == version)
    assert row["promoted"] is False and row["reason"] == decision["reason"] and not row["champion"]
    forced = json.loads(_fruitdask(cwd, "model", "promote", "../models", version, "--force").stdout)
    assert forced["promoted"] and forced["forced"] and registry.champion().doc["version"] == version
    back = json.loads(_fruitdask(cwd, "model", "rollback", "../models").stdout)
    assert back["version"] == champion and registry.champion().doc["version"] == champion
    shown = json.loads(_fruitdask(cwd, "model", "show", "../models", version).stdout)
    assert shown["lineage"]["table_version"] == 2 and shown["decision"]["forced"] is True


@pytest.mark.integration
@pytest.mark.slow
def test_train_models_registers_a_candidate_at_a_table_version_and_a_version_is_a_bundle(three_days, tmp_path):
    models = tmp_path / "models"
    line = _last_json(_fruitdask(tmp_path, "train", "--features", str(three_days["root"] / "out"), "--models", "models",
                                 "--version", "0"))
    assert line["table_version"] == 0 and line["promoted"] is False
    [row] = _listed(tmp_path, "models")
    assert row["version"] == line["version"] and row["table_version"] == 0 and row["promoted"] is None
    lineage = json.loads((models / line["version"] / "lineage.json").read_text())
    assert lineage["trigger"] == "train" and lineage["table_version"] == 0
    # Same key-hash split as the day-1 daily candidate on the same table version.
    assert lineage["n_held_out"] == json.loads((three_days["root"] / "models" / three_days["day1"]["line"]["candidate"]
                                                / "lineage.json").read_text())["n_held_out"]
    bundle = ModelBundle.load(str(models / line["version"]))  # what `serve --model` and `predict --model` load
    assert bundle.labels == three_days["labels"]


# --- the alias: one of two promotions wins ---------------------------------------------------


def _race(url: str, storage_options: dict) -> list[bool]:
    """Two writers that read the same champion each try to move it; who won."""
    first = alias.replace(url, storage_options, {"version": "a"}, None)
    assert first
    read = alias.read(url, storage_options)
    results: list[bool] = []
    barrier = threading.Barrier(2)

    def promote(v: str) -> None:
        barrier.wait()
        results.append(alias.replace(url, storage_options, {"version": v}, read.version))

    threads = [threading.Thread(target=promote, args=(v,)) for v in ("b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_promotions_from_the_same_champion_one_wins_locally(tmp_path):
    url = str(tmp_path / "models" / "champion.json")
    for _ in range(20):
        if os.path.exists(url):
            os.unlink(url)
        assert sorted(_race(url, {})) == [False, True]
        assert alias.read(url, {}).doc["version"] in ("b", "c")
    assert alias.replace(url, {}, {"version": "d"}, None) is False, "create refuses when one exists"


def test_two_promotions_from_the_same_champion_one_wins_on_s3(s3):
    s3.bucket("fruits-models", "eu-west-3")
    assert sorted(_race("s3://fruits-models/models/champion.json", s3.storage_options)) == [False, True]
    assert alias.replace("s3://fruits-models/models/champion.json", s3.storage_options, {"version": "d"}, None) is False


def test_a_promotion_that_read_a_stale_champion_is_refused_with_the_fix(tmp_path):
    registry = Registry(str(tmp_path / "models"))
    read = registry.champion()
    registry.move_champion(read, "v1", "first")
    with pytest.raises(ConflictError, match=r"changed while this command decided .* run the command again"):
        registry.move_champion(read, "v2", "stale")
    doc = registry.champion().doc
    assert doc["version"] == "v1" and doc["history"] == []


def test_versions_sort_in_creation_order_and_the_held_out_split_is_stable():
    names = [new_version() for _ in range(50)]
    assert names == sorted(names)
    keys = [f"Apple/{i}.jpg" for i in range(2000)]
    mask = candidate.held_out(keys)
    assert 0.15 < mask.mean() < 0.25
    # The same key is held out whatever else the table holds (the lake grows).
    assert list(candidate.held_out(keys[::-1])[::-1]) == list(mask)
    assert list(candidate.held_out(keys[:100])) == list(mask[:100])


@pytest.mark.parametrize(("name", "cls_name", "argv"), [
    ("model", "ModelOptions", ["model", "promote", "models", "v1"]),
    ("daily", "DailyOptions", ["daily", "--models", "models"]),
    ("train", "TrainOptions", ["train", "--features", "out", "--models", "models", "--version", "3"]),
])
def test_every_flag_of_model_daily_and_train_reaches_a_field(name, cls_name, argv):
    """As tests/test_command_options.py does for the other commands: no flag is dropped on
    the way to the command's frozen options value (daily's run flags go to its RunConfig)."""
    import argparse
    import dataclasses
    import importlib

    from fruitdask.cli import COMMAND_MODULES, build_parser
    from fruitdask.config import RunConfig

    cls = getattr(importlib.import_module(COMMAND_MODULES[name][0]), cls_name)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    parser = build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    fields = {f.name for f in dataclasses.fields(cls)} | ({f.name for f in dataclasses.fields(RunConfig)} if name == "daily" else set())
    lost = {a.dest for a in sub._actions if a.dest not in ("help", "debug", "quiet") and a.dest not in fields
            and not a.dest.startswith(("storage_", "kube_"))}
    assert not lost
    opts = cls.from_args(parser.parse_args(argv))
    if name == "train":
        assert opts.models == "models" and opts.table_version == 3
    if name == "daily":
        assert opts.models == "models" and opts.config.image_size == RunConfig().image_size


def test_train_models_refuses_a_held_out_set_and_version_needs_models(tmp_path):
    for argv, message in ((["--models", "m", "--test-input", "t"], "leave out --test-input"),
                          (["--version", "2", "--test-input", "t"], "--version V picks the table version"),
                          ([], "or --models MODELS")):
        done = subprocess.run([sys.executable, "-m", "fruitdask", "train", "--features", "out", *argv], cwd=tmp_path,
                              env=_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_gate_settings_refuse_bad_values_with_the_fix():
    from fruitdask.errors import ConfigError

    with pytest.raises(ConfigError, match="--margin 150"):
        gate.GateSettings(margin_points=150)
    with pytest.raises(ConfigError, match="--max-unknown-rate 2"):
        gate.GateSettings(max_unknown_rate=2)


# --- killed at each step of a day ------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["featurizing", "published", "trained", "registered", "promoted"])
def test_a_daily_killed_at_each_step_then_run_again_is_one_day(stage, tmp_path, weights_file):
    data = copy_images(BUNDLED, tmp_path / "in", 4, 9)
    args = _daily_args(data, "out", "models", weights_file)
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "kill_at.py"), stage, *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == -9, f"daily was not killed at {stage} (exit {proc.returncode}): {err[-2000:]}"
    after_a_killed_run(TTL)  # the next run takes the dead run's lock over
    line = _last_json(_fruitdask(tmp_path, *args))
    assert delta.load(str(tmp_path / "out"), {}).version() == 0, "one table version"
    listed = _listed(tmp_path, "models")
    assert len(listed) == 1, f"one candidate for table version 0, got {[r['version'] for r in listed]}"
    assert listed[0]["table_version"] == 0 and listed[0]["champion"] and listed[0]["promoted"] is True
    assert line["candidate"] == listed[0]["version"] and line["promoted"]
    assert line["trained"] == (stage in ("featurizing", "published", "trained")), "a registered candidate is found, not trained again"
    champion = json.loads((tmp_path / "models" / "champion.json").read_text())
    assert champion["version"] == listed[0]["version"] and champion["history"] == []
    assert _daily_record(tmp_path / "out", line)["champion_after"] == listed[0]["version"]


# --- a day on S3 -----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_a_day_on_s3(s3, tmp_path, weights_file):
    s3.bucket("fruits-daily-in", "eu-west-1")
    s3.bucket("fruits-daily-out", "eu-west-3")
    data = copy_images(BUNDLED, tmp_path / "in", 4, 9)
    s3.upload(data, "s3://fruits-daily-in/Training")
    out, models = "s3://fruits-daily-out/lake/run-1", "s3://fruits-daily-out/models"
    env = _env({"AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
                "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing")})
    args = _daily_args("s3://fruits-daily-in/Training", out, models, weights_file, "--s3-endpoint", s3.endpoint)
    line = _last_json(_fruitdask(tmp_path, *args, env=env))
    assert line["version"] == 0 and line["trained"] and line["promoted"]
    again = _last_json(_fruitdask(tmp_path, *args, env=env))
    assert again["candidate"] == line["candidate"] and not again["trained"] and not again["changed"]
    listed = json.loads(_fruitdask(tmp_path, "model", "list", models, "--json", "--s3-endpoint", s3.endpoint, env=env).stdout)
    assert [r["version"] for r in listed] == [line["candidate"]] and listed[0]["champion"]
    lineage = json.loads(s3.read(f"fruits-daily-out/models/{line['candidate']}/lineage.json"))
    assert lineage["table_uri"] == out and lineage["table_version"] == 0
    assert json.loads(s3.read("fruits-daily-out/models/champion.json"))["version"] == line["candidate"]
    record = json.loads(s3.read(f"fruits-daily-out/lake/run-1/{line['daily']}"))
    assert record["promoted"] and record["candidate"] == line["candidate"]
