"""The public page's static files, read as text (no browser, no server): readable contrast,
every translated element has its text in both languages, nothing inline for the CSP to refuse."""

from __future__ import annotations

import re

from conftest import REPO

STATIC = REPO / "fruitdask" / "serve" / "static"
#: (text, background) custom properties or literal colours the stylesheet pairs.
PAIRS = [("--ink", "--paper"), ("--muted", "--paper"), ("--muted", "--soft"), ("--ink", "--soft"),
         ("--accent-ink", "--accent"), ("--warn", "--warn-soft"), ("--bad", "--bad-soft"), ("--ink", "#dcedc8")]


def _luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two ``#rrggbb`` colours."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def test_contrast_ratio_formula():
    assert round(contrast("#000000", "#ffffff"), 1) == 21.0
    assert round(contrast("#777777", "#ffffff"), 2) == 4.48  # the classic just-failing grey


def test_every_text_colour_pair_reads_at_4_5_to_1():
    css = (STATIC / "app.css").read_text()
    colours = dict(re.findall(r"(--[\w-]+):\s*(#[0-9a-fA-F]{6})", css))
    for text, background in PAIRS:
        assert text.startswith("#") or text in colours, text
        ratio = contrast(colours.get(text, text), colours.get(background, background))
        assert ratio >= 4.5, f"{text} on {background}: {ratio:.2f}:1"
    assert "#dcedc8" in css  # the verdict's background, paired above


def test_every_translated_element_has_both_languages():
    html = (STATIC / "index.html").read_text()
    js = (STATIC / "app.js").read_text()
    keys = set(re.findall(r'data-i18n="(\w+)"', html))
    en, fr = js.split("\n    fr: {", 1)
    en = en.split("\n    en: {", 1)[1]
    for key in keys | {"docTitle", "offline", "loading", "tooBig", "unknownTitle", "switchTo", "maybe"}:
        assert re.search(rf"\b{key}: ", en) and re.search(rf"\b{key}: ", fr), key
    assert len(keys) >= 6


def test_nothing_inline_for_the_csp_to_refuse():
    html = (STATIC / "index.html").read_text()
    assert "<script>" not in html and "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handler
    code = "\n".join(line.split("//", 1)[0] for line in (STATIC / "app.js").read_text().splitlines())
    assert ".innerHTML" not in code and "eval(" not in code and "new Function" not in code


def test_the_language_comes_from_an_explicit_list():
    """Issue #31 item 10: ``?lang=constructor`` or ``__proto__`` passed ``wanted in T`` (every
    object has them) and broke the page. The page checks codes against a list, the server's
    own languages. Fails on the former app.js (``in T``, no list)."""
    from fruitdask.catalogue import DEFAULT_LANGUAGE, LANGUAGES

    js = (STATIC / "app.js").read_text()
    code = "\n".join(line.split("//", 1)[0] for line in js.splitlines())
    assert not re.search(r"\bin\s+T\b", code) and "hasOwnProperty" not in code
    listed = re.search(r"const LANGUAGES = \[([^\]]*)\];", code)
    assert listed, "no explicit list of languages in app.js"
    assert sorted(re.findall(r'"(\w+)"', listed.group(1))) == sorted(LANGUAGES)
    assert f'const DEFAULT_LANGUAGE = "{DEFAULT_LANGUAGE}";' in code
    assert sorted(re.findall(r"^    (\w+): \{$", js, re.M)) == sorted(LANGUAGES)  # T has exactly those
