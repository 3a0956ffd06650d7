"""Is it a fruit this model knows? The ``recognised`` / ``uncertain`` / ``unknown`` answer.

A softmax always names *some* label, confidently even for noise: a linear model
extrapolates. So the answer is decided by two calibrated numbers:

- **distance**: how far the photo's standardized PCA features lie from the nearest class
  centroid of the training set (root-mean-square over the components). A photo farther than
  ``max_distance`` is ``unknown``: not a fruit this model has seen.
- **probability** of the best label: below ``sure_probability`` the answer is ``uncertain``.

:func:`calibrate` chooses ``max_distance`` on a *calibration* split (half the held-out fruit
photos plus a generated non-fruit set, :mod:`fruitdask.classifier.nonfruit`) and measures
both error rates on the *other* half and on non-fruit pictures drawn with another seed,
which the choice never saw: fruit rejected as unknown, non-fruit accepted as a fruit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fruitdask.classifier import nonfruit
from fruitdask.errors import ModelError
from fruitdask.features import frames

#: The answer's ``status`` values.
RECOGNISED, UNCERTAIN, UNKNOWN = "recognised", "uncertain", "unknown"
#: Lowest ``sure_probability``: below it the best label is less likely than all others together.
MIN_SURE = 0.5
#: Held-out accuracy wanted among the photos answered ``recognised``.
TARGET_ACCURACY = 0.95


def standardized(bundle, pca: np.ndarray) -> np.ndarray:
    """PCA features in the classifier's standardized space (its ``StandardScaler``)."""
    c = bundle.classifier
    return (np.asarray(pca, dtype=np.float64) - c.mean) / c.scale


@dataclass
class OpenSet:
    """The calibrated thresholds, the class centroids, and the measured error rates."""

    centroids: np.ndarray  # (n_classes, k), standardized PCA space, in the classifier's class order
    max_distance: float
    sure_probability: float
    rates: dict = field(default_factory=dict)

    def distance(self, z: np.ndarray) -> np.ndarray:
        """RMS distance of each standardized row of ``z (n, k)`` to its nearest centroid."""
        z = np.atleast_2d(z)
        d2 = ((z[:, None, :] - self.centroids[None, :, :]) ** 2).mean(axis=2)
        return np.sqrt(d2.min(axis=1))

    def status(self, best_probability: float, distance: float) -> str:
        if distance > self.max_distance:
            return UNKNOWN
        return RECOGNISED if best_probability >= self.sure_probability else UNCERTAIN

    def document(self) -> dict:
        """The JSON form stored in ``bundle.json`` (centroids rounded to 6 significant digits)."""
        return {"max_distance": self.max_distance, "sure_probability": self.sure_probability, "rates": self.rates,
                "centroids": [[float(f"{v:.6g}") for v in row] for row in self.centroids]}

    @classmethod
    def from_document(cls, doc: dict) -> OpenSet:
        return cls(np.asarray(doc["centroids"], dtype=np.float64), float(doc["max_distance"]),
                   float(doc["sure_probability"]), dict(doc.get("rates", {})))

    def summary(self) -> dict:
        """What ``/v1/model`` and ``train`` say: thresholds and error rates, no centroids."""
        return {"max_distance": self.max_distance, "sure_probability": self.sure_probability, **self.rates}


def centroids(z: np.ndarray, y: np.ndarray, classes: list[str]) -> np.ndarray:
    """The mean standardized feature vector of each class, in ``classes`` order."""
    return np.stack([z[y == c].mean(axis=0) for c in classes])


def choose_max_distance(fruit: np.ndarray, other: np.ndarray) -> float:
    """The distance threshold with the fewest errors (fruit rejected + non-fruit accepted,
    each as a rate), ties to fewer fruit rejected; midway between two observed distances."""
    points = np.unique(np.concatenate([fruit, other]))
    candidates = np.concatenate([(points[:-1] + points[1:]) / 2, [points[-1] * 1.05]])
    best, best_key = float(candidates[-1]), (np.inf, np.inf)
    for t in candidates:
        rejected, accepted = float(np.mean(fruit > t)), float(np.mean(other <= t)) if len(other) else 0.0
        key = (rejected + accepted, rejected)
        if key < best_key:
            best, best_key = float(t), key
    return best


def choose_sure_probability(best_p: np.ndarray, correct: np.ndarray) -> float:
    """The lowest probability (from :data:`MIN_SURE`, by 0.05) above which the held-out
    answers are at least :data:`TARGET_ACCURACY` right; 0.95 when none is."""
    for t in np.arange(MIN_SURE, 0.951, 0.05):
        kept = best_p >= t
        if kept.any() and correct[kept].mean() >= TARGET_ACCURACY:
            return round(float(t), 2)
    return 0.95


