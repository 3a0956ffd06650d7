"""Issue 13's findings, one test (or more) each: no silent random weights, labels are data,
the region guard on every read, the file-size cap, symlinks out of the input, the image
format allow-list. Each fails without its fix. (Overwrite safety and the lock are tested in
``test_storage.py``; signal hygiene in ``test_faults.py``.)
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import BUNDLED, REPO, SMALL_SIZE, copy_images
from PIL import Image

from fruitdask import cli, pipeline, storage
from fruitdask.classifier.bundle import WeightsRef, load_verified_weights
from fruitdask.commands.run import EXIT_SKIPPED
from fruitdask.config import StorageSettings, build_config
from fruitdask.errors import RegionError, UntrustedReferenceError, WeightsError
from fruitdask.features import model
from fruitdask.features.featurize import DecodeError, decode_image
from fruitdask.features.runtimes.tensorflow import build_vgg16, import_keras
from fruitdask.features.settings import FeatureSettings
from fruitdask.report import plots as report_plots
from fruitdask.report import svg as report_svg

S = SMALL_SIZE
ODD_LABELS = ["a$\\foo$b", "$", "_hidden", "50% {x} <b>&", "x\x00y", "Pomme rôtie 🍎", "tab\there", "L" * 200]


def _err(capsys) -> str:
    return capsys.readouterr().err


# --- 4. no silent random weights ---------------------------------------------------------


@pytest.fixture
def no_imagenet(monkeypatch):
    """ImageNet weights that cannot be had (no network, no cache), at once."""
    def fail(image_size):
        raise WeightsError("ImageNet weights for VGG16 could not be loaded (URLError: no network)")

    monkeypatch.setattr(model, "_imagenet", fail)


def test_auto_without_imagenet_fails_instead_of_falling_back_to_random(no_imagenet):
    with pytest.raises(WeightsError, match=r"does not fall back to random weights unless asked.*--allow-random-weights"):
        model.load_weights("auto", seed=0)
    _, info = model.load_weights("auto", seed=0, allow_random=True)
    assert info.is_random and info.warning


def test_run_with_default_weights_and_no_imagenet_exits_non_zero_and_writes_nothing(no_imagenet, tiny_images, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["run", "--input", str(tiny_images), "--output", str(out), "--image-size", str(S), "-q"])
    assert code == WeightsError.exit_code != 0
    err = _err(capsys)
    assert "--weights auto does not fall back" in err and "--allow-random-weights" in err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_random_weights_nobody_asked_for_are_refused_after_loading():
    """Whatever produced them, random weights only pass when asked for."""
    info = model.WeightsInfo("auto", "random", "random (seed 0)", "x" * 64)
    for flags in ({"weights": "auto"}, {"weights": "imagenet"}):
        cfg = build_config({"input": "i", "output": "o", **flags}, {})
        with pytest.raises(WeightsError, match="gave random weights"):
            pipeline.check_random_weights(cfg, info)
    pipeline.check_random_weights(build_config({"input": "i", "output": "o", "weights": "random"}, {}), info)
    pipeline.check_random_weights(build_config({"input": "i", "output": "o", "allow_random_weights": True}, {}), info)


def test_make_run_asks_for_the_random_fallback_explicitly():
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert "--allow-random-weights" in recipe or "--weights random" in recipe


# --- 5. labels are data -------------------------------------------------------------------


@pytest.mark.parametrize("label", ODD_LABELS)
def test_odd_labels_never_break_a_chart(label):
    from xml.etree import ElementTree

    for svg in (report_svg.labels_bar_svg({label: 3, "ok": 2}),
                report_svg.pca_scatter_svg(np.arange(8.0).reshape(4, 2), [label, label, "ok", "ok"], shown_of=4)):
        texts = [t.text or "" for t in ElementTree.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")]
        assert any(t.startswith(report_svg.drawn_name(label)[:30]) for t in texts), texts  # drawn as typed
    from fruitdask.classifier.classify import confusion_png

    metrics = {"labels": [label, "ok"], "confusion": [[2, 1], [0, 3]], "accuracy": 5 / 6}
    pngs = [confusion_png(metrics, title=f"held out {label}"),
            report_plots.scree_png(np.array([0.5, 0.33, 0.17]), k=2, variance_target=0.8, title=f"Scree plot {label}")]
    assert all(p.startswith(b"\x89PNG") for p in pngs)


def test_mathtext_label_is_drawn_as_typed_not_parsed():
    """The label stays in the legend as the literal text (not dropped, not typeset)."""
    import matplotlib

    with report_plots.text_as_data():
        assert matplotlib.rcParams["text.parse_math"] is False


@pytest.mark.integration
@pytest.mark.slow
def test_run_with_odd_label_folders_commits_and_reports(tmp_path, weights_file):
    src = tmp_path / "in"
    for i, label in enumerate(["a$\\foo$b", "_under", "50% <b>&"]):
        (src / label).mkdir(parents=True)
        for j, f in enumerate(sorted((BUNDLED / sorted(os.listdir(BUNDLED))[i]).iterdir())[:3]):
            (src / label / f"{j}.jpg").write_bytes(f.read_bytes())
    out = tmp_path / "out"
    code = cli.main(["run", "--input", str(src), "--output", str(out), "--image-size", str(S), "--weights", str(weights_file),
                     "--workers", "1", "--threads-per-worker", "1", "--components", "2", "-q"])
    assert code == 0
    doc = json.loads((out / "run.json").read_text())
    assert set(doc["per_label"]) == {"a$\\foo$b", "_under", "50% <b>&"}
    page = (out / "report.html").read_text()
    assert "a$\\foo$b" in page and "50% &lt;b&gt;&amp;" in page and "<b>&" not in page
    # Rebuilding the page works too.
    assert cli.main(["report", str(out), "-q"]) == 0


# --- 6. the region guard on every read ----------------------------------------------------


def test_bench_input_passes_the_region_guard_before_any_listing(s3, monkeypatch, capsys):
    s3.bucket("fruits-us", "us-east-1")
    s3.fs.pipe_file("fruits-us/Training/Apple/1.jpg", b"x")

    def no_listing(*a, **k):
        raise AssertionError("the input was listed before the region guard")

    monkeypatch.setattr(storage, "list_images", no_listing)
    code = cli.main(["bench", "--input", "s3://fruits-us/Training", "--s3-endpoint", s3.endpoint, "--backends", "raw", "-q"])
    assert code == 1
    assert "fruits-us" in (err := _err(capsys)) and "outside the allowed regions" in err


@pytest.mark.parametrize("where", ["https://example.com/vgg16.weights.h5", "gs://bucket/vgg16.weights.h5",
                                   "memory://vgg16.weights.h5", "ftp://host/vgg16.keras"])
def test_stored_weights_reference_on_another_protocol_is_refused_before_any_read(where, monkeypatch):
    def no_read(*a, **k):
        raise AssertionError(f"{where} was read")

    monkeypatch.setattr(storage, "download_to_local", no_read)
    ref = WeightsRef(kind="file", source=where, sha256="0" * 64)
    with pytest.raises(UntrustedReferenceError, match=r"weights location .* which fruitdask does not read"):
        load_verified_weights(ref, S, None)
    with pytest.raises(UntrustedReferenceError):
        model.load_weights(where)


def _no_read(*args, **kwargs):
    raise AssertionError("the weights were read before the guard refused them")


def test_stored_weights_reference_goes_through_the_commands_guard(s3, monkeypatch):
    s3.bucket("models-us", "us-east-1")
    monkeypatch.setattr(storage, "download_to_local", _no_read)
    settings = StorageSettings(endpoint_url=s3.endpoint)
    ref = WeightsRef(kind="file", source="s3://models-us/vgg16.weights.h5", sha256="0" * 64)
    with pytest.raises(RegionError, match="models-us"):
        load_verified_weights(ref, S, storage.storage_options(settings), guard=lambda urls: storage.guard_regions(urls, settings))


def test_predict_guards_the_weights_reference_of_the_bundle(s3, tmp_path, monkeypatch, capsys):
    """bundle.json names weights in a us-east-1 bucket: predict refuses before reading them."""
    from fruitdask.classifier import bundle as bundle_mod

    s3.bucket("models-us", "us-east-1")
    calls = []

    class Fake:
        weights = WeightsRef(kind="file", source="s3://models-us/vgg16.weights.h5", sha256="0" * 64)
        spec = FeatureSettings("0" * 64, S, "avg", 8)

        def featurizer(self, opts, override, guard=None):
            calls.append(guard)
            return bundle_mod.ModelBundle.featurizer(self, opts, override, guard)

    monkeypatch.setattr(bundle_mod.ModelBundle, "load", classmethod(lambda cls, url, opts=None: Fake()))
    monkeypatch.setattr(storage, "download_to_local", _no_read)
    photo = tmp_path / "p.jpg"
    photo.write_bytes(b"x")
    code = cli.main(["predict", str(photo), "--model", str(tmp_path), "--s3-endpoint", s3.endpoint, "-q"])
    assert code == 1 and calls and calls[0] is not None
    assert "models-us" in _err(capsys)


def _keras_file(tmp_path: Path) -> Path:
    keras = import_keras()
    keras.utils.set_random_seed(7)
    path = tmp_path / "vgg16_notop.keras"
    build_vgg16(S).save(str(path))
    return path


@pytest.mark.integration
def test_keras_file_is_hashed_before_it_is_deserialized(tmp_path, monkeypatch):
    path = _keras_file(tmp_path)
    weights, info = model.load_weights(str(path))
    assert info.file_sha256 == storage.file_sha256(str(path))
    ref = WeightsRef(kind="file", source=str(path), sha256=info.sha256, file_sha256=info.file_sha256)
    assert len(load_verified_weights(ref, S, None)) == len(weights)

    keras = import_keras()

    def no_load(*a, **k):
        raise AssertionError("the .keras file was deserialized before its hash was checked")

    monkeypatch.setattr(keras.models, "load_model", no_load)
    for bad in (WeightsRef(kind="file", source=str(path), sha256=info.sha256, file_sha256="f" * 64),
                WeightsRef(kind="file", source=str(path), sha256=info.sha256)):  # an old reference: no file hash
        with pytest.raises(UntrustedReferenceError, match="refused before loading it"):
            load_verified_weights(bad, S, None)


@pytest.mark.integration
def test_referenced_h5_file_is_hashed_before_libhdf5_parses_it(weights_file, monkeypatch):
    """Issue 23, item 9: every referenced weights file, not only ``.keras``, is hashed first."""
    import h5py

    weights, info = model.load_weights(str(weights_file))
    ref = WeightsRef(kind="file", source=str(weights_file), sha256=info.sha256, file_sha256=info.file_sha256)
    assert len(load_verified_weights(ref, S, None)) == len(weights)

    def no_parse(*a, **k):
        raise AssertionError("the .h5 file was parsed by libhdf5 before its hash was checked")

    monkeypatch.setattr(h5py, "File", no_parse)
    for bad in (WeightsRef(kind="file", source=str(weights_file), sha256=info.sha256, file_sha256="f" * 64),
                WeightsRef(kind="file", source=str(weights_file), sha256=info.sha256)):  # no file hash recorded
        with pytest.raises(UntrustedReferenceError, match="refused before loading it"):
            load_verified_weights(bad, S, None)


def test_report_rebuild_guards_thumbnail_paths_read_from_parquet(s3, tmp_path, monkeypatch, capsys):
    import shutil

    import pyarrow as pa

    from fruitdask.schema import TABLE_SCHEMA

    """A features/ part whose paths point at another bucket (or another protocol): the
    rebuild refuses before reading any thumbnail."""
    import numpy as np

    from fruitdask.lake import table as delta
    from fruitdask.lake import tasks
    from fruitdask.lake.keys import hash_keys

    s3.bucket("fruits-us", "us-east-1")
    out = tmp_path / "out"
    doc = {"counts": {"rows_written": 2, "images_listed": 2, "errors": 0, "labels": 1}, "input": str(tmp_path / "in"),
           "per_label": {"A": 2}, "weights": {}, "config": {}, "run_id": "r"}
    out.mkdir()
    (out / "run.json").write_text(json.dumps(doc))
    for name, paths in {"other-bucket": ["s3://fruits-us/A/1.jpg", "s3://fruits-us/A/2.jpg"],
                        "http": ["https://example.com/A/1.jpg", "https://example.com/A/2.jpg"]}.items():
        shutil.rmtree(out / "features", ignore_errors=True)
        table = pa.table({"image_key": ["A/1.jpg", "A/2.jpg"], "path": paths, "label": ["A", "A"], "source_version": ["1:1"] * 2,
                          "settings": ["s"] * 2, "run_id": ["r"] * 2, "featurized_at": pa.array([0, 0], pa.timestamp("us", tz="UTC")),
                          "features": tasks._list_array(np.zeros((2, 1), np.float32)),
                          "pca": tasks._list_array(np.eye(2, dtype=np.float32)), "pca_fit": ["f"] * 2}, schema=TABLE_SCHEMA)
        written = tasks.write_file(table, tasks.Sink(delta.table_url(str(out)), "r", "s", {}), "part-0.parquet")
        delta.commit(delta.open_table(str(out), {}), [written], [], {"run_id": "r"},
                     row_keys=hash_keys(["A/1.jpg", "A/2.jpg"]))
        read = []
        real_read = storage.read_bytes

        def spy(path, opts=None, _read=read, _real=real_read):
            _read.append(path)
            return _real(path, opts)

        monkeypatch.setattr(storage, "read_bytes", spy)
        code = cli.main(["report", str(out), "--s3-endpoint", s3.endpoint, "-q"])
        err = _err(capsys)
        assert code == 1, name
        assert ("fruits-us" in err and "outside the allowed regions" in err) or "cannot check the region" in err, err
        assert not [p for p in read if "A/" in p], f"thumbnails were read: {read}"
        monkeypatch.undo()
    # Without settings (library use), other protocols are refused too.
    with pytest.raises(UntrustedReferenceError):
        storage.check_protocols(["https://example.com/A/1.jpg"])
    storage.check_protocols([str(tmp_path / "x.jpg"), "s3://b/x.jpg", None])


# --- 8. the file-size cap -------------------------------------------------------------------


def test_over_size_files_are_refused_from_the_listing_without_reading(tmp_path, monkeypatch):
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "small.jpg").write_bytes(b"x" * 100)
    (tmp_path / "A" / "huge.jpg").write_bytes(b"x" * 5000)
    opened = []
    real_open = open

    def spy(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    listing, rejected = storage.scan_images(str(tmp_path), None, max_file_bytes=1000)
    monkeypatch.undo()
    assert [Path(p).name for p in listing["path"]] == ["small.jpg"]
    assert [Path(p).name for p in rejected["path"]] == ["huge.jpg"]
    assert rejected["stage"].tolist() == ["list"] and "5,000 bytes is over the 1,000-byte limit" in rejected["reason"][0]
    assert not [p for p in opened if p.endswith(".jpg")]


def test_over_size_objects_on_s3_are_refused_by_listed_size(s3):
    s3.bucket("fruits-eu", "eu-west-3")
    s3.fs.pipe_file("fruits-eu/T/A/small.jpg", b"x" * 10)
    s3.fs.pipe_file("fruits-eu/T/A/huge.jpg", b"x" * 3000)
    listing, rejected = storage.scan_images("s3://fruits-eu/T", {"client_kwargs": {"endpoint_url": s3.endpoint}}, 1000)
    assert listing["path"].tolist() == ["s3://fruits-eu/T/A/small.jpg"]
    assert rejected["path"].tolist() == ["s3://fruits-eu/T/A/huge.jpg"] and "over the 1,000-byte limit" in rejected["reason"][0]


def test_max_file_mb_flag_default_and_validation():
    cfg = build_config({"input": "i", "output": "o"}, {})
    assert cfg.max_file_mb == 50 and cfg.max_file_bytes == 50 * 2**20
    assert build_config({"input": "i", "output": "o", "max_file_mb": 0.5}, {}).max_file_bytes == 2**19
    with pytest.raises(Exception, match="--max-file-mb must be a positive"):
        build_config({"input": "i", "output": "o", "max_file_mb": 0}, {})


# --- 9. symlinks out of the input root ----------------------------------------------------------


def _tree_with_links(tmp_path: Path) -> Path:
    root = copy_images(BUNDLED, tmp_path / "in", 1, 2)
    label = next(root.iterdir())
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwd.jpg").write_bytes(b"root:x:0:0")
    os.symlink(secret / "passwd.jpg", label / "escape.jpg")
    os.symlink("/etc/passwd", label / "etc.jpg")
    os.symlink(root / "nowhere.jpg", label / "broken.jpg")
    inside = sorted(label.iterdir())[0]
    os.symlink(inside, label / "alias.jpg")  # inside the root: fine
    os.symlink(secret, root / "Linked folder")
    return root


def test_symlinks_leading_outside_the_input_are_listed_as_errors_never_read(tmp_path, monkeypatch):
    root = _tree_with_links(tmp_path)
    listing, rejected = storage.scan_images(str(root), None, 10**9)
    names = {Path(p).name: r for p, r in zip(rejected["path"], rejected["reason"], strict=True)}
    assert set(names) == {"escape.jpg", "etc.jpg", "broken.jpg", "Linked folder"}
    assert "outside the input root" in names["escape.jpg"] and "/etc/passwd" in names["etc.jpg"]
    assert "broken symbolic link" in names["broken.jpg"] and "not followed" in names["Linked folder"]
    assert "alias.jpg" in {Path(p).name for p in listing["path"]}
    assert not any("secret" in p for p in listing["path"])
    # The plain listing used by train/bench drops them too.
    assert sorted(storage.list_images(str(root))["path"]) == sorted(listing["path"])


@pytest.mark.integration
@pytest.mark.slow
def test_run_puts_refused_files_in_errors_parquet_and_reconciles(tmp_path, weights_file):
    root = _tree_with_links(tmp_path)
    (next(p for p in root.iterdir() if not p.is_symlink()) / "big.jpg").write_bytes(b"\xff\xd8" + b"x" * (2**20))
    out = tmp_path / "out"
    code = cli.main(["run", "--input", str(root), "--output", str(out), "--image-size", str(S), "--weights", str(weights_file),
                     "--workers", "1", "--threads-per-worker", "1", "--components", "1", "--max-file-mb", "0.5", "-q"])
    assert code == EXIT_SKIPPED
    errors = pq.read_table(out / "errors.parquet").to_pandas()
    assert sorted(Path(p).name for p in errors["path"]) == ["Linked folder", "big.jpg", "broken.jpg", "escape.jpg", "etc.jpg"]
    assert set(errors["stage"]) == {"list"}
    doc = json.loads((out / "run.json").read_text())
    assert doc["counts"]["images_listed"] == doc["counts"]["rows_written"] + doc["counts"]["errors"]
    assert doc["counts"]["rows_written"] == 3 and doc["errors_by_stage"] == {"list": 5}
    assert "root:x" not in (out / "report.html").read_text()


# --- 10. the image format allow-list -------------------------------------------------------------


def _encode(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (S, S), (10, 20, 30)).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(("fmt", "name"), [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF"), ("WEBP", "WEBP"),
                                           ("PPM", None), ("ICO", "ICO"), ("TGA", None)])
def test_formats_outside_the_allow_list_are_refused_with_a_reason(fmt, name):
    data = _encode(fmt)
    assert Image.open(io.BytesIO(data)).format  # PIL itself would decode it
    with pytest.raises(DecodeError) as e:
        decode_image(data, S)
    msg = str(e.value)
    assert ("JPEG, PNG" in msg) and (name is None or msg.startswith(f"{name} image"))


def test_jpeg_and_png_still_decode():
    for fmt in ("JPEG", "PNG"):
        assert decode_image(_encode(fmt), S).shape == (S, S, 3)



# --- issue 23, item 7: a name is read as itself, never re-parsed as a URL ---------------------------


def _chained_name_tree(root: Path, outside: Path) -> Path:
    """``big::a.jpg`` beside an over-size ``big``, ``x::a.jpg`` beside a link ``x`` out of the root."""
    label = root / "Apple"
    label.mkdir(parents=True)
    (label / "big").write_bytes(b"B" * 5000)
    (label / "big::a.jpg").write_bytes(b"big-a")
    outside.write_bytes(b"secret")
    os.symlink(outside, label / "x")
    (label / "x::a.jpg").write_bytes(b"x-a")
    return root


def test_a_double_colon_in_a_local_name_reads_that_file_not_its_prefix(tmp_path):
    root = _chained_name_tree(tmp_path / "in", tmp_path / "secret")
    listing, rejected = storage.scan_images(str(root), None, max_file_bytes=1000)
    assert rejected.empty
    read = {Path(p).name: storage.read_bytes(p) for p in listing["path"]}
    assert read == {"big::a.jpg": b"big-a", "x::a.jpg": b"x-a"}


def test_a_double_colon_in_an_s3_key_reads_that_object_not_its_prefix(s3):
    s3.bucket("fruits-eu", "eu-west-3")
    s3.fs.pipe_file("fruits-eu/T/Apple/big", b"B" * 5000)
    s3.fs.pipe_file("fruits-eu/T/Apple/big::a.jpg", b"big-a")
    opts = {"client_kwargs": {"endpoint_url": s3.endpoint}}
    listing, rejected = storage.scan_images("s3://fruits-eu/T", opts, 1000)
    assert rejected.empty and listing["path"].tolist() == ["s3://fruits-eu/T/Apple/big::a.jpg"]
    assert storage.read_bytes(listing["path"][0], opts) == b"big-a"


def test_an_s3_key_that_s3fs_would_cut_is_an_error_row_never_another_object(s3):
    """s3fs reads ``k?versionId=v`` as object ``k``: such a key is refused from the listing
    and by :func:`storage.read_bytes` (an ``OSError``: the image's error row)."""
    s3.bucket("fruits-eu", "eu-west-3")
    s3.fs.pipe_file("fruits-eu/T/Apple/big", b"B" * 5000)
    s3.client().put_object(Bucket="fruits-eu", Key="T/Apple/big?versionId=1.jpg", Body=b"v")
    opts = {"client_kwargs": {"endpoint_url": s3.endpoint}}
    listing, rejected = storage.scan_images("s3://fruits-eu/T", opts, 1000)
    assert listing.empty and rejected["path"].tolist() == ["s3://fruits-eu/T/Apple/big?versionId=1.jpg"]
    assert "cannot be read safely" in rejected["reason"][0]
    with pytest.raises(OSError, match="cannot be read safely"):
        storage.read_bytes("s3://fruits-eu/T/Apple/big?versionId=1.jpg", opts)


@pytest.mark.integration
@pytest.mark.slow
def test_run_featurizes_double_colon_names_as_themselves(tmp_path, weights_file):
    """End to end (Dask workers read the files): ``big::a.jpg`` and ``x::a.jpg`` are the
    images they are, not the over-size ``big`` or the link ``x`` out of the root."""
    root = copy_images(BUNDLED, tmp_path / "in", 1, 2)
    label = next(root.iterdir())
    originals = sorted(p.name for p in label.iterdir())
    first = label / originals[0]
    (label / "big").write_bytes(b"\xff\xd8" + b"x" * (2**20))  # over --max-file-mb, and no image
    (label / "big::a.jpg").write_bytes(first.read_bytes())
    (tmp_path / "secret").write_bytes(b"root:x:0:0")
    os.symlink(tmp_path / "secret", label / "x")
    (label / "x::a.jpg").write_bytes(first.read_bytes())
    out = tmp_path / "out"
    code = cli.main(["run", "--input", str(root), "--output", str(out), "--image-size", str(S), "--weights", str(weights_file),
                     "--workers", "1", "--threads-per-worker", "1", "--components", "1", "--max-file-mb", "0.5", "-q"])
    assert code == 0
    assert not (out / "errors.parquet").exists() or pq.read_table(out / "errors.parquet").num_rows == 0
    features = pd.read_parquet(out / "features").set_index("path")
    rows = {Path(p).name: np.asarray(v) for p, v in features["features"].items()}
    assert set(rows) == {*originals, "big::a.jpg", "x::a.jpg"}, set(rows)
    np.testing.assert_array_equal(rows["big::a.jpg"], rows[first.name])
    np.testing.assert_array_equal(rows["x::a.jpg"], rows[first.name])
