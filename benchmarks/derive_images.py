"""Derive more Fruits-360-like images from a folder, each with distinct bytes.

Every derived image is one of the source images transformed (mirror, flip, a small crop
resized back, a rotation by 90 degrees, a re-encoding at another JPEG quality, or a
combination) and saved in the same ``<Label>/`` folder, so a lake of 8,000 images can be
made from the 2,000 of the bench set, and the new photos of a "day of growth" look like
real ones. Deterministic (seeded): the same call derives the same bytes.

    python benchmarks/derive_images.py SRC DEST --count 8000     # DEST gets SRC's images plus derived ones
    python benchmarks/derive_images.py SRC DEST --count 100 --only-new --prefix day2_   # just 100 new ones
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import sys
from itertools import chain, zip_longest
from pathlib import Path

from PIL import Image, ImageOps

EXTENSIONS = (".jpg", ".jpeg", ".png")


def transform(img: Image.Image, k: int, rng: random.Random) -> tuple[Image.Image, int]:
    """The k-th variant of ``img`` (and the JPEG quality to save it with)."""
    ops = [ImageOps.mirror, ImageOps.flip, lambda im: im.rotate(90), lambda im: im.rotate(270)]
    out = ops[k % len(ops)](img)
    if (k // len(ops)) % 2:
        w, h = out.size
        dx, dy = rng.randint(1, max(1, w // 10)), rng.randint(1, max(1, h // 10))
        out = out.crop((dx, dy, w - dx, h - dy)).resize((w, h))
    return out, 70 + (k * 7) % 26


def sources(src: Path) -> list[Path]:
    """Source images, round-robin over labels (every label gets derived images)."""
    per_label = [sorted(p for p in d.rglob("*") if p.suffix.lower() in EXTENSIONS)
                 for d in sorted(src.iterdir()) if d.is_dir()]
    return [p for p in chain.from_iterable(zip_longest(*per_label)) if p is not None]


def derive(src: Path, dest: Path, count: int, *, only_new: bool = False, prefix: str = "d", seed: int = 0) -> list[Path]:
    """Fill ``dest`` with ``count`` images: ``src``'s own first (unless ``only_new``), then
    derived ones named ``<prefix><k>_<name>.jpg``. Returns the derived files."""
    rng = random.Random(seed)
    base = sources(src)
    if not base:
        raise SystemExit(f"no images under {src}")
    made, copied = [], 0
    if not only_new:
        for p in base[:count]:
            target = dest / p.parent.name / p.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)
            copied += 1
    for i in range(count - copied):
        p = base[i % len(base)]
        k = i // len(base)
        img, quality = transform(Image.open(p).convert("RGB"), k + i, rng)
        target = dest / p.parent.name / f"{prefix}{k}_{i}_{p.stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        target.write_bytes(buf.getvalue())
        made.append(target)
    return made


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--count", type=int, required=True, help="images in DEST (or new images with --only-new)")
    p.add_argument("--only-new", action="store_true", help="write only derived images (a day of new photos)")
    p.add_argument("--prefix", default="d", help="name prefix of derived images (default: d)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    made = derive(args.src, args.dest, args.count, only_new=args.only_new, prefix=args.prefix, seed=args.seed)
    print(f"{len(made)} derived images written under {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
