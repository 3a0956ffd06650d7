"""The fruit catalogue (issue #24): every label of the shared sets and of the bundled sample
has a complete entry in both languages, and the schema refuses what is incomplete."""

from __future__ import annotations

import copy
import fnmatch
import json
from importlib import resources

import pytest
import tomllib
from conftest import BENCH, BUNDLED, REPO, SAMPLE

from fruitdask.catalogue import LANGUAGES, Catalogue, load_catalogue
from fruitdask.errors import InputError


def _labels(*roots) -> list[str]:
    return sorted({p.name for root in roots for p in root.iterdir() if p.is_dir()})


SHARED_LABELS = _labels(SAMPLE / "Training", SAMPLE / "Test", BENCH / "Training", BUNDLED)


def _document() -> dict:
    return json.loads(resources.files("fruitdask.catalogue").joinpath("fruits.json").read_text(encoding="utf-8"))


def test_every_label_of_the_shared_sets_and_the_sample_has_an_entry():
    assert len(SHARED_LABELS) == 50  # the bench's 50 labels hold the sample's 12
    assert load_catalogue().missing(SHARED_LABELS) == []


@pytest.mark.parametrize("label", sorted(set(SHARED_LABELS) | set(load_catalogue().fruits)))
def test_entry_is_complete_in_both_languages(label):
    """The shared sets' labels, and every other Fruits-360 label the catalogue names."""
    fruit = load_catalogue().get(label)
    for lang in LANGUAGES:
        answer = fruit.describe(lang)
        for key in ("name", "scientific_name", "genus", "family", "origin", "season", "note"):
            assert isinstance(answer[key], str) and answer[key].strip(), (label, lang, key)
        assert answer["sources"] and answer["in_catalogue"] is True
    # The scientific name starts with the genus (hybrids: "Citrus × limon"), in the family's -aceae form.
    assert fruit.scientific_name.split()[0] == fruit.genus, label
    assert fruit.family.endswith("aceae"), label
    # Both languages are really written, not copied (names may coincide: Kiwi, Orange).
    assert fruit.note["fr"] != fruit.note["en"], label


def test_dataset_labels_map_to_species():
    cat = load_catalogue()
    assert cat.get("Cherry 1").scientific_name == "Prunus avium"
    assert cat.get("Tomato 1").scientific_name == "Solanum lycopersicum"
    assert cat.get("Apple Braeburn").scientific_name == "Malus domestica 'Braeburn'"
    assert cat.get("Banana").describe("fr")["name"] == "Banane"


def test_a_label_missing_from_the_catalogue_gets_its_name_and_nothing_invented():
    answer = load_catalogue().describe("Durian", "fr")
    assert answer["name"] == "Durian" and answer["in_catalogue"] is False
    assert all(answer[k] is None for k in ("scientific_name", "genus", "family", "origin", "season", "note"))


def test_shared_group_names_the_narrowest_common_rank():
    cat = load_catalogue()
    assert cat.shared_group(["Peach", "Nectarine", "Cherry 1"]) == {"rank": "genus", "name": "Prunus"}
    assert cat.shared_group(["Peach", "Pear"]) == {"rank": "family", "name": "Rosaceae"}
    assert cat.shared_group(["Banana", "Pear"]) is None
    assert cat.shared_group(["Peach", "Durian"]) is None


@pytest.mark.parametrize("breakage", ["drop_french_note", "empty_family", "no_sources", "duplicate", "extra_field"])
def test_schema_refuses_an_incomplete_entry(breakage):
    doc = copy.deepcopy(_document())
    entry = doc["fruits"][0]
    if breakage == "drop_french_note":
        del entry["note"]["fr"]
    elif breakage == "empty_family":
        entry["family"] = " "
    elif breakage == "no_sources":
        entry["sources"] = []
    elif breakage == "duplicate":
        doc["fruits"].append(copy.deepcopy(entry))
    else:
        entry["colour"] = "red"
    with pytest.raises(InputError, match=entry["label"]):
        Catalogue.from_document(doc)


def test_the_catalogue_and_the_page_are_package_data():
    """pyproject's package-data globs ship every file the service reads at run time."""
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["fruitdask"]
    package = REPO / "fruitdask"
    needed = [p for d in ("catalogue", "serve/static") for p in (package / d).iterdir() if p.suffix not in (".py", ".pyc") and p.is_file()]
    assert {p.name for p in needed} >= {"fruits.json", "index.html", "app.js", "app.css", "icon.svg"}
    for path in needed:
        rel = str(path.relative_to(package))
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not package data: add it to pyproject.toml"


def test_train_warns_about_labels_missing_from_the_catalogue(caplog):
    from fruitdask.classifier.classify import warn_uncatalogued

    with caplog.at_level("WARNING", logger="fruitdask.classifier.classify"):
        assert warn_uncatalogued(["Banana", "Durian", "Cherry Wax Red"]) == ["Durian", "Cherry Wax Red"]
    assert "2 labels have no entry in the fruit catalogue" in caplog.text and "Durian, Cherry Wax Red" in caplog.text
    caplog.clear()
    assert warn_uncatalogued(SHARED_LABELS) == [] and caplog.text == ""


def test_every_language_answers_every_status_and_names_every_rank():
    """The API's sentences live with the catalogue, one set per language of LANGUAGES (a
    language more is fruits.json, catalogue/__init__.py and the page's app.js): each names
    every status the open-set detector decides, and every rank a shared group can have."""
    from fruitdask.catalogue import ANSWERS, RANK_WORDS
    from fruitdask.classifier.openset import RECOGNISED, UNCERTAIN, UNKNOWN

    assert set(ANSWERS) == set(RANK_WORDS) == set(LANGUAGES)
    for lang in LANGUAGES:
        assert set(ANSWERS[lang]) == {RECOGNISED, UNCERTAIN, UNKNOWN, "uncertain_group"}, lang
        assert set(RANK_WORDS[lang]) == {"genus", "family"}, lang
        assert all(text.strip() for text in ANSWERS[lang].values()), lang
