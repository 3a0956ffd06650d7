"""Is it a fruit this model knows? The ``recognised`` / ``uncertain`` / ``unknown`` answer.

A softmax always names *some* label, confidently even for noise: a linear model
extrapolates. So the answer is decided by three calibrated numbers:

- **residual**: the part of the photo's standardized VGG16 features that the run's PCA does
  not explain (root-mean-square reconstruction error). The PCA was fitted on fruit photos,
  so a picture unlike them leaves more outside its components. Some fruits vary more than
  others (a strawberry more than an orange), so the residual is divided by the typical
  residual of held-out photos of the predicted label (``residual_scale``). Above
  ``max_residual``: ``unknown``.
- **distance**: how far the PCA features (standardized as the classifier sees them) lie
  from the nearest class centroid of the training set (root-mean-square over the
  components). Above ``max_distance``: ``unknown``, not a fruit this model has seen.
- **probability** of the best label: below ``sure_probability`` the answer is ``uncertain``.

:func:`calibrate` chooses the two ``unknown`` thresholds on a *calibration* split (half the
held-out fruit photos plus a generated non-fruit set, :mod:`fruitdask.classifier.nonfruit`):
the pair that accepts the fewest non-fruit pictures while rejecting at most
:data:`FRUIT_REJECTED_TARGET` of the fruit photos. It then measures both error rates on the
*other* half and on non-fruit pictures drawn with another seed, which the choice never saw:
fruit rejected as unknown, non-fruit accepted as a fruit.
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
#: Share of the calibration fruit photos the ``unknown`` thresholds may reject: a public app
#: that calls a real fruit "not a fruit" loses its user; the rest of the choice goes to
#: rejecting non-fruit.
FRUIT_REJECTED_TARGET = 0.05


def standardized(bundle, pca: np.ndarray) -> np.ndarray:
    """PCA features in the classifier's standardized space (its ``StandardScaler``)."""
    c = bundle.classifier
    return (np.asarray(pca, dtype=np.float64) - c.mean) / c.scale


def residual(reduction, features: np.ndarray) -> np.ndarray:
    """RMS of the standardized raw features left outside the PCA components, per row."""
    z = (np.asarray(features, dtype=np.float64) - reduction.mean) / reduction.scale - reduction.pca_mean
    projected = (z @ reduction.components.T) @ reduction.components
    return np.sqrt(((z - projected) ** 2).mean(axis=1))


@dataclass
class OpenSet:
    """The calibrated thresholds, the class centroids, and the measured error rates."""

    centroids: np.ndarray  # (n_classes, k), standardized PCA space, in the classifier's class order
    max_distance: float
    sure_probability: float
    max_residual: float = np.inf
    residual_scale: np.ndarray | None = None  # (n_classes,): typical held-out residual per label
    rates: dict = field(default_factory=dict)

    def distance(self, z: np.ndarray) -> np.ndarray:
        """RMS distance of each standardized row of ``z (n, k)`` to its nearest centroid."""
        z = np.atleast_2d(z)
        d2 = ((z[:, None, :] - self.centroids[None, :, :]) ** 2).mean(axis=2)
        return np.sqrt(d2.min(axis=1))

    def relative(self, resid: np.ndarray, best_index: np.ndarray) -> np.ndarray:
        """The residual over the typical residual of the predicted label."""
        if self.residual_scale is None:
            return np.asarray(resid, dtype=np.float64)
        return np.asarray(resid, dtype=np.float64) / self.residual_scale[np.asarray(best_index)]

    def status(self, best_probability: float, distance: float, resid: float = 0.0) -> str:
        """``resid`` is the relative residual (:meth:`relative`)."""
        if distance > self.max_distance or resid > self.max_residual:
            return UNKNOWN
        return RECOGNISED if best_probability >= self.sure_probability else UNCERTAIN

    def document(self) -> dict:
        """The JSON form stored in ``bundle.json`` (centroids rounded to 6 significant digits)."""
        scale = None if self.residual_scale is None else [float(f"{v:.6g}") for v in self.residual_scale]
        return {"max_distance": self.max_distance, "max_residual": self.max_residual,
                "sure_probability": self.sure_probability, "rates": self.rates, "residual_scale": scale,
                "centroids": [[float(f"{v:.6g}") for v in row] for row in self.centroids]}

    @classmethod
    def from_document(cls, doc: dict) -> OpenSet:
        scale = doc.get("residual_scale")
        return cls(np.asarray(doc["centroids"], dtype=np.float64), float(doc["max_distance"]),
                   float(doc["sure_probability"]), float(doc.get("max_residual", np.inf)),
                   None if scale is None else np.asarray(scale, dtype=np.float64), dict(doc.get("rates", {})))

    def summary(self) -> dict:
        """What ``/v1/model`` and ``train`` say: thresholds and error rates, no centroids."""
        return {"max_distance": self.max_distance, "max_residual": self.max_residual,
                "sure_probability": self.sure_probability, **self.rates}


