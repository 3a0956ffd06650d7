"""Exactly once under a client killed at any stage (issue 21), locally and on S3 (moto).

Each case runs ``fruitdask run`` as a process group (:mod:`kill_at`), SIGKILLs the whole group
(client and local cluster, no cleanup) at one stage of a run, then runs the same command
again: the table must hold every current image exactly once, with one row per image and the
features of an undisturbed run. The killed run's lock is a lease (3 s here) that the second
run takes over at once, its holder's pid being gone (conftest's ``after_a_killed_run``). A
first run is killed on a new table; an update run (new, changed and removed images) is killed
on an existing one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED, SMALL_SIZE, after_a_killed_run, copy_images, read_features
from PIL import Image, ImageOps

from fruitdask.config import TF_ENV
from fruitdask.lake import table as delta

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TTL = 3
STAGES = ["planned", "featurizing", "fitting", "projecting", "committing", "published"]


def _env(extra: dict | None = None) -> dict:
    return {**os.environ, **TF_ENV, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "FRUITDASK_STORAGE_LOCK_TTL": str(TTL),
            **(extra or {})}


def _args(data: str, out: str, weights: str, *extra: str) -> list[str]:
    return ["run", "--input", data, "--output", out, "--image-size", str(SMALL_SIZE), "--weights", weights,
            "--precision", "float32", "--workers", "1", "--partition-size", "3", "--quiet", *extra]


def _killed(stage: str, args: list[str], env: dict) -> None:
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "kill_at.py"), stage, *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -9, f"the run was not killed at {stage} (exit {proc.returncode}): {err[-2000:]}"
    after_a_killed_run(TTL)  # the next run takes the dead run's lock over


def _again(args: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "fruitdask", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _grow(data: Path) -> list[str]:
    """Two new images, one changed, one removed; returns the current keys."""
    apricots = sorted((data / "Apricot").glob("*.jpg"))
    ImageOps.mirror(Image.open(apricots[0])).save(data / "Apricot" / "new_0.jpg")
    ImageOps.mirror(Image.open(apricots[1])).save(data / "Avocado" / "new_1.jpg")
    ImageOps.flip(Image.open(apricots[2])).save(apricots[2])
    sorted((data / "Avocado").glob("*.jpg"))[0].unlink()
    return sorted(f"{p.parent.name}/{p.name}" for p in data.rglob("*.jpg"))


def _exactly_once(out: str, keys: list[str], options: dict | None, reference: dict[str, np.ndarray]) -> None:
    df = read_features(out, options)
    assert sorted(df["image_key"]) == keys and df["image_key"].is_unique
    assert df["pca_fit"].nunique() == 1, "every row's pca from one fit"
    for key, feats in zip(df["image_key"], df["features"], strict=True):
        if key in reference:
            np.testing.assert_allclose(np.asarray(feats), reference[key], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reference(weights_file) -> dict[str, np.ndarray]:
    """Features of every image any case uses, from one undisturbed single-process pass."""
    from fruitdask.features import frames, model
    from fruitdask.features.settings import FeatureSettings
    from fruitdask.features.weights_file import WeightsArrays
    from fruitdask.storage import list_images

    weights, info = model.load_weights(str(weights_file))
    listing = list_images(str(BUNDLED))
    out = frames.featurize_frame(listing, WeightsArrays.of(weights, info.sha256), FeatureSettings(info.sha256, SMALL_SIZE, "avg", 32))
    return {f"{lab}/{Path(p).name}": np.asarray(f) for p, lab, f in zip(out["path"], out["label"], out["features"], strict=True)}


@pytest.mark.parametrize("stage", STAGES)
def test_a_first_run_killed_then_run_again_leaves_every_image_once(stage, tmp_path, weights_file, reference):
    data = copy_images(BUNDLED, tmp_path / "in", 3, 3)
    out = tmp_path / "out"
    args = _args(str(data), str(out), str(weights_file))
    _killed(stage, args, _env())
    committed = (out / "features" / "_delta_log").exists()
    assert committed == (stage == "published"), "only a run killed after its commit has a table"
    _again(args, _env())
    _exactly_once(str(out), sorted(f"{p.parent.name}/{p.name}" for p in data.rglob("*.jpg")), None, reference)
    assert delta.load(str(out), {}).version() == 0, "one committed version: the killed run's or the second's"
    assert not list(tmp_path.glob(".out.fruitdask-tmp-*")), "the dead run's staging outlived the next run"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, weights_file) -> tuple[Path, Path]:
    """One undisturbed first run on 3 labels x 3 images in ``work`` (its ``in`` and ``out``),
    and a copy of that folder as the run left it, for the update cases to start from."""
    root = tmp_path_factory.mktemp("update")
    work, snapshot = root / "work", root / "snapshot"
    data = copy_images(BUNDLED, work / "in", 3, 3)
    _again(_args(str(data), str(work / "out"), str(weights_file)), _env())
    shutil.copytree(work, snapshot, symlinks=True)
    return work, snapshot


@pytest.fixture
def after_a_first_run(first_run) -> Path:
    """``work`` as the first run left it, whatever the case before did there: the same
    absolute paths, hence the same command line, and each image's mtime (its version) kept."""
    work, snapshot = first_run
    shutil.rmtree(work)
    shutil.copytree(snapshot, work, symlinks=True)
    return work


@pytest.mark.parametrize("stage", ["featurizing", "committing", "published"])
def test_an_update_killed_then_run_again_leaves_every_image_once(stage, after_a_first_run, weights_file, reference):
    data, out = after_a_first_run / "in", after_a_first_run / "out"
    args = _args(str(data), str(out), str(weights_file))
    keys = _grow(data)
    _killed(stage, args, _env())
    assert delta.load(str(out), {}).version() == (1 if stage == "published" else 0)
    _again(args, _env())
    _exactly_once(str(out), keys, None, {k: v for k, v in reference.items() if k != "Apricot/" + sorted(
        p.name for p in (BUNDLED / "Apricot").glob("*.jpg"))[2]})
    assert delta.load(str(out), {}).version() == 1


@pytest.mark.parametrize("stage", ["featurizing", "committing", "published"])
def test_on_s3_a_killed_run_then_run_again_leaves_every_image_once(stage, s3, tmp_path, weights_file, reference):
    s3.bucket("fruits-kill-in", "eu-west-1")
    s3.bucket("fruits-kill-out", "eu-west-3")
    data = copy_images(BUNDLED, tmp_path / "in", 3, 3)
    s3.upload(data, "s3://fruits-kill-in/Training")
    out = "s3://fruits-kill-out/features/run-1"
    args = _args("s3://fruits-kill-in/Training", out, str(weights_file), "--s3-endpoint", s3.endpoint)
    env = _env({"AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
                "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing")})
    _killed(stage, args, env)
    _again(args, env)
    keys = sorted(f"{p.parent.name}/{p.name}" for p in data.rglob("*.jpg"))
    _exactly_once(out, keys, s3.storage_options, reference)
    assert delta.load(out, s3.storage_options).version() == 0
    if stage != "published":  # (killed after its commit, the first run left no record; the second had nothing to do)
        assert json.loads(s3.read("fruits-kill-out/features/run-1/run.json"))["table"]["version_after"] == 0
