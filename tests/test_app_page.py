"""The public app (issue #24): `fruitdask serve` on a bundle trained here (bundled sample, 32 px,
seeded random weights), its answer with the fruit, and the page at `/` in a real headless
Chromium (Debian's, driven by Playwright) with a phone-sized viewport, in French and English.

Screenshots go to ``test-artifacts/app-page/`` (gitignored).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLE
from PIL import Image
from playwright.sync_api import expect
from test_serve import LABELS, MAX_BODY, call, free_port, post_image, server

from fruitdask.catalogue import load_catalogue
from fruitdask.classifier import nonfruit

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts" / "app-page"
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
LOCALES = {"fr": "fr-FR", "en": "en-US"}
#: Records what the page's fetch sends (Playwright does not capture Blob request bodies).
RECORD_UPLOADS = """
window.__sent = [];
const realFetch = window.fetch;
window.fetch = async function (url, opts) {
  if (opts && opts.body instanceof Blob) {
    const info = {url: String(url), size: opts.body.size, type: opts.body.type};
    const bmp = await createImageBitmap(opts.body);
    info.width = bmp.width;
    info.height = bmp.height;
    window.__sent.push(info);
  }
  return realFetch.apply(this, arguments);
};
"""
UNKNOWN_TITLE = {"fr": "Pas un fruit que cette application connaît", "en": "Not a fruit this app knows"}

pytestmark = [pytest.mark.integration, pytest.mark.slow]
#: test_serve's module fixture, reused here: the server on the bundle trained on the bundled sample
#: (conftest's session-wide ``serve_model``).
REUSED_FIXTURES = (server,)


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out_photo(server) -> Path:
    """A Test photo `train` never saw that the API recognises with its own label, well
    inside the detector's threshold: what the page must then show."""
    used = {(p.parent.name, p.name) for p in server["photos"]}
    for label_dir in sorted(p for p in (SAMPLE / "Test").iterdir() if p.is_dir()):
        for photo in sorted(label_dir.iterdir())[2:]:
            assert (label_dir.name, photo.name) not in used
            status, body = post_image(server["port"], photo.read_bytes())
            assert status == 200, body
            best = body["predictions"][0]
            d = body["detector"]
            if (body["status"] == "recognised" and best["label"] == label_dir.name and best["probability"] >= 0.8
                    and d["distance"] < 0.9 * d["max_distance"] and d["residual"] < 0.9 * d["max_residual"]):
                return photo
    raise AssertionError("no held-out photo is recognised: the model or the detector is broken")


@pytest.fixture(scope="module")
def non_fruit_picture(tmp_path_factory) -> Path:
    """Noise the detector never saw (another seed than train's two sets), as a PNG file."""
    path = tmp_path_factory.mktemp("nonfruit") / "noise.png"
    path.write_bytes(nonfruit.picture("noise", seed=424_242, size=128))  # under the 64 kB cap
    return path


@pytest.fixture(scope="module")
def chromium() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


class Phone:
    """A phone-sized page in one locale that records console errors and every request."""

    def __init__(self, browser, port: int, lang: str, path: str = "/") -> None:
        self.context = browser.new_context(locale=LOCALES[lang], **PHONE)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r))
        # Listening before any action makes Playwright intercept the file chooser from the start.
        self.choosers: list = []
        self.page.on("filechooser", lambda c: self.choosers.append(c))
        self.page.add_init_script(RECORD_UPLOADS)
        self.origin = f"http://127.0.0.1:{port}"
        self.page.goto(self.origin + path)

    def pick(self, photo: Path) -> None:
        self.page.set_input_files("#photo", str(photo))

    def wait_card(self) -> dict:
        self.page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        return {k: self.page.inner_text(sel) for k, sel in (("name", "#fruit-name"), ("scientific", "#scientific"),
                                                             ("verdict", "#verdict"), ("card", "#result"))}

    def status_text(self, timeout_ms: int = 60_000) -> str:
        self.page.wait_for_selector("#status.error", timeout=timeout_ms)
        return self.page.inner_text("#status")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def phone(chromium, server) -> Iterator:
    opened = []

    def open_phone(lang: str, port: int | None = None) -> Phone:
        opened.append(Phone(chromium, port or server["port"], lang))
        return opened[-1]

    yield open_phone
    for p in opened:
        p.close()


