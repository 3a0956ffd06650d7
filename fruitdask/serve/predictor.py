"""Photo bytes to label probabilities, with the very functions ``fruitdask predict`` runs.

``predict`` reads a file and calls :func:`fruitdask.features.frames.featurize_frame`, which runs
:func:`fruitdask.features.featurize.decode_image` on each file's bytes and
:func:`fruitdask.features.featurize.featurize_arrays` on the stacked images with the inference
runtime from :func:`fruitdask.features.model.cached_runtime`, then :meth:`ModelBundle.predict_proba` and
:meth:`ModelBundle.top_k`. The server calls the same functions, split in two so that
decoding runs per request and the VGG16 call once per micro-batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fruitdask.classifier.bundle import Featurizer, ModelBundle
from fruitdask.classifier.openset import OpenSet, residual, standardized
from fruitdask.features import featurize, model
from fruitdask.features.runtimes import InferenceRuntime
from fruitdask.features.settings import differences

logger = logging.getLogger(__name__)


class Predictor:
    """A loaded bundle, its verified weights and its prepared VGG16 runtime."""

    def __init__(self, bundle: ModelBundle, featurizer: Featurizer, runtime: InferenceRuntime, *, max_pixels: int,
                 source: str = "", load_seconds: float = 0.0, version: str | None = None,
                 promoted_at: float | None = None) -> None:
        self.bundle = bundle
        self.featurizer = featurizer
        self.runtime = runtime
        self.max_pixels = max_pixels
        self.source = source
        self.load_seconds = load_seconds
        #: The registry's version string of a champion; ``None`` for a bundle location.
        self.version = version
        #: When that version became champion (Unix seconds), from ``champion.json``.
        self.promoted_at = promoted_at
        # The calibrated unknown detector; bundles trained before it have none.
        doc = bundle.info.get("open_set")
        self.open_set = OpenSet.from_document(doc) if doc else None

    @classmethod
    def load(cls, bundle: ModelBundle, source: str, storage_options: Mapping[str, Any] | None, *,
             weights_override: str | None = None, max_pixels: int = featurize.MAX_PIXELS,
             threads: int | None = None, warm_batches: tuple[int, ...] = (1,),
             guard: Callable[[list[str]], None] | None = None, reuse: Predictor | None = None,
             version: str | None = None, promoted_at: float | None = None) -> Predictor:
        """Load and verify the weights (sha256), build VGG16 and run it once per ``warm_batches``
        size, so that the first request does not pay for TensorFlow's graph tracing. ``guard``
        (the region guard) sees the weights' location first, whatever the bundle's kind.

        With ``reuse`` (the model serving now) of the same feature settings and weights, its
        verified weights and VGG16 graph are taken as they are: only the PCA and the
        classifier are new, checked on one feature vector instead of a VGG16 warm-up."""
        start = time.perf_counter()
        if reuse is not None and reuse.shares_features(bundle):
            self = cls(bundle, reuse.featurizer, reuse.runtime, max_pixels=max_pixels, source=source, version=version,
                       promoted_at=promoted_at)
            self.bundle.predict_proba(np.zeros((1, bundle.reduction.mean.shape[0])), bundle.spec)
            how = "VGG16 kept"
        else:
            featurizer = bundle.featurizer(storage_options, weights_override, guard=guard)
            # The bundle's precision: served features must be those the classifier was trained on.
            runtime = model.cached_runtime(featurizer.weights, featurizer.spec, threads)
            self = cls(bundle, featurizer, runtime, max_pixels=max_pixels, source=source, version=version,
                       promoted_at=promoted_at)
            size = featurizer.spec.image_size
            blank = np.full((max(warm_batches), size, size, 3), 255, dtype=np.uint8)
            for n in warm_batches:
                self.predict_proba(blank[:n])
            how = "VGG16 built"
        self.load_seconds = time.perf_counter() - start
        logger.info("model %s loaded in %.1f s (%d labels, %d px, %s)", source, self.load_seconds, len(bundle.labels),
                    self.image_size, how)
        return self

    def shares_features(self, bundle: ModelBundle) -> bool:
        """Whether ``bundle`` takes the very features this model computes: the same weights
        (reference and sha256) and every other setting that decides the features (not the
        batch size: :func:`fruitdask.features.settings.differences`)."""
        return not differences(self.bundle.spec, bundle.spec) and self.bundle.weights == bundle.weights

    @property
    def image_size(self) -> int:
        return self.featurizer.spec.image_size

    def decode(self, data: bytes) -> np.ndarray:
        """One photo to a ``(size, size, 3)`` uint8 array; raises :class:`featurize.DecodeError`."""
        return featurize.decode_image(data, self.image_size, self.max_pixels)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """``(n, n_labels)`` probabilities of decoded ``(n, size, size, 3)`` images, one VGG16 call."""
        spec = self.featurizer.spec
        features = featurize.featurize_arrays(self.runtime, images, spec.pooling, max(1, len(images)))
        return self.bundle.predict_proba(features, spec)

    def predict_scores(self, images: np.ndarray) -> np.ndarray:
        """``(n, n_labels + 2)``: the probabilities, then the distance to the nearest class
        centroid and the relative PCA residual (:mod:`fruitdask.classifier.openset`; NaN
        without a detector). One VGG16 call; :meth:`split` takes a row apart."""
        spec = self.featurizer.spec
        features = featurize.featurize_arrays(self.runtime, images, spec.pooling, max(1, len(images)))
        proba = self.bundle.predict_proba(features, spec)
        if self.open_set is None:
            return np.column_stack([proba, np.full((len(proba), 2), np.nan)])
        z = standardized(self.bundle, self.bundle.reduction.transform(features))
        resid = self.open_set.relative(residual(self.bundle.reduction, features), proba.argmax(axis=1))
        return np.column_stack([proba, self.open_set.distance(z), resid])

    @staticmethod
    def split(scores: np.ndarray) -> tuple[np.ndarray, float, float]:
        """A row of :meth:`predict_scores`: ``(probabilities, distance, residual)``."""
        return scores[:-2], float(scores[-2]), float(scores[-1])

    def top(self, proba: np.ndarray, k: int) -> list[dict]:
        """The ``k`` best labels of one probability row, as ``predict --json`` writes them."""
        (best,) = self.bundle.top_k(proba[None, :], k)
        return [{"label": label, "probability": round(p, 6)} for label, p in best]

    def summary(self) -> dict:
        """What a prediction answer says about the model that made it (never where it is stored)."""
        spec = self.featurizer.spec
        return {"version": self.version, "weights_sha256": spec.weights_key, "image_size": spec.image_size,
                "labels": len(self.bundle.labels)}

    def describe(self) -> dict:
        """``GET /v1/model``: labels, weights, preprocessing and the training metrics. Public:
        the bundle's and the weights' locations (bucket names, paths) are left out."""
        b, spec = self.bundle, self.featurizer.spec
        info = b.info
        return {
            "version": self.version,
            "labels": b.labels,
            "weights": {"kind": b.weights.kind, "sha256": b.weights.sha256},
            "image_size": spec.image_size,
            "pooling": spec.pooling,
            "precision": spec.precision,
            "components": int(b.reduction.k),
            "training": {
                "train_accuracy": info.get("training", {}).get("train_accuracy"),
                "n_train": info.get("training", {}).get("n_train"),
                "run_id": info.get("training", {}).get("run_id"),
            },
            "evaluation": {k: info.get("evaluation", {}).get(k) for k in ("accuracy", "macro_f1", "n")},
            "load_seconds": round(self.load_seconds, 3),
            "unknown_detector": self.open_set.summary() if self.open_set else None,
        }
