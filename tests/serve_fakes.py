"""A small model bundle and a stand-in for the loaded model, for tests of the service that
are not about VGG16: the real applications, limits, probes and drain, with
:func:`fruitdask.features.featurize.decode_image` as the decoder and a fake model.

Run as a script it is ``fruitdask serve`` without TensorFlow: the flags of the command
(its parser, its settings, its two servers), the model replaced by :class:`FakePredictor`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from fruitdask.classifier.bundle import BUNDLE_FORMAT, LinearClassifier
from fruitdask.features import featurize
from fruitdask.reduce import Reduction

LABELS = ["Apple", "Banana", "Cherry"]


def tiny_bundle(path: Path, weights: dict | None = None) -> Path:
    """A bundle of 3 labels on 512 avg-pooled features at 32 px (no training)."""
    d, k = 512, 2
    rng = np.random.default_rng(0)
    reduction = Reduction(mean=np.zeros(d), scale=np.ones(d), pca_mean=np.zeros(d), components=rng.normal(size=(k, d)),
                          explained_variance=np.ones(k), explained_variance_ratio=np.full(k, 0.5), k=k,
                          variance_target=None, n_samples=10, method="test")
    classifier = LinearClassifier(mean=np.zeros(k), scale=np.ones(k), coef=rng.normal(size=(3, k)), intercept=np.zeros(3),
                                  classes=LABELS)
    path.mkdir(parents=True, exist_ok=True)
    (path / "reduction.npz").write_bytes(reduction.to_npz())
    (path / "classifier.npz").write_bytes(classifier.to_npz())
    sha = "ab" * 32
    doc = {"format": BUNDLE_FORMAT, "labels": LABELS,
           "weights": weights or {"kind": "random", "source": "random", "sha256": sha},
           "preprocessing": {"weights_sha256": sha, "image_size": 32, "pooling": "avg", "precision": "float32",
                             "batch_size": 8}}
    (path / "bundle.json").write_text(json.dumps(doc))
    return path


class FakePredictor:
    """What the applications use of :class:`fruitdask.serve.predictor.Predictor`: the real
    decoder at ``image_size``, a model that answers uniform probabilities after ``delay``."""

    load_seconds = 0.0
    version: str | None = None  # a bundle location: no registry version
    promoted_at: float | None = None

    def __init__(self, image_size: int, max_pixels: int, delay: float = 0.0, decode_delay: float = 0.0) -> None:
        self.image_size, self.max_pixels, self.delay, self.decode_delay = image_size, max_pixels, delay, decode_delay
        self.bundle = type("Bundle", (), {"labels": LABELS})()

    def decode(self, data: bytes) -> np.ndarray:
        time.sleep(self.decode_delay)  # a slow decode holds its thread, as a big PNG does
        return featurize.decode_image(data, self.image_size, self.max_pixels)

    open_set = None  # no unknown detector: every answer is recognised or uncertain

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        return np.full((len(images), len(LABELS)), 1 / len(LABELS))

    def predict_scores(self, images: np.ndarray) -> np.ndarray:
        """As :meth:`fruitdask.serve.predictor.Predictor.predict_scores`: the probabilities,
        then the detector's two numbers (NaN: no detector)."""
        proba = self.predict_proba(images)
        return np.column_stack([proba, np.full((len(proba), 2), np.nan)])

    @staticmethod
    def split(scores: np.ndarray) -> tuple[np.ndarray, float, float]:
        return scores[:-2], float(scores[-2]), float(scores[-1])

    def top(self, proba: np.ndarray, k: int) -> list[dict]:
        return [{"label": label, "probability": float(p)} for label, p in zip(LABELS[:k], proba[:k], strict=True)]

    def summary(self) -> dict:
        return {"version": self.version, "image_size": self.image_size, "labels": len(LABELS)}

    def describe(self) -> dict:
        return {"labels": LABELS, "image_size": self.image_size}


def main(argv: list[str]) -> int:
    """``python tests/serve_fakes.py [--model-delay S] [--decode-delay S] SERVE FLAGS``: serve with the fake model."""
    from fruitdask import cli
    from fruitdask.commands import serve
    from fruitdask.logs import setup_logging
    from fruitdask.serve.runner import run_server

    delays = {"--model-delay": 0.0, "--decode-delay": 0.0}
    while argv[:1] and argv[0] in delays:
        delays[argv[0]], argv = float(argv[1]), argv[2:]
    args = cli.build_parser().parse_args(["serve", "--model", "unused", *argv])
    setup_logging(bool(args.quiet), bool(args.debug))
    settings = serve.settings_from_args(args)
    failure = run_server(settings, lambda: FakePredictor(224, settings.max_pixels, delays["--model-delay"], delays["--decode-delay"]),
                         log_level="warning")
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
