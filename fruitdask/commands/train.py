"""``fruitdask train``: fit a classifier on a run's PCA features, evaluate it, write a bundle.

With ``--models MODELS`` the model is trained on the features table at ``--version`` (the
latest by default), its held-out rows chosen by a stable hash of ``image_key``, and
registered as a new version of the registry (:mod:`fruitdask.classifier.registry`); it is
not promoted (``fruitdask model promote`` does that, through the gate).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass

from fruitdask.commands.options import add_quiet_debug, add_storage_options, storage_settings
from fruitdask.config import StorageSettings
from fruitdask.errors import ConfigError

logger = logging.getLogger("fruitdask")

DEFAULT_MODEL_OUT = "fruitdask-model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", required=True, metavar="RUN_OUTPUT",
                   help="output folder/URI of a finished `fruitdask run` (its pca column trains the model)")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--test-input", metavar="DIR_OR_URI",
                      help="held-out <Label>/<image>.jpg tree (e.g. Fruits-360 Test/), featurized with the run's weights and settings")
    held.add_argument("--test-features", metavar="RUN_OUTPUT",
                      help="or: a `fruitdask run` output of the held-out images made with the same weights, image size and pooling")
    p.add_argument("--model-out", metavar="DIR_OR_URI",
                   help=f"where to write the model bundle and its report (default: ./{DEFAULT_MODEL_OUT})")
    p.add_argument("--models", metavar="MODELS",
                   help="a model registry (folder or URI): train on the features table, hold out images by a stable "
                   "hash of their key, and register the model as a new version (instead of --test-input/--test-features "
                   "and --model-out)")
    p.add_argument("--version", dest="table_version", type=int, metavar="V",
                   help="with --models: the table version to train on (default: the latest; `fruitdask table history` lists them)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --model-out (default: refuse)")
    p.add_argument("--weights", metavar="PATH_OR_URI",
                   help="where the run's weights file is now, if it moved (its sha256 must match run.json)")
    p.add_argument("--C", dest="C", type=float, default=1.0, help="inverse L2 regularization of the logistic regression (default: 1.0)")
    p.add_argument("--max-iter", type=int, default=2000, help="lbfgs iterations at most (default: 2000)")
    add_storage_options(p)
    add_quiet_debug(p)


@dataclass(frozen=True)
class TrainOptions:
    """What ``fruitdask train`` was asked, typed: built from the flags in one place."""

    features: str
    storage: StorageSettings
    test_input: str | None = None
    test_features: str | None = None
    model_out: str = DEFAULT_MODEL_OUT
    models: str | None = None
    table_version: int | None = None
    overwrite: bool = False
    weights: str | None = None
    C: float = 1.0
    max_iter: int = 2000
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainOptions:
        if args.models is None and args.test_input is None and args.test_features is None:
            raise ConfigError("pass a held-out set: --test-input DIR_OR_URI (a Test/ tree) or --test-features RUN_OUTPUT, "
                              "or --models MODELS to hold out images of the table by key hash and register the model")
        if args.models is not None and (args.test_input or args.test_features or args.model_out):
            raise ConfigError("--models trains on the table with held-out rows chosen by key hash and writes into the "
                              "registry: leave out --test-input, --test-features and --model-out")
        if args.models is None and args.table_version is not None:
            raise ConfigError("--version V picks the table version of a --models training: pass --models MODELS too")
        return cls(features=args.features, storage=storage_settings(args), test_input=args.test_input,
                   test_features=args.test_features, model_out=args.model_out or DEFAULT_MODEL_OUT,
                   models=args.models, table_version=args.table_version, overwrite=bool(args.overwrite),
                   weights=args.weights, C=args.C, max_iter=args.max_iter, quiet=bool(args.quiet))


def command(args: argparse.Namespace) -> int:
    return train(TrainOptions.from_args(args))


def train(opts: TrainOptions) -> int:
    """Train, evaluate on the held-out images, write the bundle; print the scores."""
    from fruitdask import storage
    from fruitdask.classifier import classify

    if opts.models is not None:
        return train_into_registry(opts, opts.models)
    settings = opts.storage
    storage.guard_regions([opts.features, opts.test_input, opts.test_features, opts.model_out, opts.weights], settings)
    so = storage.storage_options(settings)
    # Refuse an existing --model-out before minutes of featurizing, not after.
    storage.StagedOutput.open(opts.model_out, so, opts.overwrite)
    bundle, report, files = classify.train(
        opts.features, test_input=opts.test_input, test_features=opts.test_features, storage_options=so,
        weights_override=opts.weights, C=opts.C, max_iter=opts.max_iter,
        guard=lambda urls: storage.guard_regions(urls, settings),
    )
    bundle.save(opts.model_out, so, overwrite=opts.overwrite, extra_files=files)
    if bundle.weights.kind == "random":
        logger.warning("WARNING: the model was trained on features of RANDOM VGG16 weights: not ImageNet features")
    logger.info("held-out accuracy %.3f, macro F1 %.3f on %d images (%d skipped; chance %.3f); model written to %s",
                report["accuracy"], report["macro_f1"], report["n"], len(report["skipped"]), report["chance"], opts.model_out)
    if not opts.quiet:
        print(json.dumps({"model": opts.model_out, "accuracy": round(report["accuracy"], 4),
                          "macro_f1": round(report["macro_f1"], 4), "n_test": report["n"], "skipped": len(report["skipped"]),
                          "unknown_detector": report["open_set"]}))
    return 0


def train_into_registry(opts: TrainOptions, models: str) -> int:
    """``train --models``: train on the table (version ``--version``), register the candidate in ``models``."""
    from fruitdask import storage
    from fruitdask.classifier import candidate
    from fruitdask.classifier.registry import Registry

    settings = opts.storage
    storage.guard_regions([opts.features, models, opts.weights], settings)
    so = storage.storage_options(settings)
    tv = candidate.read_table_version(opts.features, so, opts.table_version)
    cand = candidate.train_candidate(tv, so, C=opts.C, max_iter=opts.max_iter, weights_override=opts.weights,
                                     guard=lambda urls: storage.guard_regions(urls, settings))
    version = Registry(models, so).register(cand.bundle, cand.metrics, cand.lineage, cand.files)
    if not opts.quiet:
        m = cand.metrics
        print(json.dumps({"models": models, "version": version, "table_version": tv.version,
                          "accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4), "n_test": m["n_test"],
                          "promoted": False}))
    return 0