# --- the API --------------------------------------------------------------------------


def test_predict_answers_with_the_fruit_in_the_requested_language(server, held_out_photo):
    data = held_out_photo.read_bytes()
    label = held_out_photo.parent.name
    fruit = load_catalogue().get(label)
    for query, headers, lang in (("?lang=fr", {"Accept-Language": "en"}, "fr"), ("", {"Accept-Language": "fr-FR,fr;q=0.9"}, "fr"),
                                 ("", {}, "en"), ("?lang=en", {"Accept-Language": "fr"}, "en")):
        status, _, raw = call(server["port"], "POST", "/v1/predict" + query, data, {"Content-Type": "image/jpeg", **headers})
        body = json.loads(raw)
        assert status == 200 and body["language"] == lang, body
        best = body["predictions"][0]
        assert best["label"] == label and 0 < best["probability"] <= 1  # today's fields are kept
        assert best["fruit"]["name"] == fruit.name[lang] and best["fruit"]["scientific_name"] == fruit.scientific_name
        assert best["fruit"]["family"] == fruit.family and best["fruit"]["note"] == fruit.note[lang]
        assert body["status"] == "recognised" and body["model"]["labels"] == len(LABELS) and body["elapsed_ms"] > 0
    status, body = post_image(server["port"], data, query="?lang=de")
    assert status == 400 and body["error"] == "bad_lang" and "lang=fr" in body["reason"]


def test_a_non_fruit_picture_is_unknown(server, non_fruit_picture):
    status, body = post_image(server["port"], non_fruit_picture.read_bytes(), "image/png", "?lang=fr")
    assert status == 200 and body["status"] == "unknown", body
    assert body["message"].startswith("Cela ne ressemble pas") and body["predictions"]  # the labels are still there
    d = body["detector"]
    assert d["distance"] > d["max_distance"] or d["residual"] > d["max_residual"]


def test_the_calibration_is_in_the_bundle_and_in_v1_model(server):
    bundle = json.loads((server["model"] / "bundle.json").read_text())
    report = json.loads((server["model"] / "report.json").read_text())
    stored = bundle["open_set"]
    assert len(stored["centroids"]) == len(LABELS) and stored["max_distance"] > 0
    status, _, raw = call(server["port"], "GET", "/v1/model")
    detector = json.loads(raw)["unknown_detector"]
    assert status == 200 and detector == report["open_set"]
    assert detector["max_distance"] == stored["max_distance"] and detector["sure_probability"] >= 0.5
    for rate in ("fruit_rejected", "nonfruit_accepted"):
        assert 0 <= detector[rate] <= 1 and detector[rate] == stored["rates"][rate]
    assert detector["n_nonfruit_evaluation"] == 60 and detector["n_fruit_evaluation"] == 12
    assert set(detector["nonfruit_accepted_by_kind"]) == set(nonfruit.KINDS)
    assert detector["nonfruit_accepted"] <= 0.25  # random features still set noise, text and drawings apart


def test_the_page_is_self_contained_under_a_strict_csp(server):
    status, headers, body = call(server["port"], "GET", "/")
    csp = headers["content-security-policy"]
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    html = body.decode()
    assert 'capture="environment"' in html and 'accept="image/*"' in html
    for path in ("/", "/static/app.js", "/static/app.css", "/static/icon.svg"):
        status, headers, body = call(server["port"], "GET", path)
        assert status == 200 and headers["x-content-type-options"] == "nosniff", path
        body = body.replace(b'xmlns="http://www.w3.org/2000/svg"', b"")  # a name, not a resource
        assert b"http://" not in body and b"https://" not in body and b"<script>" not in body, path


# --- the page in a real browser -------------------------------------------------------


