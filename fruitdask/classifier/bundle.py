"""The classifier bundle: everything ``predict`` needs to turn a photo into label probabilities.

A bundle is a folder (local or ``s3://``) of plain, portable files, written atomically
through :class:`fruitdask.storage.StagedOutput` (``_SUCCESS`` last)::

    MODEL/
      bundle.json      format, weights reference + sha256, preprocessing, labels, versions
      reduction.npz    the run's standardization + PCA (same file format as the run's)
      classifier.npz   scaler mean/scale, coef, intercept of the linear classifier
      report.json, report.md, confusion.png   written by ``train``

Why JSON + ``.npz`` and not pickle/joblib: loading a pickle runs arbitrary code, so a bundle
fetched from a bucket would be a code-execution risk, and pickles break across
scikit-learn versions. A linear model is fully described by a few arrays, so the
probabilities are recomputed here with numpy (checked against scikit-learn in the tests),
and ``np.load(..., allow_pickle=False)`` reads nothing but numbers.

The VGG16 weights are *referenced* (kind, source, sha256), not copied: they are 58 MB,
shared by every model trained on the same run, and re-derivable (``random`` from its seed,
``imagenet`` from the Keras cache). Loading verifies the sha256, so a bundle never runs on
weights other than the ones its features were made with.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from fruitdask import __version__, storage
from fruitdask.errors import ModelError, WeightsError
from fruitdask.features import frames, model, precision
from fruitdask.features.settings import FeatureSettings, differences
from fruitdask.features.weights_file import WeightsArrays
from fruitdask.reduce import Reduction

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "fruitdask-classifier/1"
BUNDLE_FILE = storage.paths.BUNDLE_JSON


#: What ``WeightsRef.kind`` may be.
WEIGHT_KINDS = ("imagenet", "random", "file")


@dataclass(frozen=True)
class WeightsRef:
    """Where the VGG16 weights of a run came from (``run.json``'s ``weights`` + seed)."""

    kind: str  # imagenet | random | file
    source: str
    sha256: str
    seed: int = 0
    file_sha256: str | None = None  # of the weights file's bytes (kind "file")

    def __post_init__(self) -> None:
        # Read from a stored document: a kind such as "File" would otherwise be taken for a
        # file whose location no check saw (the region guard asked for kind == "file").
        if self.kind not in WEIGHT_KINDS:
            raise ModelError(f"weights kind {self.kind!r} is not one of {', '.join(WEIGHT_KINDS)}: "
                             "the bundle or run.json was edited or is corrupt; train the model again")

    @property
    def spec(self) -> str:
        """The ``--weights`` value that reloads them."""
        return {"random": "random", "imagenet": "imagenet"}.get(self.kind, self.source)


def load_verified_weights(
    ref: WeightsRef, image_size: int, storage_options: Mapping[str, Any] | None, override: str | None = None,
    guard: Callable[[list[str]], None] | None = None,
) -> list[np.ndarray]:
    """Load the referenced weights (or ``override``) and refuse them unless the sha256 matches.

    The location comes from a stored document, so it is untrusted: only a local file or
    ``s3://`` (:func:`fruitdask.storage.check_protocols`), through ``guard`` (the
    region guard of the command) when given, and the referenced file (any format) is hashed
    before it is parsed. An ``override`` is the user's own ``--weights``: trusted like
    ``run --weights``, it is checked by the weights' sha256 only.
    """
    spec = override or ref.spec
    storage.check_protocols([spec], "weights location", "pass --weights PATH_OR_URI of a local file or an s3:// object")
    if guard is not None:
        guard([spec])
    weights, info = model.load_weights(spec, image_size=image_size, seed=ref.seed, storage_options=dict(storage_options or {}),
                                       keras_sha256=ref.file_sha256, referenced=override is None)
    if info.sha256 != ref.sha256:
        raise WeightsError(
            f"weights {spec!r} have sha256 {info.sha256[:16]}…, but the features were made with "
            f"{ref.sha256[:16]}… ({ref.kind}: {ref.source}): pass --weights PATH_OR_URI of the very file the run used"
        )
    return weights


class Featurizer:
    """Photos to raw VGG16 features, with the very functions the pipeline's workers run
    (:func:`fruitdask.features.frames.featurize_frame`: read, decode, resize, preprocess, pool)."""

    def __init__(self, weights: list[np.ndarray], spec: FeatureSettings) -> None:
        self.weights = WeightsArrays.of(weights, spec.weights_key)
        self.spec = spec  # with the storage options the photos are read with

    def featurize(self, paths: Sequence[str], labels: Sequence[str | None] | None = None) -> pd.DataFrame:
        """``path, label, features, error_stage, error_reason`` rows, one per path (errors kept)."""
        df = pd.DataFrame({"path": list(paths), "label": list(labels) if labels is not None else [None] * len(paths)})
        return frames.featurize_frame(df, self.weights, self.spec)


@dataclass
class LinearClassifier:
    """A standardized linear classifier (scikit-learn ``StandardScaler`` + ``LogisticRegression``)
    reduced to its arrays; :meth:`predict_proba` equals scikit-learn's."""

    mean: np.ndarray  # (k,)
    scale: np.ndarray  # (k,)
    coef: np.ndarray  # (n_classes, k), or (1, k) for two classes
    intercept: np.ndarray  # (n_classes,) or (1,)
    classes: list[str]

    @classmethod
    def from_sklearn(cls, pipeline) -> LinearClassifier:
        """From a fitted ``Pipeline([StandardScaler, LogisticRegression])``."""
        scaler, lr = pipeline[0], pipeline[-1]
        return cls(
            mean=np.asarray(scaler.mean_, dtype=np.float64), scale=np.asarray(scaler.scale_, dtype=np.float64),
            coef=np.asarray(lr.coef_, dtype=np.float64), intercept=np.asarray(lr.intercept_, dtype=np.float64),
            classes=[str(c) for c in lr.classes_],
        )

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``(n, n_classes)`` probabilities, columns in :attr:`classes` order."""
        z = ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale) @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:  # binary: scikit-learn keeps one row for the second class
            p = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.column_stack([1.0 - p, p])
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def to_npz(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(buf, mean=self.mean, scale=self.scale, coef=self.coef, intercept=self.intercept,
                            classes=np.array(self.classes, dtype=np.str_))
        return buf.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> LinearClassifier:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(mean=z["mean"], scale=z["scale"], coef=z["coef"], intercept=z["intercept"],
                       classes=[str(c) for c in z["classes"]])


@dataclass
class ModelBundle:
    """Weights reference, preprocessing, reduction and classifier: one trained model."""

    spec: FeatureSettings  # what the training features were made with, and their batch size
    weights: WeightsRef
    reduction: Reduction
    classifier: LinearClassifier
    info: dict = field(default_factory=dict)  # training provenance, metrics, versions

    @property
    def labels(self) -> list[str]:
        return self.classifier.classes

    def predict_proba(self, features: np.ndarray, spec: FeatureSettings) -> np.ndarray:
        """Probabilities for raw VGG16 ``features (n, d)`` made under ``spec``.

        Raises :class:`ModelError` when ``spec`` is not the model's: features of another
        image size, pooling or weights live in another space even when their length matches.
        """
        diffs = differences(self.spec, spec)
        if diffs:
            raise ModelError(
                "features do not match the model: " + "; ".join(d.reason("model") for d in diffs)
                + ": featurize the photos with the model's settings (fruitdask predict does), or train a model on a run made with these"
            )
        features = np.asarray(features)
        d = self.reduction.mean.shape[0]
        if features.ndim != 2 or features.shape[1] != d:
            raise ModelError(f"features of shape {features.shape} given, the model expects (n, {d})")
        return self.classifier.predict_proba(self.reduction.transform(features))

    def top_k(self, proba: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The ``k`` most probable labels of each row, best first."""
        order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
        return [[(self.labels[j], float(row[j])) for j in idx] for row, idx in zip(proba, order, strict=True)]

    def featurizer(self, storage_options: Mapping[str, Any] | None = None, weights_override: str | None = None,
                   guard: Callable[[list[str]], None] | None = None) -> Featurizer:
        """Load the (verified) weights and return a :class:`Featurizer` with the training settings."""
        weights = load_verified_weights(self.weights, self.spec.image_size, storage_options, weights_override, guard)
        if self.spec.precision == "bfloat16" and precision.detect_and_resolve("auto").precision != "bfloat16":
            logger.warning("the model was trained on bfloat16 features and this machine has no native bf16 "
                           "(avx512_bf16/amx): featurizing in emulated bfloat16, slower than float32")
        return Featurizer(weights, self.spec.with_storage(storage_options))

    # --- files ---------------------------------------------------------------------------

    def document(self) -> dict:
        return {
            "format": BUNDLE_FORMAT,
            "fruitdask_version": __version__,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "labels": self.labels,
            "weights": asdict(self.weights),
            "preprocessing": {
                **self.spec.to_dict(),
                "decode": "PIL, EXIF-transposed, RGB (alpha on white), bicubic resize to image_size",
                "preprocess": "keras.applications.vgg16.preprocess_input",
            },
            "reduction": self.reduction.summary(),
            "classifier": {"type": "StandardScaler + LogisticRegression (multinomial)", "n_features": int(self.classifier.coef.shape[1])},
            "files": {"reduction": "reduction.npz", "classifier": "classifier.npz"},
            **self.info,
        }

    def save(self, url: str, storage_options: Mapping[str, Any] | None = None, *, overwrite: bool = False,
             extra_files: Mapping[str, bytes] | None = None) -> str:
        """Write the bundle (and ``extra_files`` such as the report) to ``url``, atomically."""
        target = storage.StagedOutput.open(url, storage_options, overwrite)
        with storage.committed(target):
            target.write_bytes("reduction.npz", self.reduction.to_npz())
            target.write_bytes("classifier.npz", self.classifier.to_npz())
            for name, data in (extra_files or {}).items():
                target.write_bytes(name, data)
            target.write_json(BUNDLE_FILE, self.document())
        return url

    @classmethod
    def load(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> ModelBundle:
        """Read a bundle written by :meth:`save`; say what is wrong when it is not one."""
        try:
            doc = json.loads(storage.read_bytes(storage.join(url, BUNDLE_FILE), storage_options))
        except FileNotFoundError as e:
            raise ModelError(f"{url!r} is not a fruitdask model (no {BUNDLE_FILE}): pass the --model-out folder of `fruitdask train`") from e
        except (PermissionError, OSError) as e:
            raise storage.translate(e, url) from e
        except ValueError as e:
            raise ModelError(f"{storage.join(url, BUNDLE_FILE)!r} is not valid JSON ({e}): train the model again") from e
        if doc.get("format") != BUNDLE_FORMAT:
            raise ModelError(f"{url!r} has bundle format {doc.get('format')!r}, this fruitdask reads {BUNDLE_FORMAT!r}: "
                             "train the model again with this version")
        try:
            reduction = Reduction.from_npz(storage.read_bytes(storage.join(url, "reduction.npz"), storage_options))
            classifier = LinearClassifier.from_npz(storage.read_bytes(storage.join(url, "classifier.npz"), storage_options))
        except (OSError, KeyError, ValueError) as e:
            raise ModelError(f"model {url!r} is incomplete or corrupt ({type(e).__name__}: {e}): train it again") from e
        # Bundles written before --precision (or a runtime) existed were float32 (tensorflow).
        spec = FeatureSettings.from_dict(doc["preprocessing"])
        known = {"format", "fruitdask_version", "created_at", "labels", "weights", "preprocessing", "reduction", "classifier", "files"}
        try:
            weights = WeightsRef(**doc["weights"])
        except TypeError as e:
            raise ModelError(f"{storage.join(url, BUNDLE_FILE)!r} has a malformed weights entry ({e}): train the model again") from e
        return cls(spec=spec, weights=weights, reduction=reduction, classifier=classifier, info={k: v for k, v in doc.items() if k not in known})
