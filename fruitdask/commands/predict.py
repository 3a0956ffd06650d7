"""``fruitdask predict``: the top-k fruits of each photo, with a trained model bundle."""

from __future__ import annotations

import argparse
import json
import sys

from fruitdask.commands.options import add_quiet_debug, add_storage_options, storage_settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("photos", nargs="+", metavar="PHOTO", help="image files or URIs (.jpg, .png, ...)")
    p.add_argument("--model", required=True, metavar="DIR_OR_URI", help="a model bundle written by `fruitdask train --model-out`")
    p.add_argument("--top", type=int, default=3, help="labels to show per photo (default: 3)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout instead of text")
    p.add_argument("--weights", metavar="PATH_OR_URI",
                   help="where the model's weights file is now, if it moved (its sha256 must match the bundle)")
    add_storage_options(p)
    add_quiet_debug(p)


def command(args: argparse.Namespace) -> int:
    from fruitdask import storage
    from fruitdask.classifier.bundle import ModelBundle
    from fruitdask.errors import ConfigError
    from fruitdask.features import frames

    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    settings = storage_settings(args)
    storage.guard_regions([args.model, args.weights, *args.photos], settings)
    opts = storage.storage_options(settings)
    bundle = ModelBundle.load(args.model, opts)
    # The weights location in bundle.json is data: checked like any location given by flag.
    featurizer = bundle.featurizer(opts, args.weights, guard=lambda urls: storage.guard_regions(urls, settings))
    df = featurizer.featurize(args.photos)
    ok = df["error_stage"].isna().to_numpy()
    top = bundle.top_k(bundle.predict_proba(frames.matrix(df.loc[ok, "features"]), featurizer.spec), args.top) if ok.any() else []
    results, it = [], iter(top)
    for path, good, reason in zip(args.photos, ok, df["error_reason"], strict=True):
        if good:
            results.append({"path": path, "predictions": [{"label": lab, "probability": round(p, 6)} for lab, p in next(it)]})
        else:
            results.append({"path": path, "error": str(reason)})
            print(f"fruitdask: {path}: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps({"model": args.model, "results": results}, indent=2))
    else:
        for r in results:
            if "predictions" in r:
                print(f"{r['path']}: " + ", ".join(f"{p['label']} {p['probability']:.3f}" for p in r["predictions"]))
    failed = int((~ok).sum())
    if failed:
        print(f"fruitdask: {failed} of {len(args.photos)} photos could not be classified", file=sys.stderr)
    return 1 if failed else 0
