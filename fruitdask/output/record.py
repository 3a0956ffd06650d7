"""What a run records about itself (:class:`RunRecord`, ``run.json``), and the one way
back in: :func:`read_run` and the :class:`CommittedRun` it returns.

The table is the truth, the files beside it are copies: each run's commit carries its record
(``run.json`` as of the commit) and every row names its PCA fit, so a run that failed between
its commit and the end of its publishing leaves nothing stale to read: :func:`read_run` takes
the record of the table's newest run when ``run.json`` is another run's, and
:meth:`CommittedRun.reduction` the fit the rows name (``pca/<fit>.npz``), not ``reduction.npz``.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from fruitdask import __version__, storage
from fruitdask.errors import InputError
from fruitdask.features.settings import FeatureSettings
from fruitdask.output.layout import ERRORS, FEATURES, FITS, REDUCTION, REPORT, RUN_JSON, RUNS, SCREE, SUCCESS_MARKER
from fruitdask.reduce import Reduction
from fruitdask.runinfo import StageTimer, versions
from fruitdask.schema import ERROR_COLUMNS

if TYPE_CHECKING:
    from fruitdask.config import RunConfig
    from fruitdask.features.model import WeightsInfo

logger = logging.getLogger(__name__)

NOT_A_RUN_HINT = "pass the --output folder or URI of a finished `fruitdask run`"


def errors_parquet(errors: pd.DataFrame) -> bytes:
    """``errors.parquet``: one string row per skipped file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def column(c: str) -> list:
        if not len(errors) or c not in errors:
            return [None] * len(errors)
        return [None if v is None or v is pd.NA or (isinstance(v, float) and v != v) else str(v) for v in errors[c].tolist()]

    table = pa.table({c: pa.array(column(c), type=pa.string()) for c in ERROR_COLUMNS})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@dataclass
class RunRecord:
    """What a run records about itself; :meth:`document` is ``run.json``."""

    cfg: RunConfig
    output_url: str  # the run's OutputTarget.url
    run_id: str
    started: dt.datetime
    timer: StageTimer
    n_listed: int  # every file listed, refused ones included
    n_images: int  # the images handed to the backend
    per_label: dict[str, int]
    errors: pd.DataFrame
    rows: int
    reduction: Reduction
    cluster: dict
    precision: dict
    weights: WeightsInfo
    features: FeatureSettings  # what decided the features, as the table's description holds it
    warnings: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    lake: dict = field(default_factory=dict)  # the table's counts and versions (pipeline.lake_counts)

    def document(self) -> dict:
        """The ``run.json`` document (timings and duration as of now)."""
        timer, featurize_s = self.timer, self.timer.stages.get("featurize", 0.0)
        return {
            "fruitdask_version": __version__,
            "run_id": self.run_id,
            "backend": self.cfg.backend,
            "input": self.cfg.input,
            "output": self.output_url,
            "started_at": self.started.isoformat(),
            "duration_s": round(timer.total, 3),
            "counts": {"images_listed": self.n_listed, "labels": len(self.per_label), "rows_written": self.rows,
                       "errors": len(self.errors),
                       **{k: self.lake[k] for k in ("listed", "added", "updated", "removed", "unchanged", "featurized",
                                                   "rekeyed", "duplicates_dropped")
                          if k in self.lake}},
            "table": {k: self.lake.get(k) for k in ("version_before", "version_after", "rows", "pca_fit", "refitted",
                                                    "files_added", "files_removed")},
            "per_label": self.per_label,
            "errors_by_stage": self._errors_by_stage(),
            "reduction": self.reduction.summary(),
            "timings_s": {k: round(v, 3) for k, v in timer.stages.items()},
            "images_per_second": {
                "featurize": round(self.n_images / featurize_s, 3) if featurize_s else None,
                "overall": round(self.n_images / timer.total, 3),
            },
            "cluster": self.cluster,
            "precision": self.precision,
            "weights": self._weights(),
            "features": self.features.to_dict(),
            "warnings": self.warnings,
            "extra": self.extra,
            "versions": versions(),
            "config": self.cfg.to_dict(),
            "files": {"features": f"{FEATURES}/", "errors": ERRORS, "reduction": REDUCTION, "scree": SCREE,
                      "performance_report": self.extra.get("performance_report"), "report": REPORT,
                      "run": f"{RUNS}/{self.run_id}/"},
        }

    def _errors_by_stage(self) -> dict[str, int]:
        if not len(self.errors):
            return {}
        return {str(k): int(v) for k, v in self.errors["stage"].value_counts().items()}

    def _weights(self) -> dict:
        w = self.weights
        return {"requested": w.requested, "kind": w.kind, "source": w.source, "sha256": w.sha256,
                "file_sha256": w.file_sha256, "random": w.is_random, "warning": w.warning}


