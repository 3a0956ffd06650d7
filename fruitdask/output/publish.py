"""Publishing a run's record beside its committed table: :func:`publish` after a run's
commit, :func:`republish` for a run that committed but did not finish publishing.

Both write at the output's final location (the table is already committed), ``_SUCCESS``
last. The scree plot and ``report.html`` are drawn by the report, a layer above: the caller
hands its drawing functions in as :class:`Pages`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fruitdask import storage
from fruitdask.output.layout import DASK_REPORT, ERRORS, REDUCTION, REPORT, RUN_JSON, RUNS, SCREE, SUCCESS_MARKER
from fruitdask.output.record import RunRecord, errors_parquet
from fruitdask.reduce import Reduction

if TYPE_CHECKING:
    from fruitdask.lake.table import TableState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pages:
    """The report's drawings that a publish writes: ``scree(reduction, title)`` is
    ``scree.png``, ``report(run_json, output_url, storage_options)`` is ``report.html``."""

    scree: Callable[[Reduction, str], bytes]
    report: Callable[[dict, str, Mapping[str, Any]], bytes]


def _scree_title(backend: object, reduction: Reduction) -> str:
    return f"Scree plot ({backend}, {reduction.n_samples} rows)"


def publish(record: RunRecord, target: storage.OutputTarget, pages: Pages) -> dict:
    """Write the run's record beside the committed table: ``errors.parquet``, the current
    fit and its scree plot (every run: a run that committed but failed before this leaves
    no stale copy behind the next one), ``run.json`` and the report, at the top (the last
    run's) and under ``runs/<run_id>/`` (kept); ``_SUCCESS`` last. The record and the fit
    are also in the commit (the record in its description, the fit named by every row):
    these are copies for people and tools that read files. Returns ``run.json``."""
    so = target.storage_options

    def put(name: str, data: bytes) -> None:
        storage.write_file(storage.join(target.url, name), data, so)

    put(ERRORS, errors_parquet(record.errors))
    if record.reduction is not None:
        put(REDUCTION, record.reduction.to_npz())
        put(SCREE, pages.scree(record.reduction, _scree_title(record.cfg.backend, record.reduction)))
    run_dir = f"{RUNS}/{record.run_id}"
    try:
        dask_report = storage.read_bytes(target.staging_path(DASK_REPORT), so)
        put(DASK_REPORT, dask_report)
        put(f"{run_dir}/{DASK_REPORT}", dask_report)
    except FileNotFoundError:
        pass
    doc = record.document()
    text = json.dumps(doc, indent=2, sort_keys=True, default=str).encode()
    put(f"{run_dir}/{RUN_JSON}", text)
    put(RUN_JSON, text)
    page = pages.report(doc, target.url, so)
    put(f"{run_dir}/{REPORT}", page)
    put(REPORT, page)
    put(SUCCESS_MARKER, b"")
    return doc


def republish(target: storage.OutputTarget, state: TableState, pages: Pages) -> bool:
    """When the table's newest run committed but did not finish publishing (``run.json`` is
    another run's, or absent), copy its record (from its commit) and its fit (the one its rows
    name) beside the table, ``_SUCCESS`` last; True when it did. A run with work publishes
    everything anyway: this is for a run with nothing to do."""
    from fruitdask.lake import table as delta
    from fruitdask.lake import update

    record = state.meta.get(delta.RECORD_KEY)
    if not state.exists or not record:
        return False
    so = target.storage_options
    try:
        shown = json.loads(storage.read_bytes(target.final_path(RUN_JSON), so)).get("run_id")
    except (FileNotFoundError, ValueError):
        shown = None
    if shown == record.get("run_id"):
        return False
    logger.warning("run %s committed version %s but did not finish publishing (run.json is %s): copying its record "
                   "and fit from the table", record.get("run_id"), record.get("table", {}).get("version_after"),
                   f"run {shown}'s" if shown else "absent")
    fit = delta.current_fit(state.table, state.storage_options)
    if fit:
        npz = storage.read_bytes(update.fit_url(target.url, fit), so)
        storage.write_file(target.final_path(REDUCTION), npz, so)
        r = Reduction.from_npz(npz)
        storage.write_file(target.final_path(SCREE), pages.scree(r, _scree_title(record.get("backend"), r)), so)
    text = json.dumps(record, indent=2, sort_keys=True, default=str).encode()
    storage.write_file(target.final_path(f"{RUNS}/{record['run_id']}/{RUN_JSON}"), text, so)
    storage.write_file(target.final_path(RUN_JSON), text, so)
    storage.write_file(target.final_path(SUCCESS_MARKER), b"", so)
    return True
