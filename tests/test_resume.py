"""``--resume``: a run that dies after featurization reuses the checkpointed partitions
instead of running VGG16 again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import BUNDLED, SMALL_SIZE, copy_images, read_features
from runtime_doubles import count_calls, model_calls

from fruitdask import checkpoint, pca_moments, pipeline, storage
from fruitdask.config import build_config
from fruitdask.features import featurize, frames
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsArrays


class CrashDuringPCA(RuntimeError):
    """Stands in for a driver killed while the PCA runs."""


@pytest.fixture(scope="module")
def cluster_client(module_local_cluster):
    cluster, client = module_local_cluster(1, 2, processes=False, amm=False, set_as_default=False)
    client.run(count_calls)  # in-process workers: the test's own process
    return cluster.scheduler_address, client


def model_images(client) -> int:
    """Images run through VGG16 so far, summed over the workers."""
    return sum(c.get("images", 0) for c in client.run(model_calls).values())


def features(out: Path) -> pd.DataFrame:
    df = read_features(out)
    return df.sort_values("path").reset_index(drop=True)


@pytest.mark.integration
def test_resume_after_a_crash_during_pca_reuses_checkpoints(tmp_path, cluster_client, weights_file, monkeypatch):
    address, client = cluster_client
    images = copy_images(BUNDLED, tmp_path / "in", 3, 4)
    (images / "Apricot" / "broken.jpg").write_bytes(b"")  # its error must survive the resume too
    out = tmp_path / "out"
    flags = {
        "input": str(images), "output": str(out), "cluster": address, "image_size": SMALL_SIZE,
        "weights": str(weights_file), "partition_size": 4, "components": 3, "quiet": True,
    }

    def crash(*args, **kwargs):
        raise CrashDuringPCA("killed during PCA")

    with monkeypatch.context() as m:
        m.setattr(pca_moments, "fit", crash)
        before = model_images(client)
        with pytest.raises(CrashDuringPCA):
            pipeline.run(build_config(flags, {}))
    computed = model_images(client) - before
    assert computed == 12
    assert not out.exists()
    assert not list(tmp_path.glob(".out.fruitdask-tmp-*")), "the failed run's staging prefix was left behind"
    parts = list(Path(checkpoint.checkpoint_root(str(out))).glob("*/part-*.parquet"))
    assert len(parts) >= 3

    before = model_images(client)
    result = pipeline.run(build_config({**flags, "resume": True}, {}))
    assert model_images(client) - before == 0, "VGG16 ran again although every partition was checkpointed"
    assert result.counts == {"images_listed": 13, "labels": 3, "rows_written": 12, "errors": 1, "listed": 13, "added": 12,
                             "updated": 0, "removed": 0, "unchanged": 0, "featurized": 13}
    assert result.extra["checkpoint"]["resume"] is True
    assert not Path(checkpoint.checkpoint_root(str(out))).exists(), "checkpoints outlived the committed run"

    # Same features as an uninterrupted run that computes everything.
    before = model_images(client)
    pipeline.run(build_config({**flags, "output": str(tmp_path / "fresh")}, {}))
    assert model_images(client) - before == 12
    resumed, fresh = features(out), features(tmp_path / "fresh")
    assert list(resumed["path"]) == list(fresh["path"]) and resumed["path"].is_unique
    np.testing.assert_array_equal(frames.matrix(resumed["features"]), frames.matrix(fresh["features"]))


SETTINGS = FeatureSettings("w", 32, "avg", 8)


def _listing(n: int) -> pd.DataFrame:
    return pd.DataFrame({"path": [f"/x/L/{i}.jpg" for i in range(n)], "label": ["L"] * n})


def _fake_featurize(calls: list):
    def featurize_frame(df, weights, settings, **kwargs):
        calls.append(len(df))
        result = frames.assemble(
            df, featurize.BatchResult(np.full((len(df), 4), 7.0, np.float32), list(range(len(df)))), {}
        )
        return result

    return featurize_frame


def test_checkpoint_roundtrip_and_damaged_files(tmp_path, monkeypatch):
    ckpt = checkpoint.Checkpoints(prefix=str(tmp_path / "ck"), resume=True)
    df, calls = _listing(5), []
    monkeypatch.setattr(frames, "featurize_frame", _fake_featurize(calls))
    weights = WeightsArrays((), "w")
    first = checkpoint.featurize_checkpointed(df, weights, SETTINGS, ckpt)
    again = checkpoint.featurize_checkpointed(df, weights, SETTINGS, ckpt)
    assert calls == [5]
    pd.testing.assert_frame_equal(first, again)
    assert list(again.dtypes) == list(frames.features_meta().dtypes)

    # A torn file (worker killed mid-write) is recomputed, not trusted.
    Path(ckpt.part_url(df)).write_bytes(b"PAR1 torn")
    checkpoint.featurize_checkpointed(df, weights, SETTINGS, ckpt)
    assert calls == [5, 5]

    # Other rows get another file; without --resume nothing is read.
    checkpoint.featurize_checkpointed(_listing(6), weights, SETTINGS, ckpt)
    fresh = checkpoint.Checkpoints(prefix=ckpt.prefix, resume=False)
    checkpoint.featurize_checkpointed(df, weights, SETTINGS, fresh)
    assert calls == [5, 5, 6, 5]


def test_checkpoint_location_is_deterministic():
    cfg = build_config({"input": "i", "output": "s3://b/runs/out", "image_size": 32, "weights": "random"}, {})
    def target(url: str) -> storage.OutputTarget:
        return storage.OutputTarget.for_update(url, {}, run_id="r")

    a = checkpoint.for_run(target(cfg.output), FeatureSettings.from_config(cfg, "abc"), cfg.resume)
    b = checkpoint.for_run(target(cfg.output + "/"), FeatureSettings.from_config(cfg, "abc"), cfg.resume)
    assert a.prefix == b.prefix and a.prefix.startswith("s3://b/runs/.out.fruitdask-checkpoint/")
    other = build_config({"input": "i", "output": "s3://b/runs/out", "image_size": 64, "weights": "random"}, {})
    assert checkpoint.for_run(target(other.output), FeatureSettings.from_config(other, "abc"), other.resume).prefix != a.prefix
    assert checkpoint.for_run(target(cfg.output), FeatureSettings.from_config(cfg, "def"), cfg.resume).prefix != a.prefix


@pytest.mark.integration
def test_a_file_changed_before_resume_is_featurized_again(tmp_path, cluster_client, weights_file, monkeypatch):
    """A file fixed in place (it did not decode) and one replaced in place between a failed run
    and ``--resume``: their partitions are featurized again, the others reused; the table holds
    what an uninterrupted run of the new files holds. Fails before this change: checkpoints
    were keyed on ``path, label`` only, so the stale features and the stale decode error came
    back."""
    address, client = cluster_client
    images = copy_images(BUNDLED, tmp_path / "in", 3, 4)
    broken, replaced = images / "Apricot" / "broken.jpg", sorted((images / "Avocado").glob("*.jpg"))[0]
    broken.write_bytes(b"")
    out = tmp_path / "out"
    flags = {"input": str(images), "output": str(out), "cluster": address, "image_size": SMALL_SIZE,
             "weights": str(weights_file), "partition_size": 4, "components": 3, "quiet": True}

    def crash(*args, **kwargs):
        raise CrashDuringPCA("killed during PCA")

    with monkeypatch.context() as m:
        m.setattr(pca_moments, "fit", crash)
        with pytest.raises(CrashDuringPCA):
            pipeline.run(build_config(flags, {}))
    others = sorted(p for p in BUNDLED.rglob("*.jpg") if p.parent.name not in {"Apricot", "Avocado", "Banana"})
    broken.write_bytes(others[0].read_bytes())  # fixed in place
    replaced.write_bytes(others[1].read_bytes())  # another photo under the same name

    before = model_images(client)
    result = pipeline.run(build_config({**flags, "resume": True}, {}))
    recomputed = model_images(client) - before
    assert result.counts["errors"] == 0 and result.counts["rows_written"] == 13
    assert 2 <= recomputed <= 8, f"{recomputed} images recomputed: only the two changed files' partitions should be"
    pipeline.run(build_config({**flags, "output": str(tmp_path / "fresh")}, {}))
    resumed, fresh = features(out), features(tmp_path / "fresh")
    assert list(resumed["path"]) == list(fresh["path"])
    np.testing.assert_array_equal(frames.matrix(resumed["features"]), frames.matrix(fresh["features"]))
