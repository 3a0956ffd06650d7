"""The gate: may a candidate replace the champion? And the promotions built on it.

A candidate is compared with the champion **on the same held-out rows**: the candidate's
held-out rows (:mod:`fruitdask.classifier.candidate`, by key hash) of the table version it
was trained on, read again by time travel. The key-hash rule keeps those rows out of the
champion's training too, whatever table version it was trained on. Both models predict
every such row whose true label both know (a new fruit is compared on the labels they
share; the decision says which labels were left out). The candidate passes when

- its accuracy and macro F1 are not lower than the champion's by more than
  ``margin_points`` (percentage points, default 1);
- its unknown rate (held-out fruit photos rejected as ``unknown``) is at most
  ``max_unknown_rate`` (default 0.10) or not above the champion's, and its uncertain rate
  (held-out fruit answered ``uncertain``) at most ``max_uncertain_rate`` (default 0.25) or
  not above the champion's. Both rates are measured at training (``metrics.json``).

When the champion's features cannot be compared on these rows (other weights, image size
or pooling), the recorded held-out metrics of both are compared instead, and the decision
says so.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict, dataclass

import numpy as np

from fruitdask.classifier import candidate, classify
from fruitdask.classifier.registry import ModelVersion, Registry
from fruitdask.errors import ConfigError, ModelError
from fruitdask.features import frames
from fruitdask.features.settings import differences

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateSettings:
    """The gate's bounds (flags ``--margin``, ``--max-unknown-rate``, ``--max-uncertain-rate``)."""

    margin_points: float = 1.0
    max_unknown_rate: float = 0.10
    max_uncertain_rate: float = 0.25

    def __post_init__(self) -> None:
        if not 0 <= self.margin_points <= 100:
            raise ConfigError(f"--margin {self.margin_points} is not a number of percentage points in [0, 100]: e.g. 1")
        for name, v in (("--max-unknown-rate", self.max_unknown_rate), ("--max-uncertain-rate", self.max_uncertain_rate)):
            if not 0 <= v <= 1:
                raise ConfigError(f"{name} {v} is not a rate in [0, 1]: e.g. 0.1")


def compare(registry: Registry, cand: ModelVersion, champ: ModelVersion, settings: GateSettings) -> dict:
    """The comparison of ``cand`` with ``champ``: scores of both, shared labels, and ``passed``/``reasons``."""
    shared = sorted(set(cand.metrics.get("labels") or []) & set(champ.metrics.get("labels") or []))
    scores, basis = _scores_on_held_out(registry, cand, champ, shared)
    reasons = []
    margin = settings.margin_points / 100
    for key in ("accuracy", "macro_f1"):
        c, h = scores["candidate"][key], scores["champion"][key]
        if c < h - margin:
            reasons.append(f"{key} {c:.4f} is worse than the champion's {h:.4f} by more than {settings.margin_points:g} points")
    for key, bound in (("unknown_rate", settings.max_unknown_rate), ("uncertain_rate", settings.max_uncertain_rate)):
        c, h = cand.metrics.get(key), champ.metrics.get(key)
        if c is not None and c > bound and (h is None or c > h):
            reasons.append(f"{key} {c:.4f} is above {bound:g} and above the champion's ({h})")
    return {"champion": champ.version, "basis": basis, **scores, "labels_compared": shared,
            "labels_only_candidate": sorted(set(cand.metrics.get("labels") or []) - set(shared)),
            "labels_only_champion": sorted(set(champ.metrics.get("labels") or []) - set(shared)),
            "settings": asdict(settings), "passed": not reasons, "reasons": reasons}


def _scores_on_held_out(registry: Registry, cand: ModelVersion, champ: ModelVersion, shared: list[str]) -> tuple[dict, str]:
    """Accuracy and macro F1 of both models on the candidate's held-out rows of the shared labels."""
    lin = cand.lineage
    tv = candidate.read_table_version(lin["table_uri"], registry.storage_options, int(lin["table_version"]))
    _, test = candidate.split(tv.rows)
    test = test[test["label"].astype(str).isin(shared)]
    cb, hb = registry.bundle(cand.version), registry.bundle(champ.version)
    if len(test) == 0 or differences(hb.spec, tv.spec):
        why = "no shared held-out row" if len(test) == 0 else "; ".join(d.reason("model") for d in differences(hb.spec, tv.spec))
        recorded = {k: {m: float(v.metrics.get(m) or 0.0) for m in ("accuracy", "macro_f1")} for k, v in
                    (("candidate", cand), ("champion", champ))}
        return recorded, f"recorded held-out metrics (the champion cannot score these rows: {why})"
    x, y = frames.matrix(test["features"]), test["label"].astype(str).to_numpy()
    out = {}
    for name, b in (("candidate", cb), ("champion", hb)):
        pred = np.asarray(b.labels)[b.predict_proba(x, tv.spec).argmax(axis=1)]
        m = classify.evaluate(y, pred, shared)
        out[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n": m["n"]}
    return out, f"{len(test)} held-out rows of table version {tv.version} ({candidate.HOLDOUT_RULE})"


def promote(registry: Registry, version: str, settings: GateSettings, *, force: bool = False) -> dict:
    """Gate ``version`` against the champion and move the alias if it passes (or ``force``).

    Returns the decision (also written to ``<version>/decision.json``): ``promoted``,
    ``reason``, ``comparison`` and the champion before and after. Raises
    :class:`~fruitdask.classifier.registry.ConflictError` when another promotion won the race.
    """
    cand = registry.get(version)
    read = registry.champion()
    current = (read.doc or {}).get("version")
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if current == version:
        if cand.decision.get("promoted"):
            return cand.decision
        # An earlier attempt moved the alias and died before writing its decision.
        decision = {"version": version, "promoted": True, "reason": "already the champion", "forced": False,
                    "decided_at": now, "champion_before": current, "champion_after": current, "comparison": None}
        registry.record_decision(version, decision)
        return decision
    comparison = None
    if current is None:
        ok, reason = True, "no champion yet: the first model becomes champion"
    else:
        comparison = compare(registry, cand, registry.get(current), settings)
        ok = comparison["passed"]
        reason = (f"passed the gate against {current}" if ok else f"not promoted: {'; '.join(comparison['reasons'])}")
        if comparison["labels_only_candidate"] or comparison["labels_only_champion"]:
            reason += f" (compared on the {len(comparison['labels_compared'])} labels both models know)"
        if not ok and force:
            reason = f"forced by a person over the gate ({'; '.join(comparison['reasons'])})"
    promoted = ok or force
    if promoted:
        registry.move_champion(read, version, reason, forced=force and not ok)
    decision = {"version": version, "promoted": promoted, "reason": reason, "forced": bool(force and not ok),
                "decided_at": now, "champion_before": current, "champion_after": version if promoted else current,
                "comparison": comparison}
    registry.record_decision(version, decision)
    logger.info("model %s: %s", version, reason)
    return decision


def rollback(registry: Registry) -> dict:
    """Point the champion back at the previous one (one step of its history)."""
    read = registry.champion()
    doc = read.doc or {}
    history = list(doc.get("history") or [])
    if not doc.get("version") or not history:
        raise ModelError(f"{registry.url!r} has no previous champion to roll back to "
                         f"(champion: {doc.get('version')!r}): promote a version with `fruitdask model promote --force`")
    back = history[-1]
    registry.get(back)  # still there?
    return registry.move_champion(read, back, f"rollback from {doc['version']}", rollback=True)
