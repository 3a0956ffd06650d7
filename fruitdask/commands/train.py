"""``fruitdask train``: fit a classifier on a run's PCA features, evaluate it, write a bundle."""

from __future__ import annotations

import argparse
import json
import logging

from fruitdask.commands.options import add_quiet_debug, add_storage_options, storage_settings

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


def command(args: argparse.Namespace) -> int:
    from fruitdask import storage
    from fruitdask.classifier import classify

    settings = storage_settings(args)
    storage.guard_regions([args.features, args.test_input, args.test_features, args.model_out, args.weights], settings)
    opts = storage.storage_options(settings)
    # Refuse an existing --model-out before minutes of featurizing, not after.
    storage.OutputTarget.open(args.model_out, opts, args.overwrite)
    bundle, report, files = classify.train(
        args.features, test_input=args.test_input, test_features=args.test_features, storage_options=opts,
        weights_override=args.weights, C=args.C, max_iter=args.max_iter,
        guard=lambda urls: storage.guard_regions(urls, settings),
    )
    bundle.save(args.model_out, opts, overwrite=args.overwrite, extra_files=files)
    if bundle.weights.kind == "random":
        logger.warning("WARNING: the model was trained on features of RANDOM VGG16 weights: not ImageNet features")
    logger.info("held-out accuracy %.3f, macro F1 %.3f on %d images (%d skipped; chance %.3f); model written to %s",
                report["accuracy"], report["macro_f1"], report["n"], len(report["skipped"]), report["chance"], args.model_out)
    if not args.quiet:
        print(json.dumps({"model": args.model_out, "accuracy": round(report["accuracy"], 4),
                          "macro_f1": round(report["macro_f1"], 4), "n_test": report["n"], "skipped": len(report["skipped"]),
                          "unknown_detector": report["open_set"]}))
    return 0
