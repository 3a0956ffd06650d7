"""Train and evaluate a fruit classifier on the PCA features of a ``run`` output.

The classifier (scikit-learn ``StandardScaler`` + multinomial ``LogisticRegression``) is fitted
on the run's ``pca`` column. The held-out set is featurized with *the run's* weights (sha256
verified), image size, pooling, standardization and PCA: nothing is refitted on test data.
The PCA features of even a large lake fit in memory (a million images x 100 components is
400 MB), so scikit-learn is used; for more, ``dask_ml.linear_model.LogisticRegression`` on
a dask array of the same column is the drop-in replacement.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fruitdask import output, storage
from fruitdask.catalogue import load_catalogue
from fruitdask.classifier import openset
from fruitdask.classifier.bundle import Featurizer, LinearClassifier, ModelBundle, WeightsRef
from fruitdask.errors import InputError
from fruitdask.features import frames
from fruitdask.features.settings import FeatureSettings
from fruitdask.output import CommittedRun
from fruitdask.reduce import Reduction
from fruitdask.runinfo import versions
from fruitdask.schema import SKIPPED_COLUMNS

logger = logging.getLogger(__name__)

#: Images featurized per call when featurizing a held-out tree in this process.
CHUNK = 64


@dataclass
class RunOutput:
    """A committed ``fruitdask run`` output: its features, reduction and settings."""

    run: CommittedRun
    reduction: Reduction
    table: pd.DataFrame  # path, label, features, pca

    @property
    def url(self) -> str:
        return self.run.url

    @property
    def doc(self) -> dict:
        return self.run.record

    @property
    def spec(self) -> FeatureSettings:
        return self.run.feature_settings()

    @property
    def weights(self) -> WeightsRef:
        w = self.doc["weights"]
        return WeightsRef(kind=w["kind"], source=w["source"], sha256=w["sha256"], seed=int(self.doc["config"]["seed"]),
                          file_sha256=w.get("file_sha256"))


def load_run(url: str, storage_options: Mapping[str, Any] | None = None, columns: tuple[str, ...] = ("path", "label", "pca")) -> RunOutput:
    """Read a committed run output; refuse an unfinished or foreign folder with the fix."""
    run = output.read_run(url, storage_options)
    reduction = run.reduction()
    table = run.features(columns)
    if len(table) == 0:
        raise InputError(f"run output {url!r} has no feature rows: run the pipeline on an input with images")
    return RunOutput(run, reduction, table)


def featurize_tree(featurizer: Featurizer, url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Featurize every ``<Label>/<image>`` under ``url`` in this process.

    Returns the good rows (``path, label, features``) and the skipped ones
    (``path, label, stage, reason``), as the pipeline does.
    """
    listing = storage.list_images(url, storage_options)
    parts = []
    for start in range(0, len(listing), CHUNK):
        chunk = listing.iloc[start : start + CHUNK]
        parts.append(featurizer.featurize(list(chunk["path"]), list(chunk["label"])))
        logger.info("featurized %d/%d held-out images", min(start + CHUNK, len(listing)), len(listing))
    good, errors = frames.split_rows(pd.concat(parts, ignore_index=True))
    errors = errors.reset_index(drop=True)
    for row in errors.itertuples():
        logger.warning("skipped %s: %s", row.path, row.reason)
    return good.reset_index(drop=True), errors


