"""The ``unknown`` detector and the answer's status and language (issue #24), without TensorFlow:
the threshold choice, the held-apart measurement of both error rates, the generated
non-fruit pictures, ``Accept-Language``, and the iNaturalist-style back-off to a genus."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fruitdask.classifier import nonfruit, openset
from fruitdask.classifier.openset import OpenSet, Scored
from fruitdask.features.featurize import decode_image
from fruitdask.serve import answer


def test_thresholds_reject_the_most_non_fruit_within_the_fruit_budget():
    # 20 fruit photos: the budget (5 %) allows one rejected. Non-fruit pictures are far by
    # one score or the other, never both: only the pair of thresholds catches them all.
    fruit_d = np.r_[np.linspace(0.3, 0.6, 19), 1.5]
    fruit_r = np.r_[np.linspace(0.2, 0.4, 19), 0.3]
    other_d = np.array([0.9, 1.0, 0.4, 0.5])
    other_r = np.array([0.3, 0.25, 0.8, 0.9])
    max_d, max_r = openset.choose_thresholds(fruit_d, fruit_r, other_d, other_r)
    assert 0.6 < max_d < 0.9 and 0.4 < max_r < 0.8  # the far fruit photo is the one rejected
    # No non-fruit to reject: nothing is rejected.
    max_d, max_r = openset.choose_thresholds(fruit_d, fruit_r, np.array([]), np.array([]))
    assert max_d > 1.5 and max_r > 0.4
    # When rejecting non-fruit would cost more fruit than the budget, fruit wins.
    max_d, _ = openset.choose_thresholds(np.array([0.1, 0.9]), np.array([0.1, 0.1]), np.array([0.5]), np.array([0.1]))
    assert max_d > 0.9


def test_residual_is_what_the_pca_leaves_out():
    from fruitdask.reduce import Reduction

    comp = np.array([[1.0, 0.0, 0.0]])
    red = SimpleNamespace(mean=np.zeros(3), scale=np.ones(3), pca_mean=np.zeros(3), components=comp)
    got = openset.residual(red, np.array([[5.0, 0.0, 0.0], [0.0, 3.0, 4.0]]))
    np.testing.assert_allclose(got, [0.0, np.sqrt(25 / 3)])
    assert Reduction  # the real class has the same four arrays


def test_residual_is_judged_against_the_predicted_labels_own_spread():
    resid = np.array([0.5, 0.6, 0.4, 0.2, 0.2, 0.2])
    labels = np.array(["Strawberry"] * 3 + ["Orange"] * 3)
    scale = openset.residual_scale(resid, labels, ["Orange", "Strawberry", "Kiwi"])
    np.testing.assert_allclose(scale, [0.3, 0.5, 0.3])  # Orange and Kiwi (no photo) floored at the median of all
    det = OpenSet(np.zeros((3, 2)), 1.0, 0.5, max_residual=1.5, residual_scale=scale)
    rel = det.relative(np.array([0.6, 0.6]), np.array([1, 0]))
    np.testing.assert_allclose(rel, [1.2, 2.0])  # the same residual: fine for a strawberry, not for an orange
    assert [det.status(0.9, 0.1, r) for r in rel] == ["recognised", "unknown"]
    scored = Scored(np.ones(2), np.array(["Strawberry", "Orange"]), np.zeros(2), np.array([0.6, 0.6]))
    np.testing.assert_allclose(scored.relative_to(["Orange", "Strawberry", "Kiwi"], scale).residual, rel)


def test_sure_probability_is_the_lowest_that_keeps_answers_right():
    best_p = np.array([0.95, 0.9, 0.8, 0.6, 0.55, 0.52])
    correct = np.array([True, True, True, True, False, False])
    assert openset.choose_sure_probability(best_p, correct) == 0.6
    assert openset.choose_sure_probability(best_p, np.ones(6, bool)) == 0.5


#: The two parts of a bundle the detector reads: the classifier's scaler and the labels.
FakeBundle = SimpleNamespace(classifier=SimpleNamespace(mean=np.zeros(2), scale=np.ones(2)), labels=["Peach", "Pear"])


def test_calibration_measures_both_error_rates_on_data_it_did_not_choose_on():
    rng = np.random.default_rng(0)
    train = np.vstack([rng.normal(0, 0.1, (20, 2)), rng.normal(3, 0.1, (20, 2))])
    y_train = np.array(["Peach"] * 20 + ["Pear"] * 20)
    held_labels = np.array(["Peach", "Pear"] * 6)
    # Fruit photos are near their centroid but for one photo of the evaluation half.
    distance = np.full(12, 0.1)
    distance[3] = 5.0  # index 3 = the second Pear photo: the evaluation half
    fruit = Scored(np.full(12, 0.9), held_labels.copy(), distance, np.full(12, 0.1))
    calib_other = Scored(np.full(6, 0.9), np.array(["Peach"] * 6), np.full(6, 4.0), np.full(6, 0.1))
    eval_other = Scored(np.full(6, 0.9), np.array(["Peach"] * 6), np.array([4.0, 4.0, 4.0, 4.0, 0.05, 0.05]),
                        np.array([0.1, 0.1, 0.1, 0.1, 0.1, 9.0]))
    kinds = ["noise", "noise", "text", "text", "uniform", "uniform"]
    det = openset.calibrate(FakeBundle, train, y_train, fruit, held_labels, calib_other, eval_other, kinds)
    assert 0.1 < det.max_distance < 4.0
    assert det.rates["fruit_rejected"] == round(1 / 6, 4)  # 1 of the 6 evaluation fruit photos
    assert det.rates["fruit_rejected_by_label"] == {"Peach": 0.0, "Pear": round(1 / 3, 4)}
    # The two "uniform" pictures are near a centroid; only the residual of the second gives it away.
    assert det.max_residual < 9.0
    assert det.rates["nonfruit_accepted"] == round(1 / 6, 4)
    assert det.rates["nonfruit_accepted_by_kind"] == {"noise": 0.0, "text": 0.0, "uniform": 0.5}
    assert det.rates["n_fruit_calibration"] == det.rates["n_fruit_evaluation"] == 6
    np.testing.assert_allclose(det.centroids, [train[:20].mean(axis=0), train[20:].mean(axis=0)])
    again = OpenSet.from_document(det.document())
    assert (again.max_distance, again.max_residual) == (det.max_distance, det.max_residual) and again.rates == det.rates
    np.testing.assert_allclose(again.centroids, det.centroids, rtol=1e-5)
    assert again.status(0.9, 0.05, 0.1) == "recognised" and again.status(0.3, 0.05, 0.1) == "uncertain"
    assert again.status(0.99, 100.0, 0.1) == "unknown"
    assert again.status(0.99, 0.05, again.max_residual * 2) == "unknown"


def test_non_fruit_pictures_are_deterministic_varied_and_decode_like_photos():
    pics = nonfruit.pictures(2, seed=1)
    assert [k for k, _ in pics] == [k for k in nonfruit.KINDS for _ in range(2)]
    assert pics == nonfruit.pictures(2, seed=1)
    assert pics != nonfruit.pictures(2, seed=2)
    arrays = [decode_image(data, 32) for _, data in pics]
    assert all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a in arrays)
    text = np.asarray(Image.open(io.BytesIO(dict(pics)["text"])))
    assert len(np.unique(text.reshape(-1, 3), axis=0)) > 2  # text really drawn on its background


@pytest.mark.parametrize(("query", "header", "want"), [
    ("fr", "en-US,en;q=0.9", ("fr", "query")),
    (None, "fr-FR,fr;q=0.9,en;q=0.8", ("fr", "accept-language")),
    (None, "de-DE,de;q=0.9,en;q=0.5,fr;q=0.4", ("en", "accept-language")),
    (None, "en;q=0.3, fr;q=0.7", ("fr", "accept-language")),
    (None, "de, es", ("en", "default")),
    (None, None, ("en", "default")),
    ("EN", None, ("en", "query")),
])
def test_language_from_query_then_accept_language_then_english(query, header, want):
    assert answer.negotiate(query, header) == want


def test_an_unavailable_language_is_refused_with_the_fix():
    with pytest.raises(answer.BadLanguage, match="lang=fr or lang=en"):
        answer.negotiate("de", None)


def _predictions(*pairs):
    return [{"label": lab, "probability": p} for lab, p in pairs]


def test_uncertain_names_the_genus_the_candidates_share():
    det = OpenSet(np.zeros((2, 2)), max_distance=1.0, sure_probability=0.6, max_residual=1.0)
    body = answer.describe(_predictions(("Peach", 0.45), ("Nectarine", 0.4), ("Banana", 0.05)), det, 0.5, 0.5, "en")
    assert body["status"] == "uncertain" and body["group"] == {"rank": "genus", "name": "Prunus"}
    assert body["message"] == "We're pretty sure this is in the genus Prunus."
    body = answer.describe(_predictions(("Peach", 0.45), ("Pear", 0.4)), det, 0.5, 0.5, "fr")
    assert body["group"] == {"rank": "family", "name": "Rosaceae"}
    assert body["message"] == "Nous sommes presque sûrs que c'est dans la famille Rosaceae."
    assert body["predictions"][0]["fruit"]["name"] == "Pêche" and body["language"] == "fr"


def test_recognised_unknown_and_a_bundle_without_detector():
    det = OpenSet(np.zeros((2, 2)), max_distance=1.0, sure_probability=0.6, max_residual=1.0)
    body = answer.describe(_predictions(("Banana", 0.9), ("Lemon", 0.1)), det, 0.2, 0.2, "en")
    assert body["status"] == "recognised" and body["group"] is None
    assert body["predictions"][0]["fruit"]["scientific_name"] == "Musa acuminata (Cavendish group)"
    assert body["predictions"][0]["label"] == "Banana" and body["predictions"][0]["probability"] == 0.9
    assert answer.describe(_predictions(("Banana", 0.99)), det, 3.0, 0.2, "en")["status"] == "unknown"
    assert answer.describe(_predictions(("Banana", 0.99)), det, 0.2, 3.0, "en")["status"] == "unknown"
    old = answer.describe(_predictions(("Banana", 0.99)), None, float("nan"), float("nan"), "en")
    assert old["status"] == "recognised" and old["detector"]["distance"] is None and old["detector"]["residual"] is None


def test_the_genus_back_off_sees_every_label_not_only_the_top_returned():
    det = OpenSet(np.zeros((3, 2)), max_distance=1.0, sure_probability=0.6, max_residual=1.0)
    predictor = SimpleNamespace(
        bundle=SimpleNamespace(labels=["Banana", "Cherry 1", "Peach"]), open_set=det,
        split=lambda row: (row[:-2], float(row[-2]), float(row[-1])),
        top=lambda proba, k: [{"label": "Peach", "probability": 0.5}, {"label": "Cherry 1", "probability": 0.45}][:k])
    body = answer.respond(predictor, np.array([0.05, 0.45, 0.5, 0.2, 0.2]), 1, "en")  # ?top=1
    assert len(body["predictions"]) == 1 and body["status"] == "uncertain"
    assert body["group"] == {"rank": "genus", "name": "Prunus"}
