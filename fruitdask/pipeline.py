"""The run, stage by stage: list, count, load weights, featurize + reduce (backend), write.

Backend-independent steps live here so both backends produce the same files:
``features/`` (Parquet), ``errors.parquet``, ``reduction.npz``, ``scree.png`` and
``run.json``, committed atomically by :class:`fruitdask.storage.OutputTarget`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
from collections.abc import Callable

import pandas as pd

from fruitdask import __version__, checkpoint, storage
from fruitdask.backends import RunContext, get_backend, open_backend
from fruitdask.config import RunConfig
from fruitdask.errors import InputError, TooManyErrors, WeightsError
from fruitdask.features import model, precision
from fruitdask.progress import Progress
from fruitdask.reduce import scree_png
from fruitdask.report import page as report
from fruitdask.runinfo import StageTimer, label_counts, versions

logger = logging.getLogger(__name__)


def _errors_parquet(errors: pd.DataFrame) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {c: pa.array(errors[c].astype(object).tolist() if len(errors) else [], type=pa.string()) for c in ("path", "label", "stage", "reason")}
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


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
    timer = StageTimer()
    started = dt.datetime.now(dt.UTC)
    storage_options = cfg.storage.storage_options()

    # Resolved once here (auto -> float32 or bfloat16; bfloat16 refused where it would be
    # emulated) so that every worker, checkpoint and record sees the same precision.
    resolved = precision.detect_and_resolve(cfg.precision)
    if cfg.precision != "float32":
        logger.info("precision %s (%s)", resolved.precision, resolved.reason)
    cfg = dataclasses.replace(cfg, precision=resolved.precision)

    # Nothing is read or written before every location passes the region guard.
    storage.guard_regions([cfg.input, cfg.output, cfg.weights], cfg.storage)
    target = storage.OutputTarget.open(cfg.output, storage_options, cfg.overwrite)

    def load_weights():
        with timer.stage("weights"):
            loaded = model.load_weights(
                cfg.weights, image_size=cfg.image_size, seed=cfg.seed, storage_options=storage_options,
                allow_random=cfg.allow_random_weights,
            )
        check_random_weights(cfg, loaded[1])
        return loaded

    # A weights file is read with h5py in a fraction of a second: read it before any cluster
    # starts, so a bad file fails at once. Random (or downloaded ImageNet) weights need Keras
    # on the client: that import overlaps the workers' warm-up instead.
    from_file = cfg.weights not in model.WEIGHTS_CHOICES
    if from_file:
        weights, winfo = load_weights()
    with open_backend(cfg, timer, lambda shape: emit("cluster", shape)) as session:
        # The cluster is up and its workers warm up (TensorFlow, VGG16) while the client
        # lists the images (and makes the weights when they are not a file).
        with timer.stage("listing"):
            # Over-size files and links out of the input root are refused from the listing alone.
            listing, rejected = storage.scan_images(cfg.input, storage_options, cfg.max_file_bytes)
        n_listed = len(listing) + len(rejected)
        if listing.empty:
            raise InputError(
                f"every one of the {n_listed} images under {cfg.input!r} was refused before reading "
                f"(first: {rejected['path'].iloc[0]}: {rejected['reason'].iloc[0]})"
            )
        per_label = label_counts(listing)
        emit("listed", {"images": len(listing), "labels": len(per_label), "per_label": per_label})
        if not from_file:
            weights, winfo = load_weights()
        warnings = [winfo.warning] if winfo.warning else []

        backend = get_backend(cfg.backend)
        ctx = RunContext(
            cfg=cfg,
            listing=listing,
            weights=weights,
            weights_info=winfo,
            target=target,
            timer=timer,
            progress=progress or Progress(),
            on_cluster=lambda shape: emit("cluster", shape),
            session=session,
        )
        with storage.committed(target):
            result = backend(ctx)
            errors = pd.concat([rejected, result.errors], ignore_index=True) if len(rejected) else result.errors
            n_errors = len(errors)
            check_errors(cfg, n_listed, n_errors)
            with timer.stage("write"):
                target.write_bytes("errors.parquet", _errors_parquet(errors))
                target.write_bytes("reduction.npz", result.reduction.to_npz())
                target.write_bytes("scree.png", scree_png(result.reduction, f"Scree plot ({cfg.backend}, {len(listing)} images)"))
            doc = _run_record(cfg, target, timer, started, n_listed, n_errors, errors, per_label, listing, result,
                              resolved, winfo, warnings)
            target.write_json("run.json", doc)
            # Built from the record just written and the staged files, committed with them.
            target.write_bytes(report.REPORT_NAME, report.build_report(doc, target.staging, storage_options))
    # Committed: the featurized partitions kept for --resume are not needed any more.
    checkpoint.clear(cfg.output, storage_options)
    return doc


def _run_record(cfg, target, timer, started, n_listed, n_errors, errors, per_label, listing, result,
                resolved, winfo, warnings) -> dict:
    """The ``run.json`` document."""
    featurize_s = timer.stages.get("featurize", 0.0)
    return {
        "fruitdask_version": __version__,
        "run_id": target.run_id,
        "backend": cfg.backend,
        "input": cfg.input,
        "output": cfg.output,
        "started_at": started.isoformat(),
        "duration_s": round(timer.total, 3),
        "counts": {
            "images_listed": n_listed,
            "labels": len(per_label),
            "rows_written": result.rows,
            "errors": n_errors,
        },
        "per_label": per_label,
        "errors_by_stage": {str(k): int(v) for k, v in errors["stage"].value_counts().items()} if n_errors else {},
        "reduction": result.reduction.summary(),
        "timings_s": {k: round(v, 3) for k, v in timer.stages.items()},
        "images_per_second": {
            "featurize": round(len(listing) / featurize_s, 3) if featurize_s else None,
            "overall": round(len(listing) / timer.total, 3),
        },
        "cluster": result.cluster,
        "precision": resolved.to_dict(),
        "weights": {
            "requested": winfo.requested,
            "kind": winfo.kind,
            "source": winfo.source,
            "sha256": winfo.sha256,
            "file_sha256": winfo.file_sha256,
            "random": winfo.is_random,
            "warning": winfo.warning,
        },
        "warnings": warnings,
        "extra": result.extra,
        "versions": versions(),
        "config": cfg.to_dict(),
        "files": {
            "features": "features/",
            "errors": "errors.parquet",
            "reduction": "reduction.npz",
            "scree": "scree.png",
            "performance_report": result.extra.get("performance_report"),
            "report": report.REPORT_NAME,
        },
    }
