"""Decoding stays near the decoded image's own size (issue #23, item 1).

The colour conversions of ``featurize._to_rgb`` run in strips and with integer arithmetic,
and a gray image is resized before it becomes RGB. The pixels are those of the plain
full-size conversions they replace (the reference below), so ``predict``, the pipeline and
the server keep their features; the memory is measured in a fresh process (peak RSS).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from fruitdask.features import featurize


def reference_rgb(img: Image.Image, size: int) -> np.ndarray:
    """The conversion before issue #23: whole-image float64 and RGBA copies, then the resize."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "I" or arr.max(initial=0) > 255 else 255.0
        rgb = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    elif img.mode == "F":
        rgb = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64), 0, 255).astype(np.uint8)).convert("RGB")
    else:
        rgb = img.convert("RGB") if img.mode != "RGB" else img
    return np.asarray(rgb.resize((size, size), featurize.RESAMPLE) if rgb.size != (size, size) else rgb)


def _images(rng: np.random.Generator) -> dict[str, Image.Image]:
    h, w = 613, 301  # more than two strips, odd sizes
    gray16 = rng.integers(0, 65536, (h, w), dtype=np.uint16)
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    palette = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").convert("P")
    palette.info["transparency"] = 7
    return {
        "I;16": Image.fromarray(gray16),
        "I": Image.fromarray(gray16.astype(np.int32) * 2 - 20000),  # out of range both ways: clipped
        "I 8-bit": Image.fromarray(rng.integers(0, 256, (h, w)).astype(np.int32)),
        "F": Image.fromarray(rng.uniform(-10, 300, (h, w)).astype(np.float32)),
        "L": Image.fromarray(gray16.astype(np.uint8), "L"),
        "1": Image.fromarray(gray16 > 30000),
        "LA": rgba.convert("LA"),
        "RGBA": rgba,
        "P+transparency": palette,
        "P": palette.copy().convert("RGB").convert("P"),
        "CMYK": rgba.convert("RGB").convert("CMYK"),
    }


@pytest.mark.parametrize("size", [32, 224, 400])
def test_strip_conversions_give_the_pixels_of_the_full_size_ones(size):
    for mode, img in _images(np.random.default_rng(size)).items():
        want = reference_rgb(img, size)
        got = np.asarray(featurize._to_rgb(img, size))
        if got.shape[:2] != (size, size):
            got = np.asarray(Image.fromarray(got).resize((size, size), featurize.RESAMPLE))
        np.testing.assert_array_equal(got, want, err_msg=mode)


PEAK = """
import io, json, resource, sys
import numpy as np
from PIL import Image
from fruitdask.features import featurize
data = sys.stdin.buffer.read()
def rss():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
before = rss()
featurize.decode_image(data, 224)
print(json.dumps({"growth": rss() - before}))
"""


def peak_growth(data: bytes) -> int:
    """Peak RSS growth of one ``decode_image`` in a fresh process, in bytes."""
    proc = subprocess.run([sys.executable, "-c", PEAK], input=data, capture_output=True, cwd=REPO, timeout=120, check=True)
    return json.loads(proc.stdout)["growth"]


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


@pytest.mark.parametrize(("what", "make", "bound_mib"), [
    # 16M pixels; before issue #23: +428 MiB and +244 MiB. PIL's own decode of the 16-bit one
    # peaks at about 60 MiB; RGBA is 4 bytes a pixel (64 MiB) and so is PIL's RGB output.
    ("16-bit gray 4000x4000", lambda: Image.fromarray(np.zeros((4000, 4000), np.uint16)), 80),
    ("RGBA 4000x4000", lambda: Image.new("RGBA", (4000, 4000), (10, 200, 30, 100)), 160),
])
def test_a_large_png_costs_about_its_decoded_size(what, make, bound_mib):
    growth = peak_growth(png(make()))
    assert growth < bound_mib * 2**20, f"{what}: +{growth / 2**20:.0f} MiB"


def test_the_pixel_limit_is_on_the_pixels_decoded():
    """A 48 MP JPEG decodes at 1/8 scale, so a service-sized limit takes it; a PNG that big is refused."""
    from fruitdask.features.featurize import DecodeError, decode_image

    photo = io.BytesIO()
    Image.new("RGB", (8000, 6000), (0, 128, 255)).save(photo, "JPEG", quality=80)
    assert decode_image(photo.getvalue(), 224, max_pixels=16_000_000).shape == (224, 224, 3)
    with pytest.raises(DecodeError, match="8000x6000 pixels is over the 16,000,000-pixel limit"):
        decode_image(png(Image.new("1", (8000, 6000))), 224, max_pixels=16_000_000)
