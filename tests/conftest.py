"""Shared fixtures: real Fruits-360 images, a tiny image size, helpers to run the CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from s3_server import s3, s3_server  # noqa: F401 - the moto S3 fixtures, for every test module

from fruitdask.config import TF_ENV

for _k, _v in TF_ENV.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
#: CI clones the repo beside shared/, as the sessions have it.
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE = SHARED_DATA / "fruits360-sample"
BENCH = SHARED_DATA / "fruits360-bench"
BUNDLED = REPO / "fruitdask" / "sample_data" / "Training"
SMALL_SIZE = 32  # the real VGG16 graph, at the smallest input it accepts


def copy_images(src: Path, dest: Path, labels: int, per_label: int) -> Path:
    """Copy ``per_label`` images of the first ``labels`` labels of ``src`` into ``dest``."""
    for label_dir in sorted(p for p in src.iterdir() if p.is_dir())[:labels]:
        target = dest / label_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted(label_dir.iterdir())[:per_label]:
            shutil.copy2(f, target / f.name)
    return dest


@pytest.fixture(scope="session")
def bundled_sample() -> Path:
    """The 120 real images shipped in the package (12 labels x 10)."""
    return BUNDLED


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """3 labels x 4 real images: the smallest input that still exercises everything."""
    return copy_images(BUNDLED, tmp_path_factory.mktemp("tiny") / "Training", 3, 4)


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """Seeded random VGG16 (no top) weights saved the way users save real ones."""
    from fruitdask.features import model

    path = tmp_path_factory.mktemp("weights") / "vgg16_notop.weights.h5"
    keras = model._keras()
    keras.utils.set_random_seed(1234)
    model.build_vgg16(SMALL_SIZE).save_weights(str(path))
    return path
