"""Train a candidate classifier on one version of the features table, held-out rows by hash.

``train --models`` and ``daily`` train here, not on a Test/ tree: the table at version V
(Delta time travel) is split by a stable hash of ``image_key``: an image is held out when
``int(sha256(image_key)[:16], 16) % 100 < HOLDOUT_PERCENT``. The rule depends on the key
alone, so the same image stays held out in every later training as the lake grows, and no
image moves from test to train. The held-out rows' raw ``features`` are in the table, so
nothing is featurized again except the generated non-fruit pictures of the ``unknown``
detector (:mod:`fruitdask.classifier.openset`), with the table's verified weights.

The weights and feature settings come from the table's own commit description at V (what
``run`` wrote with its commit), so a candidate can be trained even when ``run.json`` was
never written (a run killed after its commit); ``run.json`` completes them when it names
the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fruitdask import output, storage
from fruitdask.classifier import classify, openset
from fruitdask.classifier.bundle import LinearClassifier, ModelBundle, WeightsRef
from fruitdask.errors import InputError
from fruitdask.features import frames
from fruitdask.features.settings import FeatureSettings
from fruitdask.lake import table as delta
from fruitdask.lake import update
from fruitdask.reduce import Reduction
from fruitdask.runinfo import versions
from fruitdask.schema import table_columns

logger = logging.getLogger(__name__)

#: Share of the images (by key hash) held out for evaluation, in percent.
HOLDOUT_PERCENT = 20
HOLDOUT_RULE = f"int(sha256(image_key).hexdigest()[:16], 16) % 100 < {HOLDOUT_PERCENT}"
#: The table columns a candidate reads (checked against fruitdask/schema.py when imported).
COLUMNS = table_columns(["image_key", "label", "features", "pca", "pca_fit", "run_id"]).names


def held_out(keys: list[str] | pd.Series, percent: int = HOLDOUT_PERCENT) -> np.ndarray:
    """Boolean mask: which ``image_key`` values are held out (stable across table versions)."""
    return np.array([int(hashlib.sha256(str(k).encode()).hexdigest()[:16], 16) % 100 < percent for k in keys], dtype=bool)


@dataclass
class TableVersion:
    """One version of a features table, read for training: rows, fit, settings."""

    url: str
    version: int
    rows: pd.DataFrame
    reduction: Reduction
    pca_fit: str
    spec: FeatureSettings  # with the batch size of the table's last run
    weights: WeightsRef
    meta: dict


def read_table_version(url: str, storage_options: Mapping[str, Any] | None, version: int | None = None) -> TableVersion:
    """The table under the run output ``url`` at ``version`` (the latest when None)."""
    # A local table is named by its absolute path in the lineage: the same table whatever
    # folder a command ran from.
    url = url.rstrip("/") if storage.is_remote(url) else os.path.abspath(url)
    try:
        table = delta.load(url, storage_options, version)
    except Exception as e:  # deltalake raises its own TableNotFoundError / version errors
        at = "" if version is None else f" at version {version}"
        raise InputError(f"no features table{at} under {url!r} ({type(e).__name__}: {e}): pass the --output of "
                         "`fruitdask run` (and a --version that `fruitdask table history` lists)") from e
    v = int(table.version())
    rows = table.to_pyarrow_dataset().to_table(columns=list(COLUMNS)).to_pandas(types_mapper=pd.ArrowDtype)
    if len(rows) == 0:
        raise InputError(f"the features table of {url!r} at version {v} has no rows: run the pipeline on images first")
    fits = sorted({str(f) for f in rows["pca_fit"]})
    if len(fits) != 1:
        raise InputError(f"table version {v} of {url!r} mixes PCA fits {fits}: run `fruitdask run --refit` first")
    meta = _meta_at(table, v)
    reduction = Reduction.from_npz(storage.read_bytes(update.fit_url(url, fits[0]), storage_options))
    weights, batch_size = _weights(url, storage_options, meta)
    fs = meta.get("feature_settings") or {}
    spec = FeatureSettings.from_dict(fs, batch_size=batch_size)
    return TableVersion(url, v, rows, reduction, fits[0], spec, weights, meta)


def _meta_at(table, version: int) -> dict:
    """The fruitdask description of the newest fruitdask commit at or before ``version``."""
    for entry in table.history():
        if int(entry.get("version", -1)) > version:
            continue
        raw = entry.get(delta.META_KEY)
        if raw:
            meta = json.loads(raw) if isinstance(raw, str) else dict(raw)
            if meta.get("feature_settings"):
                return meta
    raise InputError(f"table version {version} carries no fruitdask feature settings: it was not written by `fruitdask run`")


def _weights(url: str, storage_options: Mapping[str, Any] | None, meta: dict) -> tuple[WeightsRef, int]:
    """The weights reference of the table's features, and the batch size to featurize with."""
    fs = meta["feature_settings"]
    seed = int(fs.get("seed") or 0)
    try:
        doc = output.read_run(url, storage_options).record
    except InputError:
        doc = {}
    w = doc.get("weights") or {}
    batch = int((doc.get("config") or {}).get("batch_size") or 32)
    if w.get("sha256") == fs["weights_sha256"]:
        return WeightsRef(kind=w["kind"], source=w["source"], sha256=w["sha256"], seed=seed, file_sha256=w.get("file_sha256")), batch
    requested = str(fs.get("weights"))
    if requested in ("random", "imagenet"):
        return WeightsRef(kind=requested, source=requested, sha256=fs["weights_sha256"], seed=seed), batch
    if requested == "auto":
        raise InputError(f"the table of {url!r} was made with --weights auto and its run.json is missing: run "
                         "`fruitdask run` once more on it (it writes run.json), then train")
    return WeightsRef(kind="file", source=requested, sha256=fs["weights_sha256"], seed=seed,
                      file_sha256=fs.get("weights_file_sha256")), batch