def centroids(z: np.ndarray, y: np.ndarray, classes: list[str]) -> np.ndarray:
    """The mean standardized feature vector of each class, in ``classes`` order."""
    return np.stack([z[y == c].mean(axis=0) for c in classes])


#: Candidate thresholds per score at most (quantiles beyond): keeps the search small on large sets.
MAX_CANDIDATES = 256


def _candidates(fruit: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Thresholds midway between observed values, and one above them all."""
    points = np.unique(np.concatenate([fruit, other]))
    mids = np.concatenate([(points[:-1] + points[1:]) / 2, [points[-1] * 1.05 + 1e-9]])
    if len(mids) > MAX_CANDIDATES:
        mids = np.unique(np.quantile(mids, np.linspace(0, 1, MAX_CANDIDATES)))
    return mids


def choose_thresholds(fruit_d: np.ndarray, fruit_r: np.ndarray, other_d: np.ndarray,
                      other_r: np.ndarray) -> tuple[float, float]:
    """``(max_distance, max_residual)`` that reject at most :data:`FRUIT_REJECTED_TARGET` of
    the fruit photos and, among those, accept the fewest non-fruit pictures; ties go to
    fewer fruit rejected, then to the most lenient pair (the largest thresholds)."""
    td, tr = _candidates(fruit_d, other_d), _candidates(fruit_r, other_r)
    best, best_key = (float(td[-1]), float(tr[-1])), (float(np.inf), float(np.inf), 0.0)
    for i, d in enumerate(td):
        # (residual candidates, pictures): accepted when under both thresholds.
        rejected = 1.0 - ((fruit_d <= d)[None, :] & (fruit_r[None, :] <= tr[:, None])).mean(axis=1)
        accepted = (((other_d <= d)[None, :] & (other_r[None, :] <= tr[:, None])).mean(axis=1)
                    if other_d.size else np.zeros(len(tr)))
        for j in np.flatnonzero(rejected <= FRUIT_REJECTED_TARGET + 1e-12):
            key = (float(accepted[j]), float(rejected[j]), float(-(i + j)))
            if key < best_key:
                best, best_key = (float(d), float(tr[j])), key
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
    """Held-out or generated pictures, scored: best probability, its label, the two distances
    (``residual`` absolute; :meth:`relative_to` divides it by the predicted label's scale)."""

    best_p: np.ndarray
    best_label: np.ndarray
    distance: np.ndarray
    residual: np.ndarray

    def relative_to(self, labels: list[str], scale: np.ndarray) -> Scored:
        index = {lab: i for i, lab in enumerate(labels)}
        divisor = scale[[index[lab] for lab in self.best_label]] if len(self.best_label) else 1.0
        return Scored(self.best_p, self.best_label, self.distance, self.residual / divisor)

    def accepted(self, max_distance: float, max_residual: float) -> np.ndarray:
        return (self.distance <= max_distance) & (self.residual <= max_residual)


def residual_scale(resid: np.ndarray, labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """Per label, the median residual of its held-out photos, floored at the median of all of
    them (a label with few or no photos is not judged on an accidentally small scale)."""
    floor = float(np.median(resid)) if resid.size else 1.0
    return np.array([max(float(np.median(resid[labels == c])) if np.any(labels == c) else floor, floor) for c in classes])


def score(bundle, cents: np.ndarray, features: np.ndarray, proba: np.ndarray) -> Scored:
    """Score raw VGG16 ``features`` whose probabilities are ``proba``."""
    probe = OpenSet(cents, np.inf, MIN_SURE)
    labels = np.asarray(bundle.labels)
    z = standardized(bundle, bundle.reduction.transform(features))
    return Scored(proba.max(axis=1), labels[proba.argmax(axis=1)], probe.distance(z), residual(bundle.reduction, features))


def _rate(mask: np.ndarray) -> float | None:
    return round(float(np.mean(mask)), 4) if mask.size else None


def calibrate(bundle, train_pca: np.ndarray, train_labels: np.ndarray, fruit: Scored, fruit_labels: np.ndarray,
              other_calib: Scored, other_eval: Scored, other_kinds: list[str]) -> OpenSet:
    """Thresholds from the calibration split, error rates from the evaluation split.

    ``fruit`` are the held-out fruit photos (split in two halves here), ``other_calib`` and
    ``other_eval`` two non-fruit sets generated with different seeds, ``other_kinds`` the
    kind of each picture of ``other_eval``.
    """
    cents = centroids(standardized(bundle, train_pca), train_labels, bundle.labels)
    cal, ev = split_halves(fruit_labels)
    scale = residual_scale(fruit.residual[cal], fruit_labels[cal], bundle.labels)
    fruit, other_calib, other_eval = (x.relative_to(bundle.labels, scale) for x in (fruit, other_calib, other_eval))
    max_d, max_r = choose_thresholds(fruit.distance[cal], fruit.residual[cal], other_calib.distance, other_calib.residual)
    accepted = fruit.accepted(max_d, max_r)
    correct = fruit.best_label == fruit_labels
    kept = accepted[cal]
    sure = choose_sure_probability(fruit.best_p[cal][kept], correct[cal][kept]) if kept.any() else MIN_SURE
    kinds = np.asarray(other_kinds)
    other_ok = other_eval.accepted(max_d, max_r)
    rates = {
        "fruit_rejected": _rate(~accepted[ev]),
        "nonfruit_accepted": _rate(other_ok),
        "n_fruit_calibration": len(cal), "n_fruit_evaluation": len(ev),
        "n_nonfruit_calibration": len(other_calib.distance), "n_nonfruit_evaluation": len(other_eval.distance),
        "nonfruit_accepted_by_kind": {k: _rate(other_ok[kinds == k]) for k in sorted(set(other_kinds))},
        "fruit_rejected_by_label": {lab: _rate(~accepted[ev][fruit_labels[ev] == lab]) for lab in sorted(set(fruit_labels[ev]))},
        "fruit_uncertain": _rate(accepted[ev] & (fruit.best_p[ev] < sure)),
        "fruit_recognised_wrong": _rate(accepted[ev] & (fruit.best_p[ev] >= sure) & ~correct[ev]),
        "evaluated_on": "held-out fruit photos and non-fruit pictures not used to choose the thresholds",
    }
    return OpenSet(cents, round(max_d, 6), sure, round(max_r, 6), scale, rates)


#: Generated non-fruit pictures per kind, in each of the two sets.
NONFRUIT_PER_KIND = 10


def nonfruit_features(featurizer, seed: int) -> tuple[np.ndarray, list[str]]:
    """Raw VGG16 features of a generated non-fruit set, through the photos' decode path."""
    pics = nonfruit.pictures(NONFRUIT_PER_KIND, seed=seed)
    df = pd.DataFrame({"path": [f"nonfruit/{kind}-{i:03d}.png" for i, (kind, _) in enumerate(pics)],
                       "label": [kind for kind, _ in pics]})
    good, errors = frames.split_rows(frames.featurize_frame(df, featurizer.weights, featurizer.spec,
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
        return score(bundle, cents, features, bundle.predict_proba(features, spec))

    cents = centroids(standardized(bundle, train_pca), train_labels, bundle.labels)
    fruit = scored(held_features)
    (calib_x, _), (eval_x, eval_kinds) = nonfruit_features(featurizer, 1), nonfruit_features(featurizer, 2)
    return calibrate(bundle, train_pca, train_labels, fruit, held_labels, scored(calib_x), scored(eval_x), eval_kinds)
