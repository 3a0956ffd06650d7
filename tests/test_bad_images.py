"""Bad and unusual images: valid ones decode correctly, invalid ones are skipped with a
reason in ``errors.parquet``, the counts reconcile and the exit code says files were skipped.

Every file is generated here with PIL, so each case is exactly what its name says.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import BUNDLED, SMALL_SIZE, copy_images, read_features
from PIL import Image, ImageFile

from fruitdask import cli, storage
from fruitdask.commands.run import EXIT_SKIPPED
from fruitdask.config import build_config
from fruitdask.errors import TooManyErrors
from fruitdask.features import featurize
from fruitdask.features.featurize import DecodeError, decode_image, open_image
from fruitdask.pipeline import check_errors

S = SMALL_SIZE


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def jpeg(color=(200, 30, 30), size=(64, 64)) -> bytes:
    return encode(Image.new("RGB", size, color), "JPEG", quality=95)


def bomb_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width x height`` pixels (the CRC is valid)."""
    data = bytearray(encode(Image.new("L", (8, 8), 0), "PNG"))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def sixteen_bit_png() -> bytes:
    """A 16-bit grayscale PNG: left column 0, middle 32896 (128/255 of full scale), right 65535."""
    arr = np.zeros((S, S), dtype=np.uint16)
    arr[:, S // 3 : 2 * S // 3] = 32896
    arr[:, 2 * S // 3 :] = 65535
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    return encode(img, "PNG")


def exif_rotated_jpeg() -> bytes:
    """64x32 stored (left half red, right half blue) with EXIF orientation 6 (rotate 90° CW):
    displayed, it is 32x64 with red on top."""
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=95, exif=exif)


def palette(transparent: bool) -> bytes:
    img = Image.new("P", (S, S), 0)
    img.putpalette([10, 20, 30] + [200, 100, 50] * 255)
    img.paste(1, (0, 0, S // 2, S))
    return encode(img, "PNG", transparency=0) if transparent else encode(img, "PNG")


# name -> bytes; the invalid ones with a phrase their reason must contain.
INVALID = {
    "empty.jpg": (lambda: b"", "0 bytes"),
    "truncated.jpg": (lambda: jpeg()[:300], "truncated"),
    "text.jpg": (lambda: b"this is a text file, not a picture\n" * 3, "not an image"),
    "bomb.png": (lambda: bomb_png(30_000, 30_000), "decompression bomb"),
    "over-limit.png": (lambda: bomb_png(8_500, 8_500), "pixel limit"),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_images_raise_decode_error_with_reason(name):
    make, phrase = INVALID[name]
    with pytest.raises(DecodeError, match=phrase):
        decode_image(make(), S)


@pytest.mark.parametrize("name", ["bomb.png", "over-limit.png"])
def test_bomb_is_refused_without_decoding(name, monkeypatch):
    def no_load(self):
        raise AssertionError("pixels of a decompression bomb were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    with pytest.raises(DecodeError):
        decode_image(INVALID[name][0](), S)


def test_png_named_jpg_decodes_by_content():
    out = decode_image(encode(Image.new("RGB", (S, S), (1, 2, 3)), "PNG"), S)
    assert out.shape == (S, S, 3) and (out == [1, 2, 3]).all()


def test_grayscale_l():
    out = decode_image(encode(Image.new("L", (S, S), 77), "PNG"), S)
    assert (out == 77).all()


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_p(transparent):
    out = decode_image(palette(transparent), S)
    assert (out[:, : S // 2] == [200, 100, 50]).all()
    # Palette index 0 is (10, 20, 30), or transparent and so composited on white.
    assert (out[:, S // 2 :] == ([255, 255, 255] if transparent else [10, 20, 30])).all()


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (S, S), (255, 0, 0, 0))  # fully transparent red
    img.paste((0, 0, 255, 255), (0, 0, S // 2, S))  # opaque blue half
    half = Image.new("RGBA", (S, S), (0, 0, 0, 128))  # half-transparent black
    out = decode_image(encode(img, "PNG"), S)
    assert (out[:, : S // 2] == [0, 0, 255]).all()
    assert (out[:, S // 2 :] == [255, 255, 255]).all()
    assert np.allclose(decode_image(encode(half, "PNG"), S), 127, atol=1)


def test_cmyk_jpeg():
    data = encode(Image.new("CMYK", (S, S), (0, 255, 255, 0)), "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data, S).astype(int)
    assert np.abs(out - [255, 0, 0]).max() <= 3


def test_16_bit_png_is_scaled_not_clipped():
    out = decode_image(sixteen_bit_png(), S)
    assert (out[:, 0] == 0).all()
    assert (out[:, S // 2] == 128).all()
    assert (out[:, -1] == 255).all()


def test_exif_orientation_is_applied():
    img = open_image(exif_rotated_jpeg(), S)
    assert img.size == (32, 64)
    out = decode_image(exif_rotated_jpeg(), S).astype(int)
    assert np.abs(out[2, S // 2] - [255, 0, 0]).max() < 40  # red on top
    assert np.abs(out[-3, S // 2] - [0, 0, 255]).max() < 40  # blue below


def test_very_large_jpeg_is_decoded_at_reduced_scale():
    data = encode(Image.new("RGB", (8000, 6000), (0, 128, 255)), "JPEG", quality=90)
    img = open_image(data, S)
    # Draft mode: 1/8 scale from the DCT, about 2 MB of pixels instead of 144 MB.
    assert img.size == (1000, 750)
    out = decode_image(data, S).astype(int)
    assert out.shape == (S, S, 3) and np.abs(out - [0, 128, 255]).max() <= 3


def test_listing_keeps_odd_names_and_ignores_an_empty_label(tmp_path):
    odd = tmp_path / "Pomme rôtie" / "ma pomme ü 1.jpg"
    odd.parent.mkdir()
    odd.write_bytes(jpeg())
    (tmp_path / "Empty label").mkdir()
    listing = storage.list_images(str(tmp_path))
    assert list(listing["path"]) == [str(odd)] and list(listing["label"]) == ["Pomme rôtie"]
    assert (decode_image(storage.read_bytes(str(odd)), S) > 0).any()


def test_max_errors_count_and_fraction():
    cfg = build_config({"input": "x", "output": "y", "max_errors": 0.25}, {})
    check_errors(cfg, 8, 2)  # 25% of 8 = 2 allowed
    with pytest.raises(TooManyErrors, match="--max-errors"):
        check_errors(cfg, 8, 3)
    cfg = build_config({"input": "x", "output": "y", "max_errors": 2}, {})
    check_errors(cfg, 1000, 2)
    with pytest.raises(TooManyErrors, match="3 of 1000"):
        check_errors(cfg, 1000, 3)


def test_featurize_bytes_skips_bad_rows_with_positions():
    class FakeRuntime:
        def featurize(self, batch):
            return np.ones((len(batch), 1, 1, 512), dtype=np.float32)

    contents = [jpeg(), b"", None, INVALID["text.jpg"][0](), jpeg((0, 0, 0))]
    res = featurize.featurize_bytes(FakeRuntime(), contents, S, "avg", 2)  # type: ignore[arg-type]
    assert res.ok == [0, 4] and res.features.shape == (2, 512)
    assert [(i, stage) for i, stage, _ in res.errors] == [(1, "decode"), (3, "decode")]


# --- the whole run ------------------------------------------------------------------------

VALID_EXTRA = {
    "Odd/png-named.jpg": lambda: encode(Image.new("RGB", (100, 100), (1, 2, 3)), "PNG"),
    "Odd/gray.jpg": lambda: encode(Image.new("L", (100, 100), 77), "JPEG"),
    "Odd/palette.png": lambda: palette(True),
    "Odd/rgba.png": lambda: encode(Image.new("RGBA", (100, 100), (255, 0, 0, 60)), "PNG"),
    "Odd/cmyk.jpg": lambda: encode(Image.new("CMYK", (100, 100), (0, 255, 255, 0)), "JPEG"),
    "Odd/sixteen.png": sixteen_bit_png,
    "Odd/exif.jpg": exif_rotated_jpeg,
    "Pomme rôtie/ma pomme ü 1.jpg": jpeg,
}
INVALID_FILES = {
    "Odd/empty.jpg": INVALID["empty.jpg"][0],
    "Odd/truncated.jpg": INVALID["truncated.jpg"][0],
    "Odd/text.jpg": INVALID["text.jpg"][0],
    "Pomme rôtie/bomb.png": INVALID["bomb.png"][0],
}


@pytest.fixture(scope="module")
def thread_cluster(module_local_cluster):
    """An in-process cluster: the run reaches it by address, like any remote scheduler."""
    cluster, _ = module_local_cluster(1, 2, processes=False, amm=False, client=False)
    return cluster.scheduler_address


@pytest.fixture(scope="module")
def messy_input(tmp_path_factory) -> Path:
    root = copy_images(BUNDLED, tmp_path_factory.mktemp("messy") / "Training", 2, 3)
    for rel, make in {**VALID_EXTRA, **INVALID_FILES}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(make())
    (root / "Empty label").mkdir()
    return root


def _run(thread_cluster, messy_input, weights_file, out: Path, *extra: str) -> int:
    return cli.main([
        "run", "--input", str(messy_input), "--output", str(out), "--cluster", thread_cluster,
        "--image-size", str(S), "--weights", str(weights_file), "--components", "3", "-q", *extra,
    ])


@pytest.mark.integration
def test_run_skips_bad_files_and_reconciles(tmp_path, thread_cluster, messy_input, weights_file):
    out = tmp_path / "out"
    rc = _run(thread_cluster, messy_input, weights_file, out, "--max-errors", "0.5")
    assert rc == EXIT_SKIPPED == 4
    assert (out / "_SUCCESS").exists()
    doc = json.loads((out / "run.json").read_text())
    n_good = 2 * 3 + len(VALID_EXTRA)
    assert doc["counts"]["images_listed"] == n_good + len(INVALID_FILES)
    assert doc["counts"]["rows_written"] == n_good
    assert doc["counts"]["errors"] == len(INVALID_FILES)
    assert doc["counts"]["images_listed"] == doc["counts"]["rows_written"] + doc["counts"]["errors"]
    assert "Empty label" not in doc["per_label"]

    errors = pq.read_table(out / "errors.parquet").to_pandas()
    assert list(errors.columns) == ["path", "label", "stage", "reason", "image_key", "source_version", "run_id"]
    by_name = {Path(p).name: (label, stage, reason) for p, label, stage, reason in
               errors[["path", "label", "stage", "reason"]].itertuples(index=False)}
    assert set(by_name) == {Path(r).name for r in INVALID_FILES}
    assert by_name["empty.jpg"][1:] == ("decode", "empty file (0 bytes)")
    assert by_name["bomb.png"][0] == "Pomme rôtie" and "bomb" in by_name["bomb.png"][2]

    rows = read_features(out, arrow=False)
    assert rows["path"].is_unique and len(rows) == n_good
    assert str(messy_input / "Pomme rôtie" / "ma pomme ü 1.jpg") in set(rows["path"])
    assert all(len(f) == 512 and np.isfinite(f).all() for f in rows["features"])
    assert doc["errors_by_stage"] == {"decode": len(INVALID_FILES)}


@pytest.mark.integration
def test_too_many_errors_fails_and_commits_nothing(tmp_path, thread_cluster, messy_input, weights_file, capsys):
    out = tmp_path / "out"
    rc = _run(thread_cluster, messy_input, weights_file, out, "--max-errors", "2")
    assert rc == 3
    assert "--max-errors" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "fruitdask-tmp" in p.name]


@pytest.mark.integration
def test_skipped_ok_makes_a_run_with_skipped_files_exit_0(tmp_path, thread_cluster, messy_input, weights_file):
    out = tmp_path / "out"
    assert _run(thread_cluster, messy_input, weights_file, out, "--skipped-ok") == 0
    doc = json.loads((out / "run.json").read_text())
    assert (out / "_SUCCESS").exists() and doc["counts"]["errors"] == len(INVALID_FILES)


def test_run_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    assert "exit codes:" in text and "4    success with skipped files" in text


def test_unreadable_file_is_a_read_error_and_an_all_bad_partition_keeps_its_rows(tmp_path):
    from fruitdask.features import frames

    df = pd.DataFrame({"path": [str(tmp_path / "L" / "vanished.jpg"), str(tmp_path / "L" / "empty.jpg")], "label": ["L", "L"]})
    (tmp_path / "L").mkdir()
    (tmp_path / "L" / "empty.jpg").write_bytes(b"")
    contents, read_errors = frames.read_many(list(df["path"]), None)
    assert contents[0] is None and "cannot read file" in read_errors[0]
    class NeverCalled:
        def featurize(self, batch):
            raise AssertionError("nothing decoded, yet the runtime was called")

    result = featurize.featurize_bytes(NeverCalled(), contents, S, "avg", 2)  # type: ignore[arg-type]
    out = frames.assemble(df, result, read_errors)
    assert list(out["error_stage"]) == ["read", "decode"]
    assert out["features"].isna().all() and len(out) == 2
