"""Benchmark (not a test): how long ``fruitdask predict`` takes to load, then per photo.

Usage::

    python -m fruitdask run --input ../shared/data/fruits360-sample/Training --image-size 32 \\
        --weights random --output /tmp/fd-run
    python -m fruitdask train --features /tmp/fd-run --test-input ../shared/data/fruits360-sample/Test \\
        --model-out /tmp/fd-model
    python benchmarks/predict_latency.py --model /tmp/fd-model [--photos DIR] [--n 40]

Prints the load time split into its steps (TensorFlow import, bundle files, weights + sha256 check, Keras model
build + first call), then the latency of one photo at a time after load (median, p90), the
per-photo cost of one batched call, and the ratio of the single-photo latency to a bare
VGG16 forward pass on a pre-decoded image, measured in the same run (the baseline: what
decoding, preprocessing, PCA and the classifier add).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fruitdask.config import TF_ENV  # noqa: E402

for _k, _v in TF_ENV.items():
    os.environ.setdefault(_k, _v)

from fruitdask import storage  # noqa: E402
from fruitdask.classifier.bundle import ModelBundle  # noqa: E402
from fruitdask.features import featurize, frames  # noqa: E402
from fruitdask.features.model import cached_runtime  # noqa: E402
from fruitdask.features.runtimes.tensorflow import import_keras  # noqa: E402

DEFAULT_PHOTOS = REPO / "fruitdask" / "sample_data" / "Training"


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a bundle written by `fruitdask train`")
    p.add_argument("--photos", default=str(DEFAULT_PHOTOS), help="a <Label>/<image> tree (default: the bundled sample)")
    p.add_argument("--n", type=int, default=40, help="photos to time one by one (default: 40)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    _, t_tf = _timed(import_keras)  # importing TensorFlow: paid once per process
    bundle, t_bundle = _timed(lambda: ModelBundle.load(args.model))
    featurizer, t_weights = _timed(lambda: bundle.featurizer())
    paths = list(storage.list_images(args.photos)["path"])[: args.n]
    if not paths:
        print(f"no photos under {args.photos}", file=sys.stderr)
        return 1

    def predict(batch: list[str]):
        df = featurizer.featurize(batch)
        ok = df["error_stage"].isna().to_numpy()
        return bundle.top_k(bundle.predict_proba(frames.matrix(df.loc[ok, "features"]), featurizer.spec), 3)

    # The first call builds the Keras model and traces its graph: part of loading.
    _, t_first = _timed(lambda: predict(paths[:1]))
    t_load = time.perf_counter() - t_start

    single = [_timed(lambda p=p: predict([p]))[1] for p in paths]
    _, t_batch = _timed(lambda: predict(paths))

    # Baseline: the bare forward pass (the runtime's preprocessing and VGG16) on one already decoded image.
    runtime = cached_runtime(featurizer.weights, featurizer.spec)
    image = featurize.decode_image(storage.read_bytes(paths[0]), bundle.spec.image_size)[None]
    base = [_timed(lambda: runtime.featurize(image))[1] for _ in paths]

    med, p90 = statistics.median(single), sorted(single)[int(0.9 * (len(single) - 1))]
    result = {
        "model": args.model,
        "image_size": bundle.spec.image_size,
        "photos": len(paths),
        "load_s": round(t_load, 3),
        "load_steps_s": {"import_tensorflow": round(t_tf, 3), "bundle_files": round(t_bundle, 3), "weights_and_sha256": round(t_weights, 3),
                         "model_build_and_first_photo": round(t_first, 3)},
        "single_photo_ms": {"median": round(1e3 * med, 2), "p90": round(1e3 * p90, 2)},
        "batched_ms_per_photo": round(1e3 * t_batch / len(paths), 2),
        "bare_vgg16_forward_ms": round(1e3 * statistics.median(base), 2),
        "single_photo_vs_bare_forward": round(med / statistics.median(base), 2),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model {args.model} ({bundle.spec.image_size} px), {len(paths)} photos from {args.photos}")
        print(f"load: {t_load:.2f} s  (import TensorFlow {t_tf:.2f} s, bundle {t_bundle:.2f} s, weights + sha256 {t_weights:.2f} s, "
              f"model build + first photo {t_first:.2f} s)")
        print(f"after load, one photo at a time: median {1e3 * med:.1f} ms, p90 {1e3 * p90:.1f} ms")
        print(f"one batched call: {1e3 * t_batch / len(paths):.1f} ms per photo")
        print(f"baseline, bare VGG16 forward of one decoded image: {1e3 * statistics.median(base):.1f} ms "
              f"-> predict costs {med / statistics.median(base):.2f}x the bare forward pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