@pytest.mark.parametrize("lang", ["fr", "en"])
def test_the_page_shows_the_fruit_of_a_held_out_photo(phone, held_out_photo, lang):
    p = phone(lang)
    assert p.page.evaluate("document.documentElement.lang") == lang
    fruit = load_catalogue().get(held_out_photo.parent.name)
    p.pick(held_out_photo)
    card = p.wait_card()
    assert card["name"] == fruit.name[lang] and card["scientific"] == fruit.scientific_name
    assert fruit.family in card["card"] and fruit.origin[lang] in card["card"] and fruit.note[lang] in card["card"]
    assert ("très sûr" if lang == "fr" else "very sure") in card["verdict"] or ("assez sûr" if lang == "fr" else "fairly sure") in card["verdict"]
    assert p.page.get_attribute("#result", "data-status") == "recognised"
    p.screenshot(f"recognised-{lang}")
    # The photo was shrunk and re-encoded in the browser, and nothing left this origin.
    posts = [r for r in p.requests if r.method == "POST"]
    assert len(posts) == 1 and posts[0].url.endswith(f"/v1/predict?top=5&lang={lang}")
    assert posts[0].headers["content-type"] == "image/jpeg"
    (sent,) = p.page.evaluate("window.__sent")
    assert sent["type"] == "image/jpeg" and max(sent["width"], sent["height"]) <= 1024 and sent["size"] < MAX_BODY
    assert all(r.url.startswith(p.origin) or r.url.startswith("blob:") for r in p.requests), [r.url for r in p.requests]
    assert p.errors == []


@pytest.mark.parametrize("lang", ["fr", "en"])
def test_the_page_says_unknown_for_a_non_fruit_picture(phone, non_fruit_picture, lang):
    p = phone(lang)
    p.pick(non_fruit_picture)
    card = p.wait_card()
    assert card["name"] == UNKNOWN_TITLE[lang] and card["scientific"] == ""
    assert p.page.get_attribute("#result", "data-status") == "unknown"
    p.screenshot(f"unknown-{lang}")
    assert p.errors == []


def test_the_page_explains_an_uncertain_answer(phone, server, held_out_photo):
    """The server's real answer for a photo, turned into an ``uncertain`` one in transit (no
    photo of this model is reliably uncertain): the card backs off to the shared genus."""
    p = phone("fr")

    def uncertain(route):
        body = route.fetch().json()
        body.update(status="uncertain", message="Nous sommes presque sûrs que c'est dans le genre Prunus.",
                    group={"rank": "genus", "name": "Prunus"})
        body["predictions"][0]["probability"] = 0.45
        route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    p.page.route("**/v1/predict*", uncertain)
    p.pick(held_out_photo)
    card = p.wait_card()
    assert card["verdict"].startswith("Nous sommes presque sûrs que c'est dans le genre Prunus.")
    assert "pas sûr" in card["verdict"] and "45" in card["verdict"]
    fruit = load_catalogue().get(held_out_photo.parent.name)
    assert card["name"] == f"Peut-être : {fruit.name['fr']}" and card["scientific"] == fruit.scientific_name
    assert p.page.get_attribute("#result", "data-status") == "uncertain"
    p.screenshot("uncertain-fr")


def test_keyboard_opens_the_file_picker_and_the_language_switch_translates(phone, held_out_photo):
    p = phone("en")
    for _ in range(6):  # skip link, language switch, then the photo button
        p.page.keyboard.press("Tab")
        if p.page.evaluate("document.activeElement.id") == "pick":
            break
    assert p.page.evaluate("document.activeElement.id") == "pick"
    p.page.keyboard.press("Enter")
    deadline = time.monotonic() + 20
    while not p.choosers:
        assert time.monotonic() < deadline, "Enter on the photo button opened no file chooser"
        p.page.wait_for_timeout(50)
    assert p.choosers[0].element.get_attribute("capture") == "environment"
    p.choosers[0].set_files(str(held_out_photo))
    fruit = load_catalogue().get(held_out_photo.parent.name)
    assert p.wait_card()["name"] == fruit.name["en"]
    assert p.page.evaluate("document.activeElement.id") == "fruit-name"  # a screen reader hears the answer
    p.page.click("#lang-switch")  # translates the page and asks the server again in French
    expect(p.page.locator("html")).to_have_attribute("lang", "fr")
    expect(p.page.locator("#fruit-name")).to_have_text(fruit.name["fr"], timeout=30_000)
    assert p.page.inner_text("h1") == "Quel est ce fruit ?"


