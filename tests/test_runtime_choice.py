"""Which runtime a run uses (fruitdask/features/runtimes/choice.py) and int8's calibration
sample (fruitdask/features/calibration.py): pure functions, no model. These fail on the code
before the int8 runtime (neither module existed)."""

from __future__ import annotations

import pytest

from fruitdask.errors import ConfigError
from fruitdask.features.calibration import Calibration, sample
from fruitdask.features.runtimes.choice import choose
from fruitdask.features.settings import FeatureSettings
from fruitdask.lake.keys import settings_fingerprint

TF_TABLE = {"image_size": 32, "pooling": "avg", "precision": "float32"}
INT8_TABLE = {**TF_TABLE, "precision": "int8", "runtime": "openvino", "calibration": Calibration("r", ("a/1",)).to_json()}


def test_int8_alone_picks_openvino_and_tensorflow_refuses_it():
    assert choose("auto", "int8", None, replacing=False, openvino_installed=True).runtime == "openvino"
    with pytest.raises(ConfigError, match="--runtime openvino"):
        choose("tensorflow", "int8", None, replacing=False, openvino_installed=True)
    with pytest.raises(ConfigError, match="not installed"):
        choose("auto", "int8", None, replacing=False, openvino_installed=False)


def test_auto_keeps_the_tables_runtime_and_stays_on_tensorflow_for_a_new_table():
    new = choose("auto", "auto", None, replacing=False, openvino_installed=True)
    assert (new.runtime, new.precision) == ("tensorflow", "auto")
    tf_table = choose("auto", "auto", TF_TABLE, replacing=False, openvino_installed=True)
    assert (tf_table.runtime, tf_table.precision) == ("tensorflow", "auto")  # today's path: precision resolved as before
    kept = choose("auto", "auto", INT8_TABLE, replacing=False, openvino_installed=True)
    assert (kept.runtime, kept.precision, kept.calibration) == ("openvino", "int8", INT8_TABLE["calibration"])
    again = choose("auto", "int8", INT8_TABLE, replacing=False, openvino_installed=True)
    assert again.calibration == INT8_TABLE["calibration"]
    rebuilt = choose("auto", "int8", INT8_TABLE, replacing=True, openvino_installed=True)
    assert rebuilt.calibration is None  # --rebuild draws a new set


def test_calibration_sample_is_seeded_per_label_and_stable():
    keys = [f"{lab}/{i}.jpg" for lab in "ABC" for i in range(200)]
    labels = [k.split("/")[0] for k in keys]
    cal = sample("s3://b/lake", keys, labels, seed=0)
    assert len(cal.keys) == 300 and {k.split("/")[0] for k in cal.keys} == {"A", "B", "C"}
    assert sum(k.startswith("A/") for k in cal.keys) == 100
    assert sample("s3://b/lake", keys[::-1], labels[::-1], seed=0) == cal  # listing order does not matter
    assert sample("s3://b/lake", keys, labels, seed=1).digest != cal.digest
    assert len(sample("r", keys[:5], labels[:5]).keys) == 5  # a small lake: all of it
    assert Calibration.from_json(cal.to_json()) == cal and cal.urls()[0].startswith("s3://b/lake/")


def test_fingerprint_keeps_tensorflow_tables_and_separates_int8_calibrations():
    tf = FeatureSettings("w", 32, "avg", 8, "float32")
    assert settings_fingerprint(tf) == settings_fingerprint(FeatureSettings("w", 32, "avg", 16, "float32"))
    a = FeatureSettings("w", 32, "avg", 8, "int8", runtime="openvino", calibration=Calibration("r", ("a/1",)).to_json())
    b = FeatureSettings("w", 32, "avg", 8, "int8", runtime="openvino", calibration=Calibration("r", ("a/2",)).to_json())
    moved = FeatureSettings("w", 32, "avg", 8, "int8", runtime="openvino", calibration=Calibration("s3://x", ("a/1",)).to_json())
    bf16 = FeatureSettings("w", 32, "avg", 8, "bfloat16", runtime="openvino")
    assert len({settings_fingerprint(s) for s in (tf, a, b, bf16)}) == 4
    assert settings_fingerprint(moved) == settings_fingerprint(a)  # the root is not part of it
