"""``fruitdask predict``: the top-k fruits of each photo, with a trained model bundle."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from fruitdask.commands.options import add_quiet_debug, add_storage_options, storage_settings
from fruitdask.config import StorageSettings
from fruitdask.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("photos", nargs="+", metavar="PHOTO", help="image files or URIs (.jpg, .png, ...)")
    p.add_argument("--model", required=True, metavar="DIR_OR_URI", help="a model bundle written by `fruitdask train --model-out`")
    p.add_argument("--top", type=int, default=3, help="labels to show per photo (default: 3)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout instead of text")
    p.add_argument("--weights", metavar="PATH_OR_URI",
                   help="where the model's weights file is now, if it moved (its sha256 must match the bundle)")
    add_storage_options(p)
    add_quiet_debug(p)


@dataclass(frozen=True)
class PredictOptions:
    """What ``fruitdask predict`` was asked, typed: built from the flags in one place."""

    photos: tuple[str, ...]
    model: str
    storage: StorageSettings
    top: int = 3
    json: bool = False
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.top < 1:
            raise ConfigError(f"--top must be at least 1, got {self.top}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PredictOptions:
        return cls(photos=tuple(args.photos), model=args.model, storage=storage_settings(args), top=args.top,
                   json=bool(args.json), weights=args.weights)


def command(args: argparse.Namespace) -> int:
    return predict(PredictOptions.from_args(args))


def predict(opts: PredictOptions) -> int:
    """Print the top labels of each photo (text, or one JSON document); exit 1 if one failed."""
    from fruitdask import storage
    from fruitdask.classifier.bundle import ModelBundle
    from fruitdask.features import frames

    settings = opts.storage
    storage.guard_regions([opts.model, opts.weights, *opts.photos], settings)
    so = storage.storage_options(settings)
    bundle = ModelBundle.load(opts.model, so)
    # The weights location in bundle.json is data: checked like any location given by flag.
    featurizer = bundle.featurizer(so, opts.weights, guard=lambda urls: storage.guard_regions(urls, settings))
    df = featurizer.featurize(list(opts.photos))
    ok = df["error_stage"].isna().to_numpy()
    top = bundle.top_k(bundle.predict_proba(frames.matrix(df.loc[ok, "features"]), featurizer.spec), opts.top) if ok.any() else []
    results: list[dict[str, Any]] = []
    it = iter(top)
    for path, good, reason in zip(opts.photos, ok, df["error_reason"], strict=True):
        if good:
            results.append({"path": path, "predictions": [{"label": lab, "probability": round(p, 6)} for lab, p in next(it)]})
        else:
            results.append({"path": path, "error": str(reason)})
            print(f"fruitdask: {path}: {reason}", file=sys.stderr)
    if opts.json:
        print(json.dumps({"model": opts.model, "results": results}, indent=2))
    else:
        for r in results:
            if "predictions" in r:
                print(f"{r['path']}: " + ", ".join(f"{p['label']} {p['probability']:.3f}" for p in r["predictions"]))
    failed = int((~ok).sum())
    if failed:
        print(f"fruitdask: {failed} of {len(opts.photos)} photos could not be classified", file=sys.stderr)
    return 1 if failed else 0
