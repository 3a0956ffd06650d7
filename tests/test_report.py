"""The run report: one real run on real images (with an empty file and random weights), its
page checked as HTML against run.json, rebuilt locally and from a moto S3, and opened in a
real headless Chromium."""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree

import browser
import numpy as np
import pandas as pd
import pytest
from conftest import BUNDLED, REPO, copy_images
from PIL import Image

from fruitdask import cli
from fruitdask.commands.run import EXIT_SKIPPED
from fruitdask.report import page as report
from fruitdask.report import svg as report_svg

SVG = "{http://www.w3.org/2000/svg}"

ARTIFACTS = REPO / "test-artifacts"
SECTIONS = ("run", "data", "labels", "thumbnails", "skipped", "reduction", "scree", "scatter", "cost", "environment")
LABELS, PER_LABEL = 4, 4


class Page(HTMLParser):
    """Tags with their attributes, and the text of every element that carries ``data-ptr``."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.values: list[tuple[str, str]] = []
        self._open: list[list] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "data-ptr" in a:
            self._open.append([tag, a["data-ptr"], ""])

    def handle_data(self, data):
        for item in self._open:
            item[2] += data

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            _, ptr, text = self._open.pop()
            self.values.append((ptr, text.strip()))

    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.tags if "id" in a}

    def links(self) -> list[str]:
        return [a[k] for _, a in self.tags for k in ("src", "href") if k in a]


def resolve(doc: dict, ptr: str):
    for part in ptr.split("/")[1:]:
        doc = doc[part.replace("~1", "/").replace("~0", "~")]
    return doc


def matches(text: str, value) -> bool:
    """The page's text for a run.json value, in the formats the page uses."""
    if value is None:
        return text == "n/a"
    if isinstance(value, str | bool):
        return text == str(value)
    if text.endswith("%"):
        return abs(float(text[:-1]) / 100 - value) <= 5e-5
    if text.endswith(" s"):
        return abs(float(text[:-2]) - value) <= 5e-4
    if isinstance(value, int):
        return int(text.replace(",", "")) == value
    return abs(float(text.replace(",", "")) - value) <= 5e-4


@pytest.fixture(scope="module")
def run_out(tmp_path_factory):
    """One real run: 4 labels x 4 real images plus a 0-byte .jpg, random weights."""
    root = tmp_path_factory.mktemp("report")
    src = copy_images(BUNDLED, root / "in", LABELS, PER_LABEL)
    first = sorted(p for p in src.iterdir())[0]
    (first / "empty.jpg").write_bytes(b"")
    out = root / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli.main(["run", "--input", str(src), "--output", str(out), "--image-size", "32", "--weights", "random",
                       "--workers", "1", "--threads-per-worker", "2"])
    # A run that skipped files says so in its exit status (EXIT_SKIPPED) and still commits.
    assert rc == EXIT_SKIPPED
    last = json.loads(stdout.getvalue().strip().splitlines()[-1])
    return {"out": out, "src": src, "printed": last, "empty": first / "empty.jpg"}


@pytest.fixture(scope="module")
def page(run_out):
    text = (run_out["out"] / "report.html").read_text(encoding="utf-8")
    return text, Page(text), json.loads((run_out["out"] / "run.json").read_text())


@pytest.mark.integration
@pytest.mark.slow
def test_run_writes_the_report_beside_its_outputs_and_prints_its_path(run_out):
    out = run_out["out"]
    assert (out / "report.html").is_file() and (out / "_SUCCESS").is_file()
    assert json.loads((out / "run.json").read_text())["files"]["report"] == "report.html"
    assert run_out["printed"]["report"] == str(out.resolve() / "report.html")
    assert not list(out.parent.glob(".out.fruitdask-tmp-*")), "staging prefix left behind"


@pytest.mark.integration
def test_page_has_every_section_and_the_random_weights_banner(page):
    text, parsed, doc = page
    assert doc["weights"]["random"] is True
    missing = set(SECTIONS) - parsed.ids()
    assert not missing, f"sections missing: {missing}"
    assert "random-weights" in parsed.ids()
    for name in ("Dask performance report", "Package versions", "images/s featurizing", "Scree plot"):
        assert name in text
    for package in ("dask", "distributed", "numpy", "keras"):
        assert ("/versions/" + package) in {p for p, _ in parsed.values}


