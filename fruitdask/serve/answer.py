"""What ``POST /v1/predict`` says about a photo: the fruit, in the reader's language, and how sure.

Each prediction keeps today's ``label`` and ``probability`` and gains ``fruit`` (names,
scientific name, genus, family, origin, season, note, from :mod:`fruitdask.catalogue`).
The top-level ``status`` is ``recognised``, ``uncertain`` (then ``group`` names the genus
or family the likely candidates share, as iNaturalist backs off to the genus) or
``unknown`` (not a fruit this model knows), decided by the bundle's calibrated detector
(:mod:`fruitdask.classifier.openset`). ``language`` says which language was used:
``?lang=fr|en``, else the best of ``Accept-Language``, else English.
"""

from __future__ import annotations

import numpy as np

from fruitdask.catalogue import ANSWERS, DEFAULT_LANGUAGE, LANGUAGES, RANK_WORDS, load_catalogue
from fruitdask.classifier.openset import MIN_SURE, RECOGNISED, UNCERTAIN, OpenSet

#: A candidate counts toward the shared genus or family from this probability on.
CANDIDATE_PROBABILITY = 0.1


class BadLanguage(ValueError):
    """``?lang=`` names a language the catalogue is not written in."""


def parse_accept_language(header: str | None) -> str | None:
    """The supported language the ``Accept-Language`` header prefers most (q-values), or None."""
    best, best_q = None, 0.0
    for i, item in enumerate((header or "").split(",")):
        tag, _, params = item.strip().partition(";")
        lang = tag.strip().lower().split("-", 1)[0]
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        # Earlier items win ties, as the header lists them in preference order.
        if lang in LANGUAGES and q > best_q + 1e-9 * i:
            best, best_q = lang, q
    return best


def negotiate(query_lang: str | None, accept_language: str | None) -> tuple[str, str]:
    """``(language, where it came from)``: ``query``, ``accept-language`` or ``default``."""
    if query_lang is not None:
        lang = query_lang.strip().lower()
        if lang not in LANGUAGES:
            raise BadLanguage(f"lang={query_lang!r} is not available: pass lang={' or lang='.join(LANGUAGES)}")
        return lang, "query"
    accepted = parse_accept_language(accept_language)
    return (accepted, "accept-language") if accepted else (DEFAULT_LANGUAGE, "default")


def decide(open_set: OpenSet | None, best_p: float, distance: float, resid: float) -> str:
    """The status; a bundle trained before the detector existed is never ``unknown``."""
    if open_set is None:
        return RECOGNISED if best_p >= MIN_SURE else UNCERTAIN
    return open_set.status(best_p, distance, resid)


def _number(x: float) -> float | None:
    return round(float(x), 4) if np.isfinite(x) else None


def respond(predictor, scores: np.ndarray, top: int, lang: str) -> dict:
    """The answer for one row of :meth:`Predictor.predict_scores`."""
    proba, distance, resid = predictor.split(scores)
    labels = predictor.bundle.labels
    # The candidates of the genus back-off come from every label, not only the ?top= returned.
    likely = [labels[j] for j in np.argsort(-proba, kind="stable") if proba[j] >= CANDIDATE_PROBABILITY]
    return describe(predictor.top(proba, top), predictor.open_set, distance, resid, lang, likely)


def describe(predictions: list[dict], open_set: OpenSet | None, distance: float, resid: float, lang: str,
             likely: list[str] | None = None) -> dict:
    """The answer's body (less ``model`` and ``elapsed_ms``) for ``predictions``, best first,
    each ``{"label", "probability"}`` as :meth:`Predictor.top` returns them; ``likely``: the
    labels of probability :data:`CANDIDATE_PROBABILITY` or more (default: among ``predictions``)."""
    cat = load_catalogue()
    for p in predictions:
        p["fruit"] = cat.describe(p["label"], lang)
    status = decide(open_set, predictions[0]["probability"], distance, resid)
    if likely is None:
        likely = [p["label"] for p in predictions if p["probability"] >= CANDIDATE_PROBABILITY]
    likely = likely or [predictions[0]["label"]]
    group = cat.shared_group(likely) if status == UNCERTAIN and len(likely) > 1 else None
    words = ANSWERS[lang]
    if status == UNCERTAIN and group:
        message = words["uncertain_group"].format(rank=RANK_WORDS[lang][group["rank"]], group=group["name"])
    else:
        message = words[status].format(name=predictions[0]["fruit"]["name"])
    return {
        "status": status,
        "message": message,
        "group": group,
        "language": lang,
        "predictions": predictions,
        "detector": {"distance": _number(distance), "max_distance": open_set.max_distance if open_set else None,
                     "residual": _number(resid), "max_residual": open_set.max_residual if open_set else None,
                     "sure_probability": open_set.sure_probability if open_set else MIN_SURE},
    }
