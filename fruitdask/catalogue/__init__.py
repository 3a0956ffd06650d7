"""The fruit catalogue: what the public learns about each Fruits-360 label.

One reviewed data file, ``fruits.json`` (shipped as package data), holds an entry per
dataset label: common names in French and English, the scientific name, genus, family,
origin, season on European markets, a short biodiversity note, and the references its
facts come from. Dataset labels map to species (``Cherry 1`` -> *Prunus avium*).

A label the catalogue lacks still gets an answer: its dataset name and nothing else
(:meth:`Catalogue.describe`), never an invented fact; ``train`` warns about such labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from fruitdask.errors import InputError

CATALOGUE_FORMAT = "fruitdask-catalogue/1"
#: The languages every text of an entry, and every answer below, is written in (each entry
#: is checked for all of them). A language more: its texts in fruits.json, its answers here,
#: its page texts in serve/static/app.js (docs/architecture.md, "Seams").
LANGUAGES = ("fr", "en")
#: The language the API answers in when the request names none it can use.
DEFAULT_LANGUAGE = "en"
TEXT_FIELDS = ("name", "origin", "season", "note")
PLAIN_FIELDS = ("scientific_name", "genus", "family")
#: What the API says of a photo, per language and status (``uncertain_group``: the
#: uncertain answer that names the genus or family the candidates share).
ANSWERS = {
    "en": {
        "recognised": "This looks like {name}.",
        "uncertain": "Not sure: it could be {name}.",
        "uncertain_group": "We're pretty sure this is in the {rank} {group}.",
        "unknown": "This does not look like a fruit this app knows.",
    },
    "fr": {
        "recognised": "On dirait : {name}.",
        "uncertain": "Pas sûr : ce pourrait être {name}.",
        "uncertain_group": "Nous sommes presque sûrs que c'est dans {rank} {group}.",
        "unknown": "Cela ne ressemble pas à un fruit que cette application connaît.",
    },
}
#: How ANSWERS' ``uncertain_group`` names a rank, per language.
RANK_WORDS = {"en": {"genus": "genus", "family": "family"}, "fr": {"genus": "le genre", "family": "la famille"}}


@dataclass(frozen=True)
class Fruit:
    """One catalogue entry; the texts are ``{language: text}`` mappings."""

    label: str
    name: dict[str, str]
    scientific_name: str
    genus: str
    family: str
    origin: dict[str, str]
    season: dict[str, str]
    note: dict[str, str]
    sources: tuple[str, ...]

    def describe(self, lang: str) -> dict:
        """The entry in one language, as the API answers it."""
        return {
            "name": self.name[lang], "scientific_name": self.scientific_name, "genus": self.genus,
            "family": self.family, "origin": self.origin[lang], "season": self.season[lang], "note": self.note[lang],
            "sources": list(self.sources), "in_catalogue": True,
        }


def problems(entry: dict) -> list[str]:
    """What is wrong with one raw entry of ``fruits.json`` (empty when it is complete)."""
    label = entry.get("label") or "(no label)"
    found = []
    for key in (*PLAIN_FIELDS, "label"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            found.append(f"{label}: {key} missing or empty")
    for key in TEXT_FIELDS:
        texts = entry.get(key)
        for lang in LANGUAGES:
            if not isinstance(texts, dict) or not str(texts.get(lang, "")).strip():
                found.append(f"{label}: {key}.{lang} missing or empty")
    sources = entry.get("sources")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s.strip() for s in sources):
        found.append(f"{label}: sources must be a non-empty list of references")
    extra = set(entry) - {"label", "sources", *PLAIN_FIELDS, *TEXT_FIELDS}
    if extra:
        found.append(f"{label}: unknown fields {sorted(extra)}")
    return found


class Catalogue:
    """The entries by dataset label."""

    def __init__(self, fruits: dict[str, Fruit]) -> None:
        self.fruits = fruits

    @classmethod
    def from_document(cls, doc: dict) -> Catalogue:
        """Validate a parsed ``fruits.json``; refuse it whole when any entry is incomplete."""
        if doc.get("format") != CATALOGUE_FORMAT:
            raise InputError(f"fruit catalogue format {doc.get('format')!r} is not {CATALOGUE_FORMAT!r}: fix fruits.json")
        entries = doc.get("fruits", [])
        found = [p for e in entries for p in problems(e)]
        labels = [e.get("label") for e in entries]
        found += [f"{lab}: listed twice" for lab in sorted({x for x in labels if labels.count(x) > 1})]
        if found:
            raise InputError("the fruit catalogue is incomplete: " + "; ".join(found) + ": fix fruits.json")
        fruits = {e["label"]: Fruit(e["label"], e["name"], e["scientific_name"], e["genus"], e["family"], e["origin"],
                                    e["season"], e["note"], tuple(e["sources"])) for e in entries}
        return cls(fruits)

    def get(self, label: str) -> Fruit | None:
        return self.fruits.get(label)

    def missing(self, labels: list[str]) -> list[str]:
        """The labels with no entry."""
        return [lab for lab in labels if lab not in self.fruits]

    def describe(self, label: str, lang: str) -> dict:
        """The answer for ``label`` in ``lang``; a label with no entry gets its name only."""
        fruit = self.fruits.get(label)
        if fruit is not None:
            return fruit.describe(lang)
        return {"name": label, "scientific_name": None, "genus": None, "family": None, "origin": None,
                "season": None, "note": None, "sources": [], "in_catalogue": False}

    def shared_group(self, labels: list[str]) -> dict | None:
        """The narrowest rank that all ``labels`` share, ``{"rank", "name"}``: genus, else
        family; None when they share neither or one is not catalogued."""
        fruits = [self.fruits.get(lab) for lab in labels]
        if not fruits or any(f is None for f in fruits):
            return None
        for rank in ("genus", "family"):
            names = {getattr(f, rank) for f in fruits}
            if len(names) == 1:
                return {"rank": rank, "name": names.pop()}
        return None


@lru_cache(maxsize=1)
def load_catalogue() -> Catalogue:
    """The shipped catalogue, read once per process."""
    text = resources.files(__package__).joinpath("fruits.json").read_text(encoding="utf-8")
    return Catalogue.from_document(json.loads(text))