def test_the_page_explains_a_photo_too_big_and_no_network(phone, tmp_path):
    gradient = tmp_path / "gradient.png"
    gradient.write_bytes(nonfruit.picture("gradient", seed=7, size=300))
    noisy = tmp_path / "noisy.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (1400, 1400, 3), dtype=np.uint8)).save(noisy)
    p = phone("en")
    p.pick(noisy)  # shrunk to 1,024 px, pixel noise stays over the test server's 64 kB cap
    assert "too big" in p.status_text()
    (sent,) = p.page.evaluate("window.__sent")
    assert sent["size"] > MAX_BODY and (sent["width"], sent["height"]) == (1024, 1024)  # shrunk from 1,400 px
    p.context.set_offline(True)
    p.pick(gradient)
    assert "No network" in p.status_text()


def test_the_page_says_the_server_is_still_loading(chromium, tmp_path, non_fruit_picture):
    """The real application with a loader the test holds back (no TensorFlow), in uvicorn."""
    import uvicorn

    from fruitdask.serve.app import create_app
    from fruitdask.serve.settings import ServeSettings

    release = threading.Event()

    def load():
        release.wait(60)
        raise RuntimeError("released by the test")

    port = free_port()
    app = create_app(ServeSettings(port=port), load)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not uv.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        p = Phone(chromium, port, "fr")
        try:
            p.pick(non_fruit_picture)
            assert "Le serveur démarre encore" in p.status_text()
        finally:
            p.close()
    finally:
        release.set()
        uv.should_exit = True
        thread.join(30)


@pytest.mark.parametrize("crafted", ["constructor", "__proto__", "toString", "de"])
def test_a_crafted_lang_falls_back_to_the_default_and_uploads_still_work(chromium, tmp_path, non_fruit_picture, crafted):
    """Issue #31 item 10: ``/?lang=constructor`` (or ``__proto__``, ``toString``: names every
    object has) shows the page in the default language, and a photo gets its answer; the
    server refuses those codes itself with 400 ``bad_lang``. The real application with the
    fake model of ``tests/serve_fakes.py`` (no TensorFlow), in uvicorn.

    On the former page (``wanted in T``) the title read "undefined", ``<html lang>`` was the
    crafted name and every upload failed with 400 ``bad_lang``. ``de`` (not an object's
    name) is the control: it fell back before too."""
    import uvicorn
    from serve_fakes import FakePredictor

    from fruitdask.serve.app import create_app
    from fruitdask.serve.settings import ServeSettings

    port = free_port()
    app = create_app(ServeSettings(port=port), lambda: FakePredictor(32, 1_000_000))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not (uv.started and app.state.serve.ready):
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        for code in (crafted, crafted.upper()):
            status, body = post_image(port, non_fruit_picture.read_bytes(), "image/png", f"?lang={code}")
            assert (status, body["error"]) == (400, "bad_lang"), body
        p = Phone(chromium, port, "en", path=f"/?lang={crafted}")
        try:
            assert p.page.evaluate("document.documentElement.lang") == "en"
            assert p.page.title() == "Fruitdask: what is this fruit?" and p.page.inner_text("h1") == "What is this fruit?"
            assert "undefined" not in p.page.inner_text("body")
            p.pick(non_fruit_picture)
            card = p.wait_card()
            assert card["name"] and "undefined" not in card["card"]
            assert p.page.inner_text("#status") == "Done."
            (post,) = [r for r in p.requests if r.method == "POST"]
            assert post.url.endswith("/v1/predict?top=5&lang=en")
            assert p.errors == []
        finally:
            p.close()
    finally:
        uv.should_exit = True
        thread.join(30)
