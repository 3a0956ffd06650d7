"""One run's update of the features table, the same on every backend.

The backend only runs bodies of :mod:`fruitdask.lake.tasks` where it runs things (Dask
workers, Spark executors) through the primitives :class:`LakeBackend` declares:
``featurize_parts`` (the manifest's partitions, with the progress bar; typed receipts back),
``map_tasks``, ``tree_reduce``, and ``fit_wide`` where the backend declares
``supports_wide_fit``. Everything else is decided here:

1. featurize the plan's partitions; with the current PCA fit known, each task writes its
   data file at once (one pass); when a fit is needed (first run, ``--refit``, ``--rebuild``,
   or the table grew :data:`REFIT_GROWTH` times since the last fit) the features wait in
   their checkpoints;
2. fit the PCA (:class:`fruitdask.reduce.PCA`, whose strategy asks for the rows as moments
   summed by a tree reduction, or, for wide features, as one streamed array) over the
   checkpoints and the rows the table keeps, write
   it as ``OUTPUT/pca/<fit>.npz``, then project every checkpoint and rewrite every kept file
   with it;
3. rewrite the files that lose rows (removed or changed images: without a refit, queued
   behind step 1 as it starts, from a second thread, so they fill the threads its last
   partitions leave idle); once small files pile up, merge them on the workers
   (:func:`merge_small_files`); and commit every added and removed file as **one** table
   version (:func:`fruitdask.lake.table.commit`). Every file, added or removed, travels as one
   :class:`~fruitdask.lake.actions.FileAction` from the task that wrote it to that commit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
import pandas as pd

from fruitdask import checkpoint, storage
from fruitdask.errors import ReductionError
from fruitdask.features.settings import FeatureSettings
from fruitdask.features.weights_file import WeightsSource
from fruitdask.lake import table as delta
from fruitdask.lake import tasks
from fruitdask.lake.actions import FileAction
from fruitdask.lake.plan import Plan
from fruitdask.output import layout
from fruitdask.pca_moments import Moments
from fruitdask.reduce import MAX_MOMENT_FEATURES, PCA, Reduction, strategy_for
from fruitdask.runinfo import StageTimer

logger = logging.getLogger(__name__)

#: The PCA is refitted on all rows when the table holds this many times the rows of the last fit.
REFIT_GROWTH = 2.0
#: Small files the table may hold before a run merges them (see :func:`merge_small_files`).
MERGE_AFTER_FILES = 64

T = TypeVar("T")
#: A leaf of a tree reduction: a task body and its arguments, returning the PCA moments of some rows.
MomentsLeaf = tuple[Callable[..., Moments | None], tuple]


@dataclass
class Request:
    """What the run asks of the update (from the configuration)."""

    target: storage.OutputTarget
    run_id: str
    settings_fp: str
    components: int | None
    variance: float
    refit: bool
    rebuild: bool
    resume: bool
    feature_dim: int
    pca_batch_size: int | None = None
    power_iterations: int = 2
    seed: int = 0
    meta: dict = field(default_factory=dict)  # the commit's description (counts added here)
    #: What the table is after this run (its format and feature settings).
    description: delta.Description | None = None
    #: Called with this run's failed images before anything is committed (``--max-errors``).
    check: Callable[[pd.DataFrame], None] = lambda errors: None
    #: Called right before the commit (the output's lock still held: see OutputTarget.ensure_held).
    before_commit: Callable[[], None] = lambda: None
    #: The run's record (``run.json``) as of its commit, given the outcome: part of the commit.
    record: Callable[[Outcome], dict] = lambda outcome: {}


class LakeBackend(Protocol):
    """What the update asks of an engine (the part of
    :class:`fruitdask.backends.base.Backend` the lake calls; declared here, below the
    backends, so that the lake names its engine's type without importing an engine).

    ``name``: the backend's ``--backend`` name; ``supports_wide_fit``: whether :meth:`fit_wide`
    can fit features wider than :data:`~fruitdask.pca_moments.MAX_MOMENT_FEATURES` (see
    :func:`check_wide`).
    """

    name: str
    supports_wide_fit: bool

    def featurize_parts(self, manifest_url: str, sizes: list[int], job: tasks.FeaturizeJob) -> list[tasks.Receipt]:
        """Every manifest partition through :func:`fruitdask.lake.tasks.featurize_part`; their receipts."""
        ...

    def map_tasks(self, fn: Callable[..., T], args_list: list[tuple], *, background: bool = False) -> list[T]:
        """``fn(*args)`` for each ``args`` where the engine runs tasks; the results in order."""
        ...

    def tree_reduce(self, leaves: list[MomentsLeaf]) -> Moments | None:
        """The moments of each ``(fn, args)`` leaf, merged (None without leaves)."""
        ...

    def fit_wide(self, staged: list[tuple[int, int]], manifest_url: str, ckpt: checkpoint.Checkpoints,
                 sink: tasks.Sink, kept_files: list[tuple[str, np.ndarray | None]], pca: PCA) -> Reduction:
        """``pca`` fitted by its streamed strategy, on features too wide for moments (only where
        ``supports_wide_fit``)."""
        ...


@dataclass
class Outcome:
    """What the update did (``run.json``'s counts and table versions)."""

    version_before: int | None
    version_after: int | None
    featurized: int
    added: int
    updated: int
    errors: pd.DataFrame
    reduction: Reduction | None
    fit_id: str | None
    refitted: bool
    rows: int
    files_added: int
    files_removed: int


def needs_fit(plan: Plan, state: delta.TableState, req: Request) -> bool:
    """A new PCA fit: none yet, asked for, or the table grew past :data:`REFIT_GROWTH` times."""
    rows_at_fit = int(state.meta.get("pca_rows") or 0)
    rows_after = plan.unchanged + plan.featurize
    grown = rows_at_fit > 0 and rows_after >= REFIT_GROWTH * rows_at_fit
    if grown:
        logger.info("the table grew from %d rows at the last PCA fit to %d: refitting", rows_at_fit, rows_after)
    return not state.exists or req.rebuild or req.refit or not state.meta.get("pca_fit") or grown


def apply(backend: LakeBackend, plan: Plan, state: delta.TableState, req: Request, settings: FeatureSettings,
          weights: WeightsSource, timer: StageTimer) -> Outcome:
    """Featurize, (re)fit, rewrite and commit; return what happened. A run that fails
    before its commit removes the files it wrote (none of them is in any version)."""
    sink = tasks.Sink(delta.table_url(req.target.url), req.run_id, req.settings_fp, dict(state.storage_options))
    job = tasks.FeaturizeJob(weights, settings, checkpoint.for_run(req.target, settings, req.resume), sink, fit=None)
    try:
        return _apply(backend, plan, state, req, job, timer)
    except BaseException:
        remove_run_files(req.target.url, sink)
        raise


def remove_run_files(output: str, sink: tasks.Sink) -> None:
    """Best effort: the data files and the PCA fit of a run that did not commit (checked
    first: a commit whose answer was lost may have landed, and then its files stay)."""
    try:
        if delta.open_table(output, sink.storage_options).meta.get("run_id") == sink.run_id:
            return
    except Exception as e:  # noqa: BLE001 - unsure whether it committed: keep the files (a vacuum removes orphans)
        logger.warning("could not tell whether this run committed (%s): its files are left for a vacuum", e)
        return
    for folder, prefix in ((sink.table_url, f"part-{sink.run_id}-"), (storage.join(output, layout.FITS), "")):
        try:
            names = [f for f in storage.list_files(folder, sink.storage_options, ".parquet" if prefix else ".npz")
                     if f.rsplit("/", 1)[-1].startswith(prefix) and (prefix or sink.run_id in f.rsplit("/", 1)[-1])]
        except Exception as e:  # noqa: BLE001 - cleanup after a failure must not hide the failure
            logger.warning("could not list %s to remove this run's files: %s", folder, e)
            continue
        for name in names:
            storage.remove_prefix(name, sink.storage_options)


def _apply(backend: LakeBackend, plan: Plan, state: delta.TableState, req: Request, job: tasks.FeaturizeJob,
           timer: StageTimer) -> Outcome:
    ckpt, sink = job.ckpt, job.sink
    refit = needs_fit(plan, state, req)
    current = None if refit else tasks.Fit(state.meta["pca_fit"], fit_url(req.target.url, state.meta["pca_fit"]), sink.storage_options)
    with timer.stage("featurize"), ThreadPoolExecutor(1, thread_name_prefix="fruitdask-rewrite") as pool:
        job = dataclasses.replace(job, fit=current)
        # Without a refit, the files that lose rows are rewritten as they are, so their tasks
        # run beside the featurization, behind it (the threads its last partitions leave idle).
        early = None if refit else pool.submit(_rewrite, backend, plan.rewrite, sink, None, background=True)
        # A plan with images to featurize has their manifest.
        receipts = backend.featurize_parts(plan.manifest_url, plan.part_sizes, job) if plan.featurize and plan.manifest_url else []
        rewritten = early.result() if early else []
    errors = tasks.failed_images(receipts)
    req.check(errors)
    files = [r.file for r in receipts if r.kind is tasks.ReceiptKind.FILE and r.file is not None]
    moved = 0  # rows of untouched files merged into new ones (counted in the adds)
    if refit:
        with timer.stage("pca"):
            reduction, current = _refit(backend, plan, state, req, receipts, ckpt, sink)
        with timer.stage("write"):
            adds = _project(backend, plan, receipts, ckpt, sink, current)
            removed = _removes([(p, s) for p, s, _ in plan.rewrite] + plan.drop + plan.keep)
    else:
        assert current is not None  # no refit: the table's fit projects the new rows
        reduction = current.load()
        with timer.stage("write"):
            adds = files + rewritten
            removed = _removes([(p, s) for p, s, _ in plan.rewrite] + plan.drop)
            adds, removed, moved = merge_small_files(backend, plan.keep, adds, removed, sink)
    ok = [r for r in receipts if r.kind is not tasks.ReceiptKind.ERROR]
    out = Outcome(state.version, state.version, int(sum(plan.part_sizes)), sum(r.added for r in ok), sum(r.updated for r in ok),
                  errors, reduction, current.fit_id, refit, _rows_after(plan, adds, refit) - moved, len(adds), len(removed))
    with timer.stage("commit"):
        meta = {**req.meta, "pca_fit": current.fit_id, "pca_k": reduction.k,
                "pca_rows": reduction.n_samples if refit else state.meta.get("pca_rows"),
                "pca_fit_seq": _fit_seq(state) + (1 if refit else 0), "rows": out.rows, "rebuild": req.rebuild,
                "counts": {"added": out.added, "updated": out.updated, "removed": plan.removed,
                           "unchanged": plan.unchanged, "featurized": out.featurized}}
        out.version_after = state.version + 1 if state.exists and state.version is not None else 0  # no retries
        meta[delta.RECORD_KEY] = req.record(out)
        req.before_commit()
        out.version_after = delta.commit(state, adds, removed, meta,
                                         req.description, row_keys=plan.row_keys)
    return out


def merge_small_files(backend: LakeBackend, keep: list[tuple[str, int]], adds: list[FileAction],
                      removed: list[FileAction], sink: tasks.Sink) -> tuple[list[FileAction], list[FileAction], int]:
    """Once the table would hold :data:`MERGE_AFTER_FILES` small files (under
    :data:`fruitdask.lake.table.SMALL_FILE_BYTES`), merge them on the workers into files of
    about :data:`fruitdask.lake.table.TARGET_FILE_BYTES`, in this run's one commit: daily runs
    add a file or two per partition, and the table's file count stays bounded. A merge task
    streams its inputs file by file (worker memory: one small file); the client only plans.
    Returns the adds and removes to commit, and the rows of untouched files that moved into
    merged ones (counted once); this run's own merged-away files are deleted."""
    small: list[tuple[str, int, FileAction | None]] = [(p, int(s), None) for p, s in keep if s < delta.SMALL_FILE_BYTES]
    small += [(a.path, int(a.size), a) for a in adds if a.size < delta.SMALL_FILE_BYTES]
    if len(small) < MERGE_AFTER_FILES:
        return adds, removed, 0
    bins: list[list[tuple[str, int, FileAction | None]]] = [[]]
    size = 0
    for item in small:
        if size >= delta.TARGET_FILE_BYTES:
            bins, size = [*bins, []], 0
        bins[-1].append(item)
        size += item[1]
    bins = [b for b in bins if len(b) > 1]
    merged: list[FileAction] = backend.map_tasks(tasks.merge_files, [(sink, [p for p, _, _ in b], i) for i, b in enumerate(bins)])
    gone = {p for b in bins for p, _, _ in b}
    own = [p for b in bins for p, _, a in b if a is not None]
    adds = [a for a in adds if a.path not in gone] + merged
    removed = removed + _removes([(p, s) for b in bins for p, s, a in b if a is None])
    for p in own:  # written by this run a moment ago, never committed: not worth a vacuum
        storage.remove_prefix(sink.file_url(p), sink.storage_options)
    logger.info("merged %d small files into %d", len(gone), len(merged))
    moved = sum(_rows(m) for m in merged) - sum(_rows(a) for b in bins for _, _, a in b if a is not None)
    return adds, removed, moved


def _removes(files: list[tuple[str, int]]) -> list[FileAction]:
    """Files of the version read (the plan's ``(path, size)``), as the commit removes them."""
    return [FileAction(p, int(s)) for p, s in files]


def _rows(action: FileAction) -> int:
    assert action.rows is not None  # a file this run wrote: its tasks count its rows
    return action.rows


def _rows_after(plan: Plan, adds: list[FileAction], refit: bool) -> int:
    """Rows of the new version: those of the added files, plus the untouched files' rows."""
    return sum(_rows(a) for a in adds) + (0 if refit else plan.rows_kept)


def _fit_seq(state: delta.TableState) -> int:
    return int(state.meta.get("pca_fit_seq") or 0)


def fit_url(output: str, fit_id: str) -> str:
    return storage.join(output, layout.FITS, f"{fit_id}.npz")


def _rewrite(backend: LakeBackend, rewrite: list, sink: tasks.Sink, fit_: tasks.Fit | None, *,
             background: bool = False) -> list[FileAction]:
    args = [(sink, path, rows, fit_, i) for i, (path, _, rows) in enumerate(rewrite)]
    return [a for a in backend.map_tasks(tasks.rewrite_file, args, background=background) if a is not None]


def _refit(backend: LakeBackend, plan: Plan, state: delta.TableState, req: Request, receipts: list[tasks.Receipt],
           ckpt: checkpoint.Checkpoints, sink: tasks.Sink) -> tuple[Reduction, tasks.Fit]:
    """Fit the PCA on every row the table will hold; write it beside the table."""
    staged = _staged_parts(receipts, plan)
    kept_files: list[tuple[str, np.ndarray | None]] = [(p, rows) for p, _, rows in plan.rewrite] + [(p, None) for p, _ in plan.keep]
    # An engine without a streamed fit refuses features too wide for the moments (its declared capability).
    check_wide(req.feature_dim, backend.supports_wide_fit, backend.name)
    pca = PCA(req.feature_dim, components=req.components, variance=req.variance, batch_size=req.pca_batch_size,
              power_iterations=req.power_iterations, seed=req.seed)
    reduction = pca.fit_rows(_TableRows(backend, plan.manifest_url, staged, receipts, ckpt, sink, kept_files))
    fit_id = f"{_fit_seq(state) + 1:04d}-{req.run_id}"
    url = fit_url(req.target.url, fit_id)
    storage.write_file(url, reduction.to_npz(), sink.storage_options)
    logger.info("PCA fit %s: K=%d (%.4f of the variance) on %d rows", fit_id, reduction.k, reduction.variance_reached,
                reduction.n_samples)
    return reduction, tasks.Fit(fit_id, url, sink.storage_options)


@dataclass
class _TableRows:
    """The rows the table will hold (checkpointed partitions and kept files), in the shape the
    PCA's strategy asks for (:class:`fruitdask.reduce.Rows`), each read where it lies."""

    backend: LakeBackend
    manifest_url: str | None
    staged: list[int]
    receipts: list[tasks.Receipt]
    ckpt: checkpoint.Checkpoints
    sink: tasks.Sink
    kept_files: list[tuple[str, np.ndarray | None]]

    def moments(self) -> Moments | None:
        leaves: list[MomentsLeaf] = [(tasks.moments_part, (i, self.manifest_url, self.ckpt)) for i in self.staged]
        leaves += [(tasks.moments_file, (self.sink, p, rows)) for p, rows in self.kept_files]
        return self.backend.tree_reduce(leaves)

    def stream(self, fit: PCA) -> Reduction:
        rows = {r.part: r.rows for r in self.receipts if r.kind is tasks.ReceiptKind.STAGED}
        manifest = self.manifest_url or ""  # none when nothing was featurized: then no partition is staged
        return self.backend.fit_wide([(i, rows[i]) for i in self.staged], manifest, self.ckpt, self.sink,
                                     self.kept_files, fit)


def _staged_parts(receipts: list[tasks.Receipt], plan: Plan) -> list[int]:
    """Indexes of the partitions whose good rows wait in their checkpoints."""
    return sorted(r.part for r in receipts if r.kind is tasks.ReceiptKind.STAGED and r.part is not None)


def _project(backend: LakeBackend, plan: Plan, receipts: list[tasks.Receipt], ckpt: checkpoint.Checkpoints,
             sink: tasks.Sink, fit_: tasks.Fit) -> list[FileAction]:
    """Every checkpointed partition projected, every kept file re-projected, with ``fit_``."""
    staged = _staged_parts(receipts, plan)
    adds = [a for a in backend.map_tasks(tasks.project_part, [(i, plan.manifest_url, ckpt, sink, fit_) for i in staged])
            if a is not None]
    kept = [(p, s, rows) for p, s, rows in plan.rewrite] + [(p, s, np.zeros(0, np.int32)) for p, s in plan.keep]
    return adds + _rewrite(backend, kept, sink, fit_)


def check_wide(feature_dim: int, supports_wide_fit: bool, backend_name: str) -> None:
    """Refuse features too wide for the moments on an engine that declares no wide fit
    (:attr:`LakeBackend.supports_wide_fit`: Spark sums moments only), before any work."""
    if not supports_wide_fit and strategy_for(feature_dim) == "streamed":
        raise ReductionError(
            f"{feature_dim:,} features per image are too wide for the exact PCA of the {backend_name.capitalize()} "
            f"backend (at most {MAX_MOMENT_FEATURES:,}): use --backend dask (IncrementalPCA streams), or --pooling avg"
        )
