"""int8's calibration set, drawn from the lake itself and recorded with the table.

On a table's first int8 run, :func:`sample` draws a seeded per-label sample (about
:data:`SIZE` images, fewer when the lake is small) of the images the run lists;
:class:`Calibration` (their keys relative to the input root, the root, and a digest of the
keys) goes into the feature settings (``FeatureSettings.calibration``, as JSON), so every
later run quantizes from the very same images (read again by key), the int8 features are
reproducible, and the table's fingerprint (which includes the digest) stays the same as the
lake grows, and differs from bf16's.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Images in a calibration set (NNCF's default subset is 300).
SIZE = 300


@dataclass(frozen=True)
class Calibration:
    """The calibration images: ``keys`` relative to ``root``, and their ``digest``."""

    root: str
    keys: tuple[str, ...]

    @property
    def digest(self) -> str:
        """sha256 of the sorted keys: names the set in the fingerprint and the model cache.
        The root is left out: a lake moved to another prefix keeps its calibration."""
        return hashlib.sha256("\n".join(sorted(self.keys)).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({"digest": self.digest, "root": self.root, "keys": list(self.keys)})

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        doc = json.loads(text)
        return cls(str(doc["root"]), tuple(doc["keys"]))

    def urls(self) -> list[str]:
        """Where each image is read from."""
        return [f"{self.root.rstrip('/')}/{k}" for k in self.keys]


def sample(root: str, keys: Sequence[str], labels: Sequence[str], seed: int = 0, size: int = SIZE) -> Calibration:
    """A seeded sample of ``size`` of ``keys`` spread evenly over ``labels`` (round robin over
    the labels, each label's keys shuffled by ``seed``); all of them when there are fewer."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for key, label in zip(keys, labels, strict=True):
        by_label[label].append(key)
    rng = random.Random(seed)
    pools = []
    for label in sorted(by_label):
        pool = sorted(by_label[label])
        rng.shuffle(pool)
        pools.append(pool)
    chosen: list[str] = []
    while len(chosen) < size and any(pools):
        for pool in pools:
            if pool and len(chosen) < size:
                chosen.append(pool.pop())
    return Calibration(root, tuple(sorted(chosen)))


def digest_of(calibration_json: str | None) -> str | None:
    """The digest recorded in a settings' ``calibration`` field (``None`` without one)."""
    return json.loads(calibration_json)["digest"] if calibration_json else None


def _decode(data: bytes, size: int) -> np.ndarray:
    """One calibration image as ``(size, size, 3)`` uint8 RGB: EXIF orientation applied,
    resized as :func:`fruitdask.features.featurize.decode_image` resizes (bicubic). That
    function is not imported here: a runtime imports this module, and the featurizing module
    imports the runtimes (a cycle); calibration images only set the quantization ranges, and
    they were listed (and featurized) as images of the lake already."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        rgb = ImageOps.exif_transpose(img).convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.uint8)


def load_images(calibration_json: str, image_size: int, storage_options: Mapping[str, Any] | None) -> np.ndarray:
    """The calibration images, read by key and decoded (uint8).

    Raises
    ------
    CalibrationError
        When fewer than half of them can still be read (the lake lost its calibration images:
        rebuild the table to draw a new set).
    """
    from fruitdask import storage
    from fruitdask.errors import CalibrationError

    cal = Calibration.from_json(calibration_json)
    decoded, first_error = [], "none"
    for url in cal.urls():
        try:
            decoded.append(_decode(storage.read_bytes(url, storage_options), image_size))
        except (OSError, ValueError, SyntaxError) as e:  # unreadable, undecodable (PIL raises these)
            first_error = first_error if first_error != "none" else f"{url}: {e}"
    if len(decoded) * 2 < len(cal.keys) or not decoded:
        raise CalibrationError(
            f"only {len(decoded)} of the {len(cal.keys)} int8 calibration images under {cal.root!r} could be read "
            f"(first failure: {first_error}): restore them, or run with --rebuild to draw a new set"
        )
    return np.stack(decoded)