@pytest.mark.integration
def test_page_embeds_its_images_and_links_nowhere_else(page, run_out):
    _, parsed, doc = page
    allowed = {"dask-report.html", doc["cluster"]["dashboard"]}
    for link in parsed.links():
        assert link.startswith(("data:image/png;base64,", "data:image/jpeg;base64,", "data:image/svg+xml;base64,", "#")) or link in allowed, link
    assert (run_out["out"] / "dask-report.html").is_file()
    imgs = [a for t, a in parsed.tags if t == "img"]
    charts = [a for a in imgs if a.get("class") == "chart"]
    thumbs = [a for a in imgs if a.get("class") == "thumb"]
    assert len(charts) == 4  # images per label, scree, PCA scatter, time per stage
    assert len(thumbs) == LABELS * PER_LABEL  # the empty file has no thumbnail
    for a in charts + thumbs:
        data = base64.b64decode(a["src"].split(",", 1)[1])
        if a["src"].startswith("data:image/svg+xml"):
            assert ElementTree.fromstring(data).tag == f"{SVG}svg"  # well-formed SVG
            continue
        with Image.open(io.BytesIO(data)) as im:
            im.verify()


@pytest.mark.integration
def test_every_number_on_the_page_equals_run_json(page):
    _, parsed, doc = page
    assert parsed.values
    for ptr, text in parsed.values:
        assert matches(text, resolve(doc, ptr)), f"{ptr}: page shows {text!r}, run.json has {resolve(doc, ptr)!r}"
    shown = {p for p, _ in parsed.values}
    must = {"/counts/images_listed", "/counts/labels", "/counts/added", "/counts/updated", "/counts/removed", "/counts/unchanged", "/counts/featurized", "/counts/errors", "/reduction/k",
            "/reduction/variance_reached", "/reduction/variance_target", "/duration_s", "/started_at",
            "/images_per_second/featurize", "/images_per_second/overall", "/config/image_size", "/config/pooling",
            "/weights/source", "/cluster/n_workers", "/cluster/threads"}
    must |= {f"/timings_s/{k}" for k in doc["timings_s"]} | {f"/per_label/{k}" for k in doc["per_label"]}
    assert must <= shown, f"not shown: {must - shown}"
    assert doc["counts"]["errors"] == 1 and doc["counts"]["rows_written"] == LABELS * PER_LABEL


@pytest.mark.integration
def test_skipped_files_show_with_their_reason(page, run_out):
    text, _, _ = page
    errors = pd.read_parquet(run_out["out"] / "errors.parquet")
    assert errors["path"].tolist() == [str(run_out["empty"])]
    assert str(run_out["empty"]) in text
    assert html.escape(errors["reason"].iloc[0]) in text


@pytest.mark.integration
def test_banner_and_skipped_section_follow_the_record(run_out, page):
    _, _, doc = page
    data = report.read_outputs(doc, str(run_out["out"]), None)
    clean = json.loads(json.dumps(doc))
    clean["weights"].update(random=False, kind="file", warning=None)
    clean["warnings"] = []
    clean["counts"]["errors"] = 0
    parsed = Page(report.render(clean, data))
    assert "random-weights" not in parsed.ids()
    assert "No file was skipped." in report.render(clean, data)
    assert "random-weights" in Page(report.render(doc, data)).ids()


