"""The run, stage by stage: list, count, load weights, featurize + reduce (backend), write.

Backend-independent steps live here so both backends produce the same files:
``features/`` (Parquet), ``errors.parquet``, ``reduction.npz``, ``scree.png`` and
``run.json``, committed atomically by :class:`fruitdask.storage.OutputTarget`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import pandas as pd

from fruitdask import checkpoint, output, storage
from fruitdask.backends import make_backend, workers_elsewhere
from fruitdask.backends.base import Backend
from fruitdask.config import RunConfig
from fruitdask.errors import InputError, OutputError, TooManyErrors, WeightsError
from fruitdask.features import model, precision
from fruitdask.features.settings import FeatureSettings
from fruitdask.progress import Progress
from fruitdask.reduce import Reduction, scree_png
from fruitdask.report import page as report
from fruitdask.runinfo import StageTimer, label_counts

logger = logging.getLogger(__name__)


def check_errors(cfg: RunConfig, n_listed: int, n_errors: int) -> None:
    """Fail the run when more images failed than ``--max-errors`` allows."""
    allowed = cfg.max_errors_allowed(n_listed)
    if allowed is not None and n_errors > allowed:
        raise TooManyErrors(
            f"{n_errors} of {n_listed} images could not be used, more than --max-errors {cfg.max_errors:g} "
            f"allows ({allowed}): see the reasons with --debug, fix the files, or raise --max-errors"
        )


def check_random_weights(cfg: RunConfig, winfo: model.WeightsInfo) -> None:
    """Refuse random weights nobody asked for (``--weights random`` or
    ``--allow-random-weights``): features of random weights look like real ones."""
    if winfo.is_random and cfg.weights != "random" and not cfg.allow_random_weights:
        raise WeightsError(f"--weights {cfg.weights} gave random weights: {model.NO_FALLBACK_HINT}")


def run(
    cfg: RunConfig,
    *,
    progress: Progress | None = None,
    on_event: Callable[[str, dict], None] | None = None,
) -> dict:
    """Run the whole pipeline and return the ``run.json`` document.

    Parameters
    ----------
    progress
        Told how many images there are and advanced as partitions complete
        (:class:`fruitdask.progress.Progress`); the CLI draws a bar with it.
    on_event
        Called as ``on_event(name, data)`` at milestones (``listed``, ``cluster``), so the CLI
        can print statistics and the dashboard URL as soon as they are known.
    """
    emit = on_event or (lambda name, data: None)
    timer, started = StageTimer(), dt.datetime.now(dt.UTC)
    # Decided on this machine, before anything is touched, unless the model runs on other
    # machines (a remote Dask cluster): then the workers answer once the cluster is up.
    resolved = None if workers_elsewhere(cfg) else _resolve_precision(cfg.precision)
    if resolved:  # a local cluster's workers start warming up with it
        cfg = dataclasses.replace(cfg, precision=resolved.precision)
    # Nothing is read or written before every location passes the region guard.
    storage.guard_regions([cfg.input, cfg.output, cfg.weights], cfg.storage)
    storage_options = cfg.storage.storage_options()
    target = storage.OutputTarget.open(cfg.output, storage_options, cfg.overwrite, lease_ttl=cfg.storage.lock_ttl)
    backend = make_backend(cfg, target, progress or Progress())
    # A weights file is read with h5py in a fraction of a second: read it before any cluster
    # starts, so a bad file fails at once. Random (or downloaded ImageNet) weights need Keras
    # on the client: that import overlaps the workers' warm-up instead.
    loaded = _load_weights(cfg, timer, storage_options) if cfg.weights not in model.WEIGHTS_CHOICES else None
    with ExitStack() as engine:
        if backend.starts_early:
            # The cluster is up and its workers warm up (TensorFlow, VGG16) while the client
            # lists the images (and makes the weights when they are not a file).
            _start(backend, engine, timer, emit)
            if resolved is None:  # the workers run elsewhere: they answer for their hardware
                resolved = _resolve_precision(cfg.precision, backend)
                cfg = dataclasses.replace(cfg, precision=resolved.precision)
            backend.warm_up(engine, cfg.precision)
        listing, rejected = _list_images(cfg, timer, emit, storage_options)
        weights, winfo = loaded or _load_weights(cfg, timer, storage_options)
        with storage.committed(target):
            settings = FeatureSettings.from_config(cfg, winfo.sha256)
            done = _featurize_reduce_write(backend, timer, emit, listing, (weights, winfo), settings)
            errors = pd.concat([rejected, done.errors], ignore_index=True) if len(rejected) else done.errors
            n_listed = len(listing) + len(rejected)
            check_errors(cfg, n_listed, len(errors))
            record = output.RunRecord(
                cfg=cfg, run_id=target.run_id, started=started, timer=timer, n_listed=n_listed, n_images=len(listing),
                per_label=label_counts(listing), errors=errors, rows=done.rows, reduction=done.reduction,
                cluster=backend.cluster, precision=resolved.to_dict(), weights=winfo,
                warnings=[winfo.warning] if winfo.warning else [], extra=backend.extra,
            )
            doc = _write_outputs(record, target, timer, storage_options)
    # Committed: the featurized partitions kept for --resume are not needed any more.
    checkpoint.clear(cfg.output, storage_options)
    return doc


def _resolve_precision(requested: str, backend: Backend | None = None) -> precision.Resolved:
    """Resolve ``--precision`` once (auto -> float32 or bfloat16; bfloat16 refused where it
    would be emulated) so that every worker, checkpoint and record sees the same one: on
    this machine, or by the backend's workers when they run elsewhere."""
    resolved = backend.resolve_precision(requested) if backend else precision.detect_and_resolve(requested)
    if requested != "float32":
        logger.info("precision %s (%s)", resolved.precision, resolved.reason)
    return resolved


