"""The model registry beside the features table: versions, their lineage, the champion.

::

    MODELS/
      champion.json          the alias: {"version", "previous", "history", "promoted_at", "reason", "forced"}
      <version>/             one trained model (a bundle `serve --model` loads), committed at once:
        bundle.json reduction.npz classifier.npz report.json report.md confusion.png
        metrics.json         held-out accuracy, macro F1, unknown and uncertain rates, labels
        lineage.json         table URI and version, PCA fit, weights digest, run ids, trigger
        _SUCCESS             written last: a folder without it is no version
        decision.json        the gate's last word on it (promoted or not, and why); written after

A version is ``YYYYmmddTHHMMSS.fffZ-<6 hex>`` (UTC): it sorts in creation order. The alias
moves by one conditional write (:mod:`fruitdask.storage.alias`): of two promotions that
read the same champion, one wins and the other is told so. ``history`` holds the earlier
champions, oldest first, so ``rollback`` can go back one step at a time.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fruitdask import storage
from fruitdask.classifier.bundle import ModelBundle
from fruitdask.errors import ModelError
from fruitdask.storage import alias

logger = logging.getLogger(__name__)

CHAMPION = "champion.json"
METRICS = "metrics.json"
LINEAGE = "lineage.json"
DECISION = "decision.json"


_last_ms = [0]  # the newest millisecond this process named: names of one process never tie


def new_version(now: dt.datetime | None = None) -> str:
    """A fresh version name that sorts in creation order (millisecond UTC time, then random)."""
    now = now or dt.datetime.now(dt.UTC)
    ms = max(int(now.timestamp() * 1000), _last_ms[0] + 1)
    _last_ms[0] = ms
    t = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return t.strftime("%Y%m%dT%H%M%S.") + f"{ms % 1000:03d}Z-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class ModelVersion:
    """One registered model, as ``model list`` shows it."""

    version: str
    url: str
    created_at: str
    metrics: dict
    lineage: dict
    decision: dict = field(default_factory=dict)

    def row(self, champion: str | None) -> dict:
        """The ``model list --json`` entry."""
        return {"version": self.version, "champion": self.version == champion, "created_at": self.created_at,
                "table_version": self.lineage.get("table_version"), "pca_fit": self.lineage.get("pca_fit"),
                "metrics": self.metrics, "promoted": self.decision.get("promoted"), "reason": self.decision.get("reason")}


class ConflictError(ModelError):
    """Another promotion or rollback moved the champion between our read and our write."""


class Registry:
    """A registry location (local folder or ``s3://`` prefix) and its storage options."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})

    def path(self, *parts: str) -> str:
        return storage.join(self.url, *parts)

    # --- versions ------------------------------------------------------------------------

    def register(self, bundle: ModelBundle, metrics: dict, lineage: dict, files: Mapping[str, bytes] | None = None,
                 version: str | None = None) -> str:
        """Commit a new version (bundle, report, metrics, lineage; ``_SUCCESS`` last); its name."""
        version = version or new_version()
        extra = {**(files or {}), METRICS: _json(metrics), LINEAGE: _json(lineage)}
        bundle.save(self.path(version), self.storage_options, extra_files=extra)
        logger.info("registered model version %s in %s", version, self.url)
        return version

    def names(self) -> list[str]:
        """Committed versions, oldest first."""
        return [v for v in alias.folders(self.url, self.storage_options) if self._exists(self.path(v, storage.SUCCESS_MARKER))]

    def get(self, version: str) -> ModelVersion:
        """A committed version; a :class:`ModelError` that lists the known ones otherwise."""
        if "/" in version or version.startswith(".") or not self._exists(self.path(version, storage.SUCCESS_MARKER)):
            known = self.names()
            raise ModelError(f"no model version {version!r} in {self.url!r}: known versions are "
                             f"{', '.join(known[-5:]) or 'none'} (see `fruitdask model list {self.url}`)")
        bundle_doc = self._json(version, storage.paths.BUNDLE_JSON) or {}
        return ModelVersion(version, self.path(version), str(bundle_doc.get("created_at", "")),
                            self._json(version, METRICS) or {}, self._json(version, LINEAGE) or {},
                            self._json(version, DECISION) or {})

    def versions(self) -> list[ModelVersion]:
        return [self.get(v) for v in self.names()]

    def find(self, table_uri: str, table_version: int, trigger: str) -> ModelVersion | None:
        """The oldest version trained by ``trigger`` on ``table_uri`` at ``table_version``."""
        for mv in self.versions():
            lin = mv.lineage
            if (lin.get("table_uri", "").rstrip("/") == table_uri.rstrip("/") and lin.get("table_version") == table_version
                    and lin.get("trigger") == trigger):
                return mv
        return None

    def bundle(self, version: str) -> ModelBundle:
        return ModelBundle.load(self.path(version), self.storage_options)

    def record_decision(self, version: str, decision: dict) -> None:
        """Write the gate's word on ``version`` beside it (replaces an earlier one)."""
        storage.write_file(self.path(version, DECISION), _json(decision), self.storage_options)

    # --- the champion alias ----------------------------------------------------------------

    def champion(self) -> alias.Versioned:
        """``champion.json`` as read, with the version the next conditional write must match."""
        return alias.read(self.path(CHAMPION), self.storage_options)

    def move_champion(self, read: alias.Versioned, version: str, reason: str, *, forced: bool = False,
                      rollback: bool = False) -> dict:
        """Point the alias at ``version`` if it is still as ``read``; :class:`ConflictError` otherwise."""
        old = read.doc or {}
        history = list(old.get("history") or [])
        if rollback:
            history = history[:-1]
        elif old.get("version"):
            history.append(old["version"])
        doc = {"version": version, "previous": old.get("version"), "history": history, "reason": reason, "forced": forced,
               "promoted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        if not alias.replace(self.path(CHAMPION), self.storage_options, doc, read.version):
            now = self.champion().doc or {}
            raise ConflictError(f"the champion of {self.url!r} changed while this command decided (it is now "
                                f"{now.get('version')!r}): run the command again to decide against the new champion")
        return doc

    # --- helpers -------------------------------------------------------------------------

    def _exists(self, url: str) -> bool:
        try:
            storage.read_bytes(url, self.storage_options)
            return True
        except FileNotFoundError:
            return False

    def _json(self, version: str, name: str) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.path(version, name), self.storage_options))
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise ModelError(f"{self.path(version, name)!r} is not valid JSON ({e}): the registry was edited; "
                             "remove that version's folder or train again") from e


def _json(doc: dict) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True, default=str).encode()