@dataclass
class Candidate:
    """A trained, evaluated model and what the registry stores beside its bundle."""

    bundle: ModelBundle
    metrics: dict
    lineage: dict
    files: dict[str, bytes]


def split(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, held-out rows) by the key hash; held-out rows of labels with no
    training row are dropped (the model cannot know them)."""
    mask = held_out(rows["image_key"].astype(str))
    train, test = rows[~mask].reset_index(drop=True), rows[mask].reset_index(drop=True)
    known = set(train["label"].astype(str))
    dropped = ~test["label"].astype(str).isin(known)
    if dropped.any():
        logger.warning("%d held-out images have labels with no training image (%s): not evaluated",
                       int(dropped.sum()), ", ".join(sorted(set(test.loc[dropped, "label"].astype(str)))))
    test = test[~dropped].reset_index(drop=True)
    if len(test) == 0:
        raise InputError(f"no held-out image ({HOLDOUT_PERCENT}% of the keys by hash) has a label the model trains on: "
                         "the table is too small to evaluate a model; add images")
    return train, test


def train_candidate(tv: TableVersion, storage_options: Mapping[str, Any] | None, *, C: float = 1.0, max_iter: int = 2000,
                    weights_override: str | None = None, guard: Callable[[list[str]], None] | None = None,
                    trigger: str = "train", run_id: str | None = None) -> Candidate:
    """Fit on the training rows of ``tv``, evaluate on its held-out rows, calibrate the
    ``unknown`` detector; ``trigger`` (``train`` or ``daily``) and ``run_id`` go to the lineage."""
    train, test = split(tv.rows)
    X, y = frames.matrix(train["pca"]), train["label"].astype(str).to_numpy()
    pipe = classify.fit_classifier(X, y, C=C, max_iter=max_iter)
    bundle = ModelBundle(tv.spec, tv.weights, tv.reduction, LinearClassifier.from_sklearn(pipe))
    test_x, test_y = frames.matrix(test["features"]), test["label"].astype(str).to_numpy()
    proba = bundle.predict_proba(test_x, tv.spec)
    metrics = classify.evaluate(test_y, np.asarray(bundle.labels)[proba.argmax(axis=1)], bundle.labels)
    classify.warn_uncatalogued(bundle.labels)
    featurizer = bundle.featurizer(storage_options, weights_override, guard)
    open_set = openset.calibrate_bundle(bundle, featurizer, X, y, test_x, test_y)
    lineage = _lineage(tv, train, test, trigger, run_id)
    summary = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "n_test": metrics["n"],
               "n_train": len(y), "labels": bundle.labels, "unknown_rate": open_set.rates.get("fruit_rejected"),
               "uncertain_rate": open_set.rates.get("fruit_uncertain"),
               "nonfruit_accepted": open_set.rates.get("nonfruit_accepted"), "held_out": HOLDOUT_RULE}
    bundle.info = {
        "training": {"run": tv.url, "table_version": tv.version, "n_train": len(y), "C": C, "max_iter": max_iter},
        "evaluation": {"held_out": HOLDOUT_RULE, "n": metrics["n"], "accuracy": metrics["accuracy"],
                       "macro_f1": metrics["macro_f1"], "skipped": 0},
        "open_set": open_set.document(), "lineage": lineage, "versions": versions(),
    }
    report = {**metrics, "features": tv.url, "table_version": tv.version, "held_out": HOLDOUT_RULE, "n_train": len(y),
              "open_set": open_set.summary()}
    title = f"Held-out evaluation (table version {tv.version}, {tv.spec.image_size}px, {tv.spec.pooling} pooling)"
    files = {"report.json": json.dumps(report, indent=2, default=str).encode(),
             "report.md": classify.report_markdown(metrics, title).encode(), "confusion.png": classify.confusion_png(metrics)}
    logger.info("candidate on table version %d: held-out accuracy %.3f, macro F1 %.3f on %d images (%d training)",
                tv.version, metrics["accuracy"], metrics["macro_f1"], metrics["n"], len(y))
    return Candidate(bundle, summary, lineage, files)


def _lineage(tv: TableVersion, train: pd.DataFrame, test: pd.DataFrame, trigger: str, run_id: str | None) -> dict:
    fs = tv.meta.get("feature_settings") or {}
    return {
        "table_uri": tv.url, "table_version": tv.version, "pca_fit": tv.pca_fit,
        "weights_sha256": tv.spec.weights_key, "weights_file_sha256": fs.get("weights_file_sha256"),
        "weights": {"kind": tv.weights.kind, "source": tv.weights.source},
        "image_size": tv.spec.image_size, "pooling": tv.spec.pooling, "precision": tv.spec.precision,
        "table_run_id": tv.meta.get("run_id"),
        "row_run_ids": sorted({str(r) for r in tv.rows["run_id"]}),
        "n_train": len(train), "n_held_out": len(test), "held_out": HOLDOUT_RULE,
        "trigger": trigger, "run_id": run_id,
    }