@dataclass
class CommittedRun:
    """A run output (or its staging prefix while it commits): its record and file readers."""

    url: str
    record: dict
    storage_options: Mapping[str, Any] | None = None

    def path(self, name: str) -> str:
        return storage.join(self.url, name)

    def reduction(self) -> Reduction:
        """The PCA fit the table's current rows name (``pca/<fit>.npz``); ``reduction.npz``
        only for an output whose rows name none."""
        from fruitdask.lake import table as delta

        fit = delta.current_fit(delta.load(self.url, self.storage_options), self.storage_options)
        return Reduction.from_npz(self._read(f"{FITS}/{fit}.npz" if fit else REDUCTION))

    def features(self, columns: tuple[str, ...] | list[str] | None = None, version: int | None = None) -> pd.DataFrame:
        """The table's current rows (only ``columns`` when given; ``version`` for time travel)."""
        from fruitdask.lake import table as delta

        dt_ = delta.load(self.url, self.storage_options, version)
        table = delta.read_columns(dt_, self.storage_options, list(columns) if columns else None)
        return table.to_pandas(types_mapper=pd.ArrowDtype)

    def feature_parts(self) -> list[str]:
        """The table's current data files, as URLs or paths (to stream them one by one)."""
        from fruitdask.lake import table as delta

        uris = delta.load(self.url, self.storage_options).file_uris()
        return sorted(u[len("file://"):] if u.startswith("file://") else u for u in uris)

    def errors(self) -> pd.DataFrame:
        """``errors.parquet`` (an :class:`InputError` when it is absent)."""
        return storage.read_parquet(self.path(ERRORS), self.storage_options)

    def scree(self) -> bytes:
        return self._read(SCREE)

    def feature_settings(self) -> FeatureSettings:
        """The settings the run's features were made with, as recorded in ``run.json``
        (``features``; a ``run.json`` from before it is read from its config and weights)."""
        if "features" in self.record:
            return FeatureSettings.from_dict(self.record["features"], self.storage_options)
        cfg = self.record["config"]
        return FeatureSettings.from_dict({**cfg, "weights_sha256": self.record["weights"]["sha256"]}, self.storage_options)

    def _read(self, name: str) -> bytes:
        try:
            return storage.read_bytes(self.path(name), self.storage_options)
        except FileNotFoundError as e:
            raise _not_a_run(self.url, name) from e
        except (PermissionError, OSError) as e:
            raise storage.translate(e, self.url) from e


def _not_a_run(url: str, name: str) -> InputError:
    return InputError(f"{url!r} is not a completed fruitdask run output (no {name}): {NOT_A_RUN_HINT}")


def read_run(url: str, storage_options: Mapping[str, Any] | None = None, *, committed: bool = True) -> CommittedRun:
    """Read the record of the run output at ``url``; refuse a foreign or unfinished folder.

    ``committed=False`` accepts an output without ``_SUCCESS`` (its report is rebuilt from
    whatever ``run.json`` says).
    """
    from fruitdask.lake import table as delta

    url = url.rstrip("/")
    name = RUN_JSON
    doc, missing = None, None
    try:
        if committed:
            name = SUCCESS_MARKER
            storage.read_bytes(storage.join(url, SUCCESS_MARKER), storage_options)
            name = RUN_JSON
        doc = json.loads(storage.read_bytes(storage.join(url, RUN_JSON), storage_options))
    except FileNotFoundError as e:
        missing = e
    except json.JSONDecodeError as e:
        raise InputError(f"{url}/{RUN_JSON} is not valid JSON ({e}): rerun `fruitdask run` to write it again") from e
    except (PermissionError, OSError) as e:
        raise storage.translate(e, url) from e
    latest = delta.latest_record(url, storage_options)
    if latest is not None and (doc is None or doc.get("run_id") != latest.get("run_id")):
        # The newest run committed but did not finish publishing: the files beside the table
        # are an older run's (or none). Its record is part of its commit.
        logger.warning("%s %s, the table's newest version is run %s's: reading that run's record from the table",
                       url, f"holds the record of run {doc.get('run_id')}" if doc else f"has no {name}", latest.get("run_id"))
        doc = latest
    if doc is None:
        raise _not_a_run(url, name) from missing
    return CommittedRun(url, doc, storage_options)