def split_halves(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two index sets that hold alternate photos of every label (calibration, evaluation)."""
    calib, evaluate = [], []
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        calib += list(idx[0::2])
        evaluate += list(idx[1::2])
    return np.asarray(sorted(calib), dtype=int), np.asarray(sorted(evaluate), dtype=int)


@dataclass(frozen=True)
class Scored:
    """Held-out or generated pictures, scored: best probability, its label, the distance."""

    best_p: np.ndarray
    best_label: np.ndarray
    distance: np.ndarray


def score(bundle, cents: np.ndarray, pca: np.ndarray, proba: np.ndarray) -> Scored:
    probe = OpenSet(cents, np.inf, MIN_SURE)
    labels = np.asarray(bundle.labels)
    return Scored(proba.max(axis=1), labels[proba.argmax(axis=1)], probe.distance(standardized(bundle, pca)))


def calibrate(bundle, train_pca: np.ndarray, train_labels: np.ndarray, fruit: Scored, fruit_labels: np.ndarray,
              other_calib: Scored, other_eval: Scored, other_kinds: list[str]) -> OpenSet:
    """Thresholds from the calibration split, error rates from the evaluation split.

    ``fruit`` are the held-out fruit photos (split in two halves here), ``other_calib`` and
    ``other_eval`` two non-fruit sets generated with different seeds, ``other_kinds`` the
    kind of each picture of ``other_eval``.
    """
    cents = centroids(standardized(bundle, train_pca), train_labels, bundle.labels)
    cal, ev = split_halves(fruit_labels)
    max_distance = choose_max_distance(fruit.distance[cal], other_calib.distance)
    accepted = fruit.distance[cal] <= max_distance
    correct = fruit.best_label[cal] == fruit_labels[cal]
    sure = choose_sure_probability(fruit.best_p[cal][accepted], correct[accepted]) if accepted.any() else MIN_SURE
    kinds = np.asarray(other_kinds)
    other_ok = other_eval.distance <= max_distance
    rates = {
        "fruit_rejected": round(float(np.mean(fruit.distance[ev] > max_distance)), 4) if len(ev) else None,
        "nonfruit_accepted": round(float(np.mean(other_ok)), 4),
        "n_fruit_calibration": len(cal), "n_fruit_evaluation": len(ev),
        "n_nonfruit_calibration": len(other_calib.distance), "n_nonfruit_evaluation": len(other_eval.distance),
        "nonfruit_accepted_by_kind": {k: round(float(np.mean(other_ok[kinds == k])), 4) for k in sorted(set(other_kinds))},
        "fruit_uncertain": round(float(np.mean((fruit.distance[ev] <= max_distance) & (fruit.best_p[ev] < sure))), 4)
        if len(ev) else None,
        "evaluated_on": "held-out fruit photos and non-fruit pictures not used to choose the thresholds",
    }
    return OpenSet(cents, round(max_distance, 6), sure, rates)


#: Generated non-fruit pictures per kind, in each of the two sets.
NONFRUIT_PER_KIND = 10


def nonfruit_features(featurizer, seed: int) -> tuple[np.ndarray, list[str]]:
    """Raw VGG16 features of a generated non-fruit set, through the photos' decode path."""
    pics = nonfruit.pictures(NONFRUIT_PER_KIND, seed=seed)
    df = pd.DataFrame({"path": [f"nonfruit/{kind}-{i:03d}.png" for i, (kind, _) in enumerate(pics)],
                       "label": [kind for kind, _ in pics]})
    good, errors = frames.split_rows(frames.featurize_frame(df, featurizer.weights, featurizer.settings,
                                                           contents=[data for _, data in pics]))
    if len(errors):
        raise ModelError(f"{len(errors)} generated non-fruit pictures failed to featurize: {errors['reason'].iloc[0]}")
    return frames.matrix(good["features"]), list(good["label"].astype(str))


def calibrate_bundle(bundle, featurizer, train_pca: np.ndarray, train_labels: np.ndarray,
                     held_features: np.ndarray, held_labels: np.ndarray) -> OpenSet:
    """:func:`calibrate` on a trained bundle: held-out fruit features plus two generated
    non-fruit sets (seeds 1 and 2), all featurized with ``featurizer`` (the bundle's settings)."""
    spec = featurizer.spec

    def scored(features: np.ndarray) -> Scored:
        return score(bundle, cents, bundle.reduction.transform(features), bundle.predict_proba(features, spec))

    cents = centroids(standardized(bundle, train_pca), train_labels, bundle.labels)
    fruit = scored(held_features)
    (calib_x, _), (eval_x, eval_kinds) = nonfruit_features(featurizer, 1), nonfruit_features(featurizer, 2)
    return calibrate(bundle, train_pca, train_labels, fruit, held_labels, scored(calib_x), scored(eval_x), eval_kinds)