def fit_classifier(X: np.ndarray, y: np.ndarray, *, C: float = 1.0, max_iter: int = 2000):
    """Fit ``StandardScaler`` + multinomial ``LogisticRegression`` (lbfgs) on PCA features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y)) < 2:
        raise InputError(f"the training features hold a single label ({y[0]!r}): a classifier needs two or more")
    # PCA components have very different variances; standardizing them lets one C fit all.
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter)).fit(X, y)


def evaluate(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro F1, a per-class table and the confusion matrix (rows: true label)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = [lab for lab in labels if lab in set(y_true)]
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # Macro F1 over the labels present in the test set: a label with no test images
        # would otherwise count as an F1 of 0.
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "chance": 1.0 / len(labels),
        "per_class": [
            {"label": lab, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for lab, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        ],
        "labels": labels,
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def report_markdown(metrics: dict, title: str) -> str:
    """The evaluation as a Markdown page (summary + per-class table)."""
    lines = [
        f"# {title}", "",
        f"- test images: {metrics['n']}",
        f"- accuracy: {metrics['accuracy']:.3f} (chance {metrics['chance']:.3f})",
        f"- macro F1: {metrics['macro_f1']:.3f}", "",
        "| label | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['label']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |" for r in metrics["per_class"]]
    return "\n".join([*lines, "", "![confusion matrix](confusion.png)", ""])


def confusion_png(metrics: dict, title: str = "Confusion matrix") -> bytes:
    """The confusion matrix (rows: true label, columns: predicted) as PNG bytes."""
    from fruitdask.report.plots import text_as_data

    with text_as_data():
        return _confusion_png(metrics, title)


def _confusion_png(metrics: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(metrics["confusion"])
    labels = metrics["labels"]
    size = max(5.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    threshold = cm.max() / 2 if cm.size else 0
    for i, j in np.ndindex(cm.shape):
        if cm[i, j]:
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > threshold else "black", fontsize=8)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"{title}: accuracy {metrics['accuracy']:.3f}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def train(
    features_url: str,
    *,
    test_input: str | None = None,
    test_features: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    weights_override: str | None = None,
    C: float = 1.0,
    max_iter: int = 2000,
    guard: Callable[[list[str]], None] | None = None,
) -> tuple[ModelBundle, dict, dict[str, bytes]]:
    """Fit on a run's PCA features, evaluate on a held-out set, return the bundle and report.

    Parameters
    ----------
    features_url
        A ``fruitdask run`` output; its ``pca`` column and labels train the classifier.
    test_input
        A ``<Label>/<image>`` tree, featurized here with the run's weights and settings.
    test_features
        Or: a run output of the held-out images; its raw ``features`` are projected with the
        *training* run's reduction, and it must share the training run's weights, image size
        and pooling.
    weights_override
        Another location of the run's weights file (its sha256 must match ``run.json``).
    guard
        Called with the weights location read from ``run.json`` before it is read (the
        command's region guard).

    Returns
    -------
    (bundle, report, files)
        ``files`` are the report files to store beside the bundle.
    """
    if (test_input is None) == (test_features is None):
        raise InputError("pass exactly one held-out set: --test-input DIR_OR_URI (a Test/ tree) or --test-features RUN_OUTPUT")
    run = load_run(features_url, storage_options)
    X, y = frames.matrix(run.table["pca"]), run.table["label"].astype(str).to_numpy()
    pipe = fit_classifier(X, y, C=C, max_iter=max_iter)
    bundle = ModelBundle(run.spec, run.weights, run.reduction, LinearClassifier.from_sklearn(pipe))
    train_accuracy = float(np.mean(np.asarray(bundle.labels)[bundle.classifier.predict_proba(X).argmax(axis=1)] == y))
    logger.info("fitted on %d images, %d labels, K=%d (training accuracy %.3f)", len(y), len(bundle.labels), X.shape[1], train_accuracy)

    held_out, errors, spec, source = _held_out_set(bundle, test_input, test_features, storage_options, weights_override, guard)
    y_test = held_out["label"].astype(str).to_numpy()
    proba = bundle.predict_proba(frames.matrix(held_out["features"]), spec)
    metrics = evaluate(y_test, np.asarray(bundle.labels)[proba.argmax(axis=1)], bundle.labels)
    open_set = _open_set(bundle, X, y, held_out, storage_options, weights_override, guard)
    fit = {"n_train": len(y), "train_accuracy": train_accuracy, "C": C, "max_iter": max_iter,
           "k": int(X.shape[1]), "n_iter": int(np.max(pipe[-1].n_iter_))}
    report = {**_report(features_url, source, run, fit, errors, metrics), "open_set": open_set.summary()}
    bundle.info = {
        "training": {"run": features_url, "run_id": run.doc.get("run_id"), "n_train": len(y), "train_accuracy": train_accuracy,
                     "C": C, "max_iter": max_iter},
        "evaluation": {"held_out": source, "n": metrics["n"], "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                       "skipped": len(errors)},
        "open_set": open_set.document(),
        "versions": versions(),
    }
    return bundle, report, _report_files(run, report, metrics)


def warn_uncatalogued(labels: list[str]) -> list[str]:
    """Warn about (and return) the labels the fruit catalogue has no entry for."""
    missing = load_catalogue().missing(labels)
    if missing:
        logger.warning("%d labels have no entry in the fruit catalogue (the service answers with their name only): %s; "
                       "add them to fruitdask/catalogue/fruits.json", len(missing), ", ".join(missing))
    return missing


def _open_set(bundle: ModelBundle, X: np.ndarray, y: np.ndarray, held_out: pd.DataFrame,
              storage_options: Mapping[str, Any] | None, weights_override: str | None,
              guard: Callable[[list[str]], None] | None) -> openset.OpenSet:
    """The ``unknown`` detector calibrated (:mod:`fruitdask.classifier.openset`), and a warning
    for every label the fruit catalogue lacks (the app will answer with its name only)."""
    warn_uncatalogued(bundle.labels)
    featurizer = bundle.featurizer(storage_options, weights_override, guard)
    open_set = openset.calibrate_bundle(bundle, featurizer, X, y, frames.matrix(held_out["features"]),
                                        held_out["label"].astype(str).to_numpy())
    r = open_set.rates
    logger.info("unknown detector: max distance %.3f, max residual %.3f, sure from p >= %.2f; fruit rejected %s, "
                "non-fruit accepted %s (on %d held-out fruit photos and %d non-fruit pictures the thresholds never saw)",
                open_set.max_distance, open_set.max_residual, open_set.sure_probability, r["fruit_rejected"],
                r["nonfruit_accepted"], r["n_fruit_evaluation"], r["n_nonfruit_evaluation"])
    return open_set


def _report_files(run: RunOutput, report: dict, metrics: dict) -> dict[str, bytes]:
    title = f"Held-out evaluation ({run.weights.kind} weights, {run.spec.image_size}px, {run.spec.pooling} pooling)"
    return {
        "report.json": json.dumps(report, indent=2, default=str).encode(),
        "report.md": report_markdown(metrics, title).encode(),
        "confusion.png": confusion_png(metrics),
    }


def _held_out_set(bundle: ModelBundle, test_input: str | None, test_features: str | None,
                  storage_options: Mapping[str, Any] | None, weights_override: str | None,
                  guard: Callable[[list[str]], None] | None) -> tuple[pd.DataFrame, pd.DataFrame, FeatureSettings, str]:
    """The held-out rows (``path, label, features``), the skipped ones, the spec their
    features were made with, and where they came from; refused when unusable."""
    if test_input is not None:
        featurizer = bundle.featurizer(storage_options, weights_override, guard)
        held_out, errors = featurize_tree(featurizer, test_input, storage_options)
        spec, source = featurizer.spec, test_input
    elif test_features is not None:
        test_run = load_run(test_features, storage_options, columns=("path", "label", "features"))
        held_out, errors, spec, source = test_run.table, pd.DataFrame(columns=SKIPPED_COLUMNS), test_run.spec, test_features
    else:
        raise InputError("no held-out images: pass --test-input DIR or --test-features RUN_OUTPUT")
    if len(held_out) == 0:
        raise InputError(f"no usable held-out image in {source!r}: {len(errors)} skipped, see the warnings")
    unknown = sorted(set(held_out["label"].astype(str)) - set(bundle.labels))
    if unknown:
        raise InputError(
            f"held-out labels {unknown} are not among the {len(bundle.labels)} training labels: "
            "evaluate on a Test/ tree with the training labels, or train on a run that has them"
        )
    return held_out, errors, spec, source


def _report(features_url: str, source: str, run: RunOutput, fit: dict, errors: pd.DataFrame, metrics: dict) -> dict:
    """``report.json``: the fit and the held-out evaluation."""
    return {
        "features": features_url,
        "held_out": source,
        "n_train": fit["n_train"],
        "train_accuracy": fit["train_accuracy"],
        "k": fit["k"],
        "classifier": {"type": "StandardScaler + LogisticRegression", "C": fit["C"], "max_iter": fit["max_iter"],
                       "n_iter": fit["n_iter"]},
        "weights": {"kind": run.weights.kind, "source": run.weights.source, "sha256": run.weights.sha256},
        "skipped": errors.astype(object).to_dict(orient="records"),
        **metrics,
    }
