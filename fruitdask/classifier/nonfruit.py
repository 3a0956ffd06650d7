"""A generated set of pictures that are not fruit, to calibrate the ``unknown`` answer.

Six kinds a fruit app meets in practice or that probe the features' blind spots: noise,
uniform colours (a blank or covered lens), gradients, rendered text, abstract drawn shapes,
and simple line-drawn objects (a house, a car, a mug, a face). Each picture is encoded as
PNG, so the caller decodes it with the very path a photo takes
(:func:`fruitdask.features.featurize.decode_image`). Deterministic for a seed.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

KINDS = ("noise", "uniform", "gradient", "text", "shapes", "objects")
WORDS = ("fruit", "BONJOUR", "hello", "42", "Menu du jour", "pomme?", "ABC", "lorem ipsum", "2026", "OK")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(0, 256, 3))
    return r, g, b


def _noise(rng: np.random.Generator, size: int) -> Image.Image:
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    # Half of them blurred: coarse blotches are another texture than pixel noise.
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(2, 8))) if rng.random() < 0.5 else img


def _uniform(rng: np.random.Generator, size: int) -> Image.Image:
    choices = [(255, 255, 255), (0, 0, 0), (128, 128, 128), _colour(rng)]
    return Image.new("RGB", (size, size), choices[int(rng.integers(0, len(choices)))])


def _gradient(rng: np.random.Generator, size: int) -> Image.Image:
    a, b = np.array(_colour(rng), dtype=float), np.array(_colour(rng), dtype=float)
    angle = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    t = (np.cos(angle) * x + np.sin(angle) * y)
    t = (t - t.min()) / max(np.ptp(t), 1e-9)
    return Image.fromarray((a + (b - a) * t[..., None]).astype(np.uint8))


def _text(rng: np.random.Generator, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255) if rng.random() < 0.6 else _colour(rng))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        font = ImageFont.load_default(size=int(rng.integers(size // 12, size // 4)))
        xy = (int(rng.integers(0, size // 2)), int(rng.integers(0, size - size // 6)))
        draw.text(xy, str(WORDS[int(rng.integers(0, len(WORDS)))]), fill=_colour(rng) if rng.random() < 0.5 else (0, 0, 0), font=font)
    return img


def _shapes(rng: np.random.Generator, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), _colour(rng))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 8))):
        (x0, x1), (y0, y1) = sorted(int(v) for v in rng.integers(0, size, 2)), sorted(int(v) for v in rng.integers(0, size, 2))
        box = (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.rectangle(box, fill=_colour(rng))
        elif shape == 1:
            draw.ellipse(box, fill=_colour(rng))
        else:
            draw.line(box, fill=_colour(rng), width=int(rng.integers(2, 12)))
    return img


def _objects(rng: np.random.Generator, size: int) -> Image.Image:
    """A line drawing of a common object on paper, as a child or a sketch app draws it."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    ink, w, s = _colour(rng) if rng.random() < 0.3 else (0, 0, 0), int(rng.integers(2, 6)), size / 256
    kind = int(rng.integers(0, 4))
    if kind == 0:  # a house
        d.rectangle((60 * s, 120 * s, 196 * s, 220 * s), outline=ink, width=w)
        d.polygon([(50 * s, 120 * s), (128 * s, 50 * s), (206 * s, 120 * s)], outline=ink, width=w)
        d.rectangle((110 * s, 160 * s, 146 * s, 220 * s), outline=ink, width=w)
    elif kind == 1:  # a car
        d.rectangle((30 * s, 130 * s, 226 * s, 180 * s), outline=ink, width=w)
        d.polygon([(70 * s, 130 * s), (100 * s, 90 * s), (170 * s, 90 * s), (200 * s, 130 * s)], outline=ink, width=w)
        for cx in (75, 180):
            d.ellipse(((cx - 20) * s, 165 * s, (cx + 20) * s, 205 * s), outline=ink, width=w)
    elif kind == 2:  # a mug
        d.rectangle((70 * s, 80 * s, 170 * s, 210 * s), outline=ink, width=w)
        d.arc((150 * s, 110 * s, 210 * s, 180 * s), -90, 90, fill=ink, width=w)
    else:  # a face
        d.ellipse((50 * s, 50 * s, 206 * s, 206 * s), outline=ink, width=w)
        for cx in (100, 156):
            d.ellipse(((cx - 8) * s, 100 * s, (cx + 8) * s, 116 * s), fill=ink)
        d.arc((90 * s, 120 * s, 166 * s, 176 * s), 20, 160, fill=ink, width=w)
    return img


DRAW = {"noise": _noise, "uniform": _uniform, "gradient": _gradient, "text": _text, "shapes": _shapes, "objects": _objects}


def picture(kind: str, seed: int, size: int = 256) -> bytes:
    """One non-fruit picture of ``kind`` as PNG bytes."""
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    buf = io.BytesIO()
    DRAW[kind](rng, size).save(buf, format="PNG")
    return buf.getvalue()


def pictures(per_kind: int, seed: int = 0, size: int = 256) -> list[tuple[str, bytes]]:
    """``per_kind`` pictures of every kind, ``(kind, PNG bytes)``; another ``seed`` gives
    other pictures (the calibration and the evaluation sets use two seeds)."""
    return [(kind, picture(kind, seed * 100_003 + i, size)) for kind in KINDS for i in range(per_kind)]
