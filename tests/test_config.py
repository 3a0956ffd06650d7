"""The run configuration: flags over environment over defaults, validated once."""

from __future__ import annotations

import dataclasses

import pytest

from fruitdask.config import EU_REGIONS, RunConfig, build_config
from fruitdask.errors import ConfigError
from fruitdask.features.settings import FeatureSettings
from fruitdask.storage.options import storage_options

BASE = {"input": "in", "output": "out"}


def test_defaults():
    cfg = build_config(BASE, {})
    assert (cfg.backend, cfg.cluster, cfg.image_size, cfg.batch_size, cfg.pooling, cfg.weights, cfg.variance) == (
        "dask", "local", 224, 32, "avg", "auto", 0.95,
    )
    assert cfg.storage.allowed_regions == EU_REGIONS
    assert "eu-west-2" not in EU_REGIONS and "eu-central-2" not in EU_REGIONS
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.image_size = 1  # type: ignore[misc]


def test_flags_override_environment_which_overrides_defaults():
    env = {"FRUITDASK_IMAGE_SIZE": "64", "FRUITDASK_BATCH_SIZE": "8", "FRUITDASK_QUIET": "true",
           "FRUITDASK_STORAGE_ALLOWED_REGIONS": "eu-west-1,eu-west-3", "FRUITDASK_KUBE_N_WORKERS": "5",
           "FRUITDASK_COMPONENTS": "7"}
    cfg = build_config({**BASE, "image_size": 96}, env)
    assert cfg.image_size == 96  # flag wins
    assert cfg.batch_size == 8 and cfg.quiet is True and cfg.components == 7  # environment
    assert cfg.storage.allowed_regions == ("eu-west-1", "eu-west-3")
    assert cfg.kube.n_workers == 5


def test_aws_endpoint_variable_is_honoured():
    cfg = build_config(BASE, {"AWS_ENDPOINT_URL": "http://127.0.0.1:5555"})
    assert storage_options(cfg.storage)["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:5555"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"image_size": 16}, "--image-size 16 is too small"),
        ({"pooling": "mean"}, "unknown pooling 'mean'"),
        ({"variance": 1.5}, "--variance must be in"),
        ({"components": 0}, "--components must be at least 1"),
        ({"input": ""}, "no input given"),
    ],
)
def test_bad_values_are_refused_with_the_fix(flags, message):
    with pytest.raises(ConfigError, match=message):
        build_config({**BASE, **flags}, {})


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="FRUITDASK_IMAGE_SIZE='big'"):
        build_config(BASE, {"FRUITDASK_IMAGE_SIZE": "big"})


def test_feature_dim_and_error_budget():
    assert FeatureSettings("w", 224, "none", 8).feature_dim == 25088
    assert FeatureSettings("w", 224, "avg", 8).feature_dim == 512
    assert RunConfig(max_errors=0.1).max_errors_allowed(120) == 12
    assert RunConfig(max_errors=3).max_errors_allowed(120) == 3
    assert RunConfig().max_errors_allowed(120) is None


def test_storage_options_hold_no_credentials():
    env = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-SECRET", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY"}
    cfg = build_config({**BASE, "storage_endpoint_url": "http://x", "storage_profile": "p"}, env)
    text = repr(storage_options(cfg.storage)) + repr(cfg.to_dict())
    assert "SECRET" not in text and "AKIAEXAMPLEKEY" not in text


def test_config_holds_plain_values_and_only_the_storage_package_builds_s3fs_options():
    """A second storage (GCS, Azure) would touch fruitdask/storage only (issue 25)."""
    import ast
    from pathlib import Path

    import fruitdask.config

    tree = ast.parse(Path(fruitdask.config.__file__).read_text())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imports |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {"client_kwargs", "config_kwargs", "region_name", "profile"} & strings
    assert not {m for m in imports if m.split(".")[0] in ("s3fs", "fsspec", "botocore") or m.startswith("fruitdask.storage")}


def test_local_cluster_shape_defaults():
    from fruitdask.backends.dask.cluster import LocalShape, local_shape

    assert local_shape(None, None, cores=2) == LocalShape(1, 2)  # measured best on 2 cores
    assert local_shape(None, None, cores=16) == LocalShape(1, 16)  # and on 16
    assert local_shape(None, None, cores=1) == LocalShape(1, 1)
    assert local_shape(None, None, cores=4) == LocalShape(1, 4)
    assert local_shape(None, None, cores=64) == LocalShape(4, 16)  # a worker per 16 cores above
    assert local_shape(2, None, cores=2) == LocalShape(2, 1)  # an explicit choice wins, completed
    assert local_shape(None, 4, cores=16) == LocalShape(4, 4)
    assert local_shape(3, 5, cores=2) == LocalShape(3, 5)


def test_local_workers_warm_up_as_they_start_without_any_task(local_cluster):
    import time

    from fruitdask.backends.dask.cluster import _warm_up_preload
    from fruitdask.config import build_config
    from fruitdask.features import model

    assert _warm_up_preload(None) == {}
    assert _warm_up_preload(FeatureSettings.from_config(build_config({"input": "i", "output": "o", "precision": "auto"}, {}))) == {}
    cfg = build_config({"input": "i", "output": "o", "image_size": 32, "precision": "float32"}, {})
    _, client = local_cluster(1, 1, **_warm_up_preload(FeatureSettings.from_config(cfg)))
    deadline = time.monotonic() + 120
    while not (built := client.run(lambda: dict(model.WARM)))[next(iter(built))].get("built"):
        assert time.monotonic() < deadline, "the worker never warmed up"
        time.sleep(0.5)


def test_storage_settings_read_only_the_storage_environment():
    """A run setting in the environment (``FRUITDASK_VARIANCE=2``) is no concern of storage."""
    from fruitdask.config import build_storage_settings

    env = {"FRUITDASK_VARIANCE": "2", "FRUITDASK_IMAGE_SIZE": "big", "FRUITDASK_KUBE_N_WORKERS": "x",
           "FRUITDASK_STORAGE_ALLOWED_REGIONS": "eu-west-3", "AWS_ENDPOINT_URL": "http://127.0.0.1:5555"}
    settings = build_storage_settings({"storage_region": "eu-west-3"}, env)
    assert settings.allowed_regions == ("eu-west-3",) and settings.region == "eu-west-3"
    assert settings.endpoint_url == "http://127.0.0.1:5555"
    with pytest.raises(ConfigError, match="FRUITDASK_STORAGE_CONNECT_TIMEOUT='soon'"):
        build_storage_settings({}, {"FRUITDASK_STORAGE_CONNECT_TIMEOUT": "soon"})


@pytest.mark.parametrize("command", [["serve", "--model", "{tmp}"], ["predict", "x.jpg", "--model", "{tmp}"],
                                     ["train", "--features", "{tmp}", "--test-features", "{tmp}", "--model-out", "{tmp}/m"],
                                     ["report", "{tmp}"], ["model", "show", "{tmp}", "v1"]])
def test_a_run_setting_in_the_environment_does_not_break_the_other_commands(command, tmp_path, monkeypatch, capsys):
    from fruitdask.cli import main

    monkeypatch.setenv("FRUITDASK_VARIANCE", "2")
    monkeypatch.setenv("FRUITDASK_IMAGE_SIZE", "big")
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in command])
    err = capsys.readouterr().err
    assert rc != 0  # tmp_path is no model and no run: each fails for its own reason
    assert "variance" not in err and "IMAGE_SIZE" not in err, err
