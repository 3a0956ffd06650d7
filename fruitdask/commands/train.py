"""``fruitdask train``: fit a classifier on a run's PCA features, evaluate it, write a bundle."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass

from fruitdask.commands.options import add_quiet_debug, add_storage_options, storage_settings
from fruitdask.config import StorageSettings

logger = logging.getLogger("fruitdask")

DEFAULT_MODEL_OUT = "fruitdask-model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", required=True, metavar="RUN_OUTPUT",
                   help="output folder/URI of a finished `fruitdask run` (its pca column trains the model)")
    held = p.add_mutually_exclusive_group(required=True)
    held.add_argument("--test-input", metavar="DIR_OR_URI",
                      help="held-out <Label>/<image>.jpg tree (e.g. Fruits-360 Test/), featurized with the run's weights and settings")
    held.add_argument("--test-features", metavar="RUN_OUTPUT",
                      help="or: a `fruitdask run` output of the held-out images made with the same weights, image size and pooling")
    p.add_argument("--model-out", default=DEFAULT_MODEL_OUT, metavar="DIR_OR_URI",
                   help=f"where to write the model bundle and its report (default: ./{DEFAULT_MODEL_OUT})")
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
    overwrite: bool = False
    weights: str | None = None
    C: float = 1.0
    max_iter: int = 2000
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainOptions:
        return cls(features=args.features, storage=storage_settings(args), test_input=args.test_input,
                   test_features=args.test_features, model_out=args.model_out, overwrite=bool(args.overwrite),
                   weights=args.weights, C=args.C, max_iter=args.max_iter, quiet=bool(args.quiet))


def command(args: argparse.Namespace) -> int:
    return train(TrainOptions.from_args(args))


def train(opts: TrainOptions) -> int:
    """Train, evaluate on the held-out images, write the bundle; print the scores."""
    from fruitdask import storage
    from fruitdask.classifier import classify

    settings = opts.storage
    storage.guard_regions([opts.features, opts.test_input, opts.test_features, opts.model_out, opts.weights], settings)
    so = storage.storage_options(settings)
    # Refuse an existing --model-out before minutes of featurizing, not after.
    storage.OutputTarget.open(opts.model_out, so, opts.overwrite)
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
