"""Pure batch transforms: image bytes in, feature arrays out.

Both backends call these very functions (Dask inside ``map_partitions``, Spark inside a
Scalar-Iterator pandas UDF); a backend only decides where they run. Nothing here touches
storage, clusters or global state besides the inference runtime it is handed
(:mod:`fruitdask.features.runtimes`): decoding and pooling are shared by every runtime.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from fruitdask.features.runtimes import InferenceRuntime

#: Images with more pixels than this are refused before decoding (decompression bombs).
MAX_PIXELS = 64_000_000
#: JPEGs with at least this many pixels are decoded at reduced scale (draft mode).
DRAFT_MIN_PIXELS = 4_000_000
RESAMPLE = Image.Resampling.BICUBIC  # PIL's default for resize(), as in the seed notebook
#: The only PIL decoders an input file is handed to (the listing takes .jpg/.jpeg/.png; the
#: multi-picture JPEGs of cameras and phones, MPO, open through the JPEG decoder). Every other
#: format PIL knows (TIFF, PSD, EPS via Ghostscript, ...) is refused by content, whatever the
#: file's name: each decoder is attack surface, and a format we do not mean to read is a
#: mistake in the input.
ALLOWED_FORMATS = ("JPEG", "PNG")

class DecodeError(ValueError):
    """One image could not be decoded; the message is the reason written to ``errors``."""


#: Rows converted at a time by :func:`_to_rgb`: its temporaries stay a few MB whatever the
#: image's height, instead of several full-size copies (a 16-bit 4000x4000 PNG cost +428 MiB).
STRIP_ROWS = 256


def _strips(height: int):
    return ((top, min(top + STRIP_ROWS, height)) for top in range(0, height, STRIP_ROWS))


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """A 16-bit (``I;16*``) or 32-bit (``I``) grayscale image as 8-bit ``L``, in strips, with
    integer arithmetic: ``round(v / 257)``, v clipped to [0, 65535] (``65535 / 255 = 257``).
    A 16-bit mode is 16-bit however dark the picture; only the 32-bit ``I`` mode (which some
    PIL versions give 16-bit PNGs) guesses its range from the values (<= 255: 8-bit)."""
    width, height = img.size
    extrema = img.getextrema()
    eight_bit = img.mode == "I" and isinstance(extrema[1], (int, float)) and extrema[1] <= 255
    out = np.empty((height, width), dtype=np.uint8)
    for top, bottom in _strips(height):
        strip = np.asarray(img.crop((0, top, width, bottom))).astype(np.int32)
        strip = np.clip(strip, 0, 255 if eight_bit else 65535)
        out[top:bottom] = strip if eight_bit else (strip + 128) // 257
    # frombuffer shares ``out``'s memory: no second full-size copy.
    return Image.frombuffer("L", (width, height), out, "raw", "L", 0, 1)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode in ("RGB", "P") and "transparency" in img.info)


def _rgb_in_strips(img: Image.Image) -> Image.Image:
    """RGB, transparency composited on white, converted in strips of rows: one full-size
    RGB output and strip-sized temporaries (instead of three full-size RGBA copies).

    The strips are not resized on the way: PIL picks the order of its two resize passes
    from the shape, so only a resize of the whole converted image gives its exact pixels.
    """
    width, height = img.size
    out = Image.new("RGB", (width, height))
    alpha = _has_alpha(img)
    for top, bottom in _strips(height):
        piece = img.crop((0, top, width, bottom))
        if alpha:
            rgba = piece.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            piece = Image.alpha_composite(background, rgba)
        out.paste(piece.convert("RGB"), (0, top))
    return out


def _to_rgb(img: Image.Image, size: int | None = None) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white like the dataset.

    Memory stays near the decoded image's own: conversions run in strips of
    :data:`STRIP_ROWS` rows with integer arithmetic, and a gray image is resized to
    ``size`` (when given) *before* it becomes RGB, which is exact (bicubic works per
    channel, and RGB of gray repeats one channel three times).
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = _sixteen_bit_to_l(img)
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode in ("L", "1") and size is not None and img.size != (size, size):
        img = (img.convert("L") if img.mode == "1" else img).resize((size, size), RESAMPLE)
    if img.mode == "RGB" and not _has_alpha(img):
        return img
    return _rgb_in_strips(img)


def open_image(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and load one encoded image, refusing bombs before any pixel is decoded.

    ``max_pixels`` bounds the pixels decoded (after the JPEG scaling below). The pixel
    count comes from the header alone, so a decompression bomb is refused without
    allocating its pixels. A JPEG at least twice ``size`` on each side is decoded at 1/2,
    1/4 or 1/8 scale straight from the DCT (PIL draft mode): an 8000x6000 photo loads as
    1000x750, about 2 MB instead of 144 MB. EXIF orientation is applied.

    Raises
    ------
    DecodeError
        With the reason, for anything that is not a usable image.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = img.size
            if img.format == "JPEG" and width * height >= DRAFT_MIN_PIXELS and min(width, height) >= 2 * size:
                # Only for big photos: draft changes pixels, so dataset-sized images (100x100)
                # must decode exactly as a plain PIL open would (parity with plain Keras).
                img.draft("RGB", (size, size))
            # The limit is on the pixels decoded: a 48 MP phone JPEG decodes at 1/8 scale.
            if img.width * img.height > max_pixels:
                raise DecodeError(
                    f"image of {width}x{height} pixels is over the {max_pixels:,}-pixel limit (decompression bomb?)"
                )
            img.load()
            return ImageOps.exif_transpose(img)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"refused as a decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        other = _sniff_format(data)
        if other:
            raise DecodeError(
                f"{other} image: fruitdask only decodes {', '.join(ALLOWED_FORMATS)}; convert it to JPEG or PNG"
            ) from e
        raise DecodeError(f"not an image: {len(data):,} bytes in no format fruitdask reads ({', '.join(ALLOWED_FORMATS)})") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DecodeError(f"corrupt or truncated image: {e}") from e


#: Magic numbers of common formats that are not allowed, to name them in the reason; the
#: bytes are only compared, never handed to a decoder.
_MAGIC = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"8BPS", "PSD"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"\x00\x00\x01\x00", "ICO"),
    (b"qoif", "QOI"), (b"\x76\x2f\x31\x01", "OpenEXR"),
)


def _sniff_format(data: bytes) -> str | None:
    """The name of a known, refused format from the first bytes (``None`` if unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypmif1"):
        return "AVIF/HEIF"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def decode_image(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one image to a ``(size, size, 3)`` uint8 RGB array.

    EXIF orientation is applied, transparency composited on white, 16-bit and CMYK images
    converted, very large JPEGs decoded at reduced scale (draft mode, see
    :func:`open_image`). Raises :class:`DecodeError` with the reason for anything that is
    not a usable image.
    """
    img = open_image(data, size, max_pixels)
    try:
        rgb = _to_rgb(img, size)
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), RESAMPLE)
        return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise DecodeError(f"cannot convert {img.mode} image to RGB: {e}") from e


def pool(feature_maps: np.ndarray, pooling: str) -> np.ndarray:
    """Reduce ``(n, h, w, 512)`` maps to vectors: ``avg``/``max`` give 512, ``none`` flattens."""
    if pooling == "avg":
        out = feature_maps.mean(axis=(1, 2))
    elif pooling == "max":
        out = feature_maps.max(axis=(1, 2))
    elif pooling == "none":
        out = feature_maps.reshape(feature_maps.shape[0], -1)
    else:
        raise ValueError(f"unknown pooling {pooling!r}: use avg, max or none")
    return np.ascontiguousarray(out, dtype=np.float32)


def featurize_arrays(runtime: InferenceRuntime, images: np.ndarray, pooling: str, batch_size: int) -> np.ndarray:
    """Run the runtime on decoded ``(n, s, s, 3)`` uint8 images in batches, pool; return ``(n, d)``."""
    out = []
    for start in range(0, len(images), batch_size):
        maps = runtime.featurize(images[start : start + batch_size])
        out.append(pool(np.asarray(maps), pooling))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


@dataclass
class BatchResult:
    """Features for the images that decoded, and a reason for each one that did not."""

    features: np.ndarray  # (n_ok, d) float32
    ok: list[int]  # positions (in the input) of the rows in ``features``
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (position, stage, reason)


def featurize_bytes(
    runtime: InferenceRuntime, contents: Sequence[bytes | None], image_size: int, pooling: str, batch_size: int
) -> BatchResult:
    """Decode, preprocess and featurize a batch of encoded images.

    ``None`` entries (files that could not be read) are skipped; undecodable images are
    reported in :attr:`BatchResult.errors` rather than raised, so one bad file never fails
    a partition.
    """
    decoded, ok, errors = [], [], []
    for i, data in enumerate(contents):
        if data is None:
            continue
        try:
            decoded.append(decode_image(data, image_size))
            ok.append(i)
        except DecodeError as e:
            errors.append((i, "decode", str(e)))
    if not decoded:
        return BatchResult(np.zeros((0, 0), dtype=np.float32), ok, errors)
    features = featurize_arrays(runtime, np.stack(decoded), pooling, batch_size)
    return BatchResult(features, ok, errors)
