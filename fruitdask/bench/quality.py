"""Are the engines' features the same, and what does a precision cost: parity and accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fruitdask.bench.summary import ratio, stats


def parity(work: Path, engines: list[str], prec: str) -> dict:
    """Largest |feature difference| of each pipeline's output against the raw run."""
    raw_file = work / f"raw_features-{prec}.npz"
    if not raw_file.exists():
        return {}
    from fruitdask import output
    from fruitdask.features.frames import matrix

    with np.load(raw_file) as z:
        raw = dict(zip(z["paths"].tolist(), z["features"], strict=True))
    out = {}
    for engine in engines:
        folder = work / f"out-{engine}-{prec}"
        if engine == "raw" or not (folder / output.FEATURES).exists():
            continue
        t = output.read_run(str(folder)).features(["path", "features"])
        diffs = [float(np.max(np.abs(f - raw[p]))) for p, f in zip(t["path"], matrix(t["features"]), strict=True)]
        out[engine] = {"rows": len(diffs), "max_abs_diff_vs_raw": max(diffs, default=None)}
    return out


def held_out_accuracy(features: np.ndarray, labels: np.ndarray, variance: float, every: int = 4) -> dict:
    """Accuracy and macro F1 of the project's classifier (standardize, PCA to ``variance``, logistic
    regression) trained on 3 of every 4 images of each label and tested on the 4th."""
    from sklearn.decomposition import PCA
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    from fruitdask.classifier.classify import fit_classifier

    labels = np.asarray(labels)
    test = np.zeros(len(labels), dtype=bool)
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        test[idx[every - 1 :: every]] = True
    train = ~test
    if not test.any():
        raise ValueError(f"no label has {every} images to hold one out: bench more images (--images)")
    scaler = StandardScaler().fit(features[train])
    pca = PCA(n_components=variance if variance < 1 else None, svd_solver="full").fit(scaler.transform(features[train]))
    clf = fit_classifier(pca.transform(scaler.transform(features[train])), labels[train])
    predicted = clf.predict(pca.transform(scaler.transform(features[test])))
    macro_f1 = f1_score(labels[test], predicted, average="macro", zero_division=0)
    return {"accuracy": round(float(np.mean(predicted == labels[test])), 4), "macro_f1": round(float(macro_f1), 4),
            "train": int(train.sum()), "test": int(test.sum()), "k": int(pca.n_components_)}


def compare_precisions(work: Path, runs: dict, precisions: list[str], seed: int) -> dict:
    """bf16 (or any second precision) against the first: speed ratios, feature error, accuracy."""
    base = precisions[0]
    cfg = json.loads((work / f"config-{base}.json").read_text())
    feats: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for prec in precisions:
        f = work / f"raw_features-{prec}.npz"
        if f.exists():
            with np.load(f) as z:
                paths = z["paths"]
                feats[prec] = (paths, z["features"], np.array([p.rsplit("/", 2)[-2] for p in paths]))
    out: dict[str, Any] = {"baseline": base, "accuracy": {}, "vs_baseline": {}}
    for prec, (_, x, y) in feats.items():
        try:
            out["accuracy"][prec] = held_out_accuracy(x, y, cfg["variance"])
        except Exception as e:  # noqa: BLE001 - a bench reports what it could not measure
            out["accuracy"][prec] = {"status": f"not measured ({type(e).__name__}: {e})"}
    for prec in precisions[1:]:
        cmp: dict[str, Any] = {"engines": {}}
        for engine, base_runs in runs[base].items():
            a, b = stats(base_runs, "images_per_s_e2e"), stats(runs[prec][engine], "images_per_s_e2e")
            sa, sb = stats(base_runs, "steady_images_per_s"), stats(runs[prec][engine], "steady_images_per_s")
            cmp["engines"][engine] = {
                "speed_ratio_e2e": ratio(b, a), "speed_ratio_steady": ratio(sb, sa),
            }
        if base in feats and prec in feats and np.array_equal(feats[base][0], feats[prec][0]):
            xa, xb = feats[base][1].astype(np.float64), feats[prec][1].astype(np.float64)
            cmp["features"] = {
                "relative_error": round(float(np.linalg.norm(xb - xa)) / max(float(np.linalg.norm(xa)), 1e-30), 6),
                "correlation": round(float(np.corrcoef(xa.ravel(), xb.ravel())[0, 1]), 6),
                "cosine_min": round(float(((xa * xb).sum(1) / np.maximum(
                    np.linalg.norm(xa, axis=1) * np.linalg.norm(xb, axis=1), 1e-30)).min()), 6),
            }
        acc_a, acc_b = out["accuracy"].get(base, {}).get("accuracy"), out["accuracy"].get(prec, {}).get("accuracy")
        if acc_a is not None and acc_b is not None:
            cmp["accuracy_points"] = round(100 * (acc_b - acc_a), 2)
        out["vs_baseline"][prec] = cmp
    return out