@pytest.mark.integration
def test_report_command_rebuilds_a_local_output(run_out, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_out["out"], copy)
    (copy / "report.html").unlink()
    assert cli.main(["report", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == str(copy.resolve() / "report.html")
    parsed = Page((copy / "report.html").read_text(encoding="utf-8"))
    assert set(SECTIONS) <= parsed.ids()


@pytest.mark.integration
def test_report_command_explains_a_folder_without_run_json(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "run.json" in err and "fruitdask run" in err


@pytest.mark.integration
def test_report_command_rebuilds_an_s3_output(run_out, s3, capsys):
    s3.upload(run_out["out"], s3.bucket("fruits-eu", "eu-west-1") + "/runs/one")
    fs = s3.fs
    fs.rm("fruits-eu/runs/one/report.html")
    assert cli.main(["report", "s3://fruits-eu/runs/one", "--s3-endpoint", s3.endpoint]) == 0
    assert capsys.readouterr().out.strip() == "s3://fruits-eu/runs/one/report.html"
    fs.invalidate_cache()
    parsed = Page(fs.cat("fruits-eu/runs/one/report.html").decode("utf-8"))
    assert set(SECTIONS) <= parsed.ids()
    assert sum(a.get("class") == "thumb" for t, a in parsed.tags if t == "img") == LABELS * PER_LABEL


@pytest.mark.integration
def test_report_opens_in_a_real_browser_without_errors(run_out):
    # A failure, not a skip: a green suite must mean the page was seen in a browser.
    if browser.find_chromium() is None:
        pytest.fail("CHROMIUM IS NOT INSTALLED: the report cannot be checked in a browser. "
                    "Run `make install-test` as root (apt-get install -y chromium).")
    path = run_out["out"] / "report.html"
    shot = ARTIFACTS / "report.png"
    seen = browser.open_page(path.as_uri(), shot)
    assert seen.console_errors == []
    assert seen.requests == [path.as_uri()], "the page fetched something besides itself"
    assert seen.broken_images == [] and seen.images == 4 + LABELS * PER_LABEL
    assert seen.title.startswith("fruitdask run ")
    with Image.open(shot) as im:
        assert im.width == 1280 and im.height == seen.height > 2000
        # Not a blank page: the banner's red is on it.
        assert (np.asarray(im.convert("RGB")) == (198, 40, 40)).all(axis=-1).sum() > 10_000


def test_scatter_legend_stays_readable_with_50_labels():
    rng = np.random.default_rng(0)
    labels = [f"Fruit {i:02d}" for i in range(50) for _ in range(50 - i)]
    grouped, legend = report_svg.group_labels(labels)
    assert legend == [f"Fruit {i:02d}" for i in range(10)] + ["other"]
    assert set(grouped) == set(legend)
    svg = report_svg.pca_scatter_svg(rng.normal(size=(len(labels), 2)), labels, shown_of=len(labels))
    root = ElementTree.fromstring(svg)
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert [t for t in texts if t.startswith("Fruit ")] == [f"Fruit {i:02d} ({50 - i})" for i in range(10)]
    assert "40 other labels (" + str(sum(range(1, 41))) + ")" in texts
    assert len(list(root.iter(f"{SVG}circle"))) == len(labels) + len(legend)  # every point, one dot per legend entry


def test_labels_chart_is_bounded_at_any_number_of_labels():
    """3,000 labels (past matplotlib's pixel limit in the old PNG chart): 200 bars, the last one
    summing the rest, every count kept."""
    per_label = {f"L{i:04d}": 1 + i % 7 for i in range(3000)}
    root = ElementTree.fromstring(report_svg.labels_bar_svg(per_label))
    bars = list(root.iter(f"{SVG}rect"))[1:]  # the first is the background
    assert len(bars) == report_svg.MAX_LABEL_BARS
    names = [g.find(f"{SVG}text").text for g in root.iter(f"{SVG}g")]
    assert names[-1] == "other (2,801 labels)"
    values = [int(g.findall(f"{SVG}text")[1].text.replace(",", "")) for g in root.iter(f"{SVG}g")]
    assert sum(values) == sum(per_label.values())
    assert values == sorted(values[:-1], reverse=True) + values[-1:]


def test_thumbnails_are_spread_over_each_label():
    pool = {"A": [f"a/{i:03d}.jpg" for i in range(100)], "B": ["b/1.jpg"]}
    picked = report.pick_thumbnails(pool, 4)
    assert picked == {"A": ["a/000.jpg", "a/033.jpg", "a/066.jpg", "a/099.jpg"], "B": ["b/1.jpg"]}


def test_report_location():
    assert report.report_location("s3://b/runs/x/") == "s3://b/runs/x/report.html"
    assert report.report_location("out") == str(Path("out").resolve() / "report.html")