def _load_weights(cfg: RunConfig, timer: StageTimer, storage_options: dict) -> tuple[list, model.WeightsInfo]:
    with timer.stage("weights"):
        loaded = model.load_weights(
            cfg.weights, image_size=cfg.image_size, seed=cfg.seed, storage_options=storage_options,
            allow_random=cfg.allow_random_weights,
        )
    check_random_weights(cfg, loaded[1])
    return loaded


def _start(backend: Backend, stack: ExitStack, timer: StageTimer, emit: Callable[[str, dict], None]) -> None:
    """Start the engine (closed with ``stack``) and report the cluster."""
    with timer.stage("startup"):
        backend.start(stack)
    emit("cluster", backend.describe())


def _list_images(cfg: RunConfig, timer: StageTimer, emit: Callable[[str, dict], None],
                 storage_options: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The images to featurize and the files refused from the listing alone (over-size
    files, links out of the input root)."""
    with timer.stage("listing"):
        listing, rejected = storage.scan_images(cfg.input, storage_options, cfg.max_file_bytes)
    if listing.empty:
        raise InputError(
            f"every one of the {len(rejected)} images under {cfg.input!r} was refused before reading "
            f"(first: {rejected['path'].iloc[0]}: {rejected['reason'].iloc[0]})"
        )
    per_label = label_counts(listing)
    emit("listed", {"images": len(listing), "labels": len(per_label), "per_label": per_label})
    return listing, rejected


@dataclass
class _Written:
    rows: int
    errors: pd.DataFrame
    reduction: Reduction


def _featurize_reduce_write(backend: Backend, timer: StageTimer, emit: Callable[[str, dict], None],
                            listing: pd.DataFrame, weights: tuple[list, model.WeightsInfo], settings: FeatureSettings) -> _Written:
    """The backend's steps, each in its stage, then the row check. A backend that starts
    late (Spark) starts here, once the output is locked, and stops once the dataset is written."""
    with ExitStack() as late:
        if not backend.starts_early:
            _start(backend, late, timer, emit)
            backend.warm_up(late, settings.precision)
        with backend.running():
            done, written = _stages(backend, timer, listing, weights, settings)
    if written != done.rows:
        raise OutputError(f"wrote {written} rows but featurized {done.rows}: the output is incomplete, run again")
    return done


def _stages(backend: Backend, timer: StageTimer, listing: pd.DataFrame, weights: tuple[list, model.WeightsInfo],
            settings: FeatureSettings) -> tuple[_Written, int]:
    # The backend's handle on the featurized rows ends with this function: the cluster
    # releases them before the backend cleans up after its steps.
    with timer.stage("broadcast"):
        backend.prepare(listing, *weights)
    with timer.stage("featurize"):
        feats = backend.featurize(settings)
    with timer.stage("pca"):
        reduction = backend.reduce(feats)
    with timer.stage("write"):
        written = backend.write(feats, reduction)
    return _Written(feats.rows, feats.errors, reduction), written


def _write_outputs(record: output.RunRecord, target: storage.OutputTarget, timer: StageTimer,
                   storage_options: dict) -> dict:
    """``errors.parquet``, ``reduction.npz``, ``scree.png``, ``run.json`` and the report."""
    reduction, cfg = record.reduction, record.cfg
    with timer.stage("write"):
        target.write_bytes(output.ERRORS, output.errors_parquet(record.errors))
        target.write_bytes(output.REDUCTION, reduction.to_npz())
        target.write_bytes(output.SCREE, scree_png(reduction, f"Scree plot ({cfg.backend}, {record.n_images} images)"))
    doc = record.write(target)
    # Built from the record just written and the staged files, committed with them.
    target.write_bytes(output.REPORT, report.build_report(doc, target.staging, storage_options))
    return doc
