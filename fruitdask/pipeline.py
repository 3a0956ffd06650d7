"""The run, stage by stage: list and diff against the table, load weights, featurize,
(re)fit the PCA, commit one table version, then publish the run's record beside it
(:mod:`fruitdask.output` owns the output's layout, its names and the publishing).

A run with nothing to do (no new, changed or removed image, same settings) says so after
the listing and exits: no cluster is started, no TensorFlow imported, nothing is written.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from fruitdask import checkpoint, output, storage
from fruitdask.backends import make_backend, workers_elsewhere
from fruitdask.backends.base import Backend
from fruitdask.config import RunConfig, input_root
from fruitdask.errors import FruitdaskError, InputError, TooManyErrors, WeightsError
from fruitdask.features import model, precision
from fruitdask.features.settings import FeatureSettings, differences
from fruitdask.features.weights_file import WeightsArrays, WeightsFile, WeightsSource
from fruitdask.lake import keys, migrate, rekey, tasks, update
from fruitdask.lake import plan as lake_plan
from fruitdask.lake import table as delta
from fruitdask.progress import Progress
from fruitdask.reduce import Reduction
from fruitdask.report import page as report
from fruitdask.report import plots
from fruitdask.runinfo import StageTimer
from fruitdask.schema import ERROR_COLUMNS

logger = logging.getLogger(__name__)


def _scree_png(r: Reduction, title: str) -> bytes:
    return plots.scree_png(r.explained_variance_ratio, k=r.k, variance_target=r.variance_target, title=title)


#: The report's drawings a publish writes (the output sits below the report: it receives them).
PAGES = output.Pages(scree=_scree_png, report=report.build_report)


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


def output_target(cfg: RunConfig) -> storage.OutputTarget:
    """The run's output, resolved once from ``--output``: every location the run reads or
    writes passes the region guard first, then the target (writes nothing) is what every
    later step writes through."""
    storage.guard_regions([cfg.input, cfg.output, cfg.weights], cfg.storage)
    return storage.OutputTarget.for_update(cfg.output, storage.storage_options(cfg.storage), lease_ttl=cfg.storage.lock_ttl,
                                           lock_wait=cfg.storage.lock_wait)


@dataclass(frozen=True)
class RunResult:
    """What a run did, as :func:`run` returns it (its record is ``run.json``, published
    beside the table; an up-to-date run publishes none).

    ``counts`` are ``run.json``'s counts (``added``, ``updated``, ``removed``,
    ``unchanged``, ``errors`` ... of images); ``rows`` the table's rows after the run, and
    the PCA fields (``k``...) those of its fit, None for a run with nothing to do.
    """

    run_id: str
    output: str
    up_to_date: bool
    version_before: int | None
    version_after: int | None
    counts: Mapping[str, int]
    duration_s: float
    timings_s: Mapping[str, float]
    rows: int | None = None
    pca_fit: str | None = None
    refitted: bool = False
    k: int | None = None
    variance_reached: float | None = None
    pca_method: str | None = None
    images_per_second: float | None = None  # featurizing
    warnings: tuple[str, ...] = ()
    cluster: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None

    @classmethod
    def of(cls, doc: Mapping[str, Any], output_url: str) -> RunResult:
        """From the run's record (``run.json``'s document, or an up-to-date run's summary)."""
        table, red = doc["table"], doc.get("reduction") or {}
        return cls(
            run_id=doc["run_id"], output=output_url, up_to_date=bool(doc.get("up_to_date")),
            version_before=table.get("version_before"), version_after=table.get("version_after"),
            counts=dict(doc["counts"]), duration_s=doc["duration_s"], timings_s=dict(doc["timings_s"]),
            rows=table.get("rows"), pca_fit=table.get("pca_fit"), refitted=bool(table.get("refitted")),
            k=red.get("k"), variance_reached=red.get("variance_reached"), pca_method=red.get("method"),
            images_per_second=(doc.get("images_per_second") or {}).get("featurize"),
            warnings=tuple(doc.get("warnings") or ()), cluster=dict(doc.get("cluster") or {}),
            extra=dict(doc.get("extra") or {}), weights_sha256=(doc.get("weights") or {}).get("sha256"),
        )


def run(
    cfg: RunConfig,
    *,
    target: storage.OutputTarget | None = None,
    progress: Progress | None = None,
    on_event: Callable[[str, dict], None] | None = None,
) -> RunResult:
    """Bring the output's features table up to date with the input; return what it did.

    Parameters
    ----------
    target
        The output, when the caller resolved it already (:func:`output_target`).
    progress
        Told how many images there are to featurize and advanced as partitions complete.
    on_event
        Called as ``on_event(name, data)`` at milestones (``listed``, ``planned``,
        ``cluster``), so the CLI can print statistics and the dashboard URL as soon as known.
    """
    emit = on_event or (lambda name, data: None)
    cfg = dataclasses.replace(cfg, input=input_root(cfg.input))  # as build_config does; a RunConfig made by hand too
    timer, started = StageTimer(), dt.datetime.now(dt.timezone.utc)
    # Decided on this machine unless the model runs elsewhere (then the workers answer).
    resolved = None if workers_elsewhere(cfg) else _resolve_precision(cfg.precision)
    # What decides the features, as one value from here on (the weights' digest comes later).
    settings = FeatureSettings.from_config(cfg, precision=resolved.precision if resolved else None)
    # Nothing is read or written before every location passes the region guard.
    target = target or output_target(cfg)
    with ExitStack() as stack:
        target.lock()  # the table is read, and an old output replaced, under the output's lock
        stack.callback(target.unlock)
        target.remove_stale_staging()
        stack.callback(target.abort)  # the run's staging (manifest, weights copy) goes either way
        with timer.stage("table"):
            state = open_output(target, cfg.overwrite)
            check_format(state, target, replacing=cfg.rebuild or cfg.overwrite)
            delta.describe(state)  # a table from before its description: described once, in place
            state = state if cfg.rebuild else migrate.add_columns(state, target)  # columns declared since: filled in place
        settings = _with_runtime(cfg, settings, state)
        if resolved is not None and resolved.precision != settings.precision:  # auto kept the table's
            resolved = precision.Resolved(cfg.precision, settings.precision, f"auto: the table's ({settings.runtime})")
        backend = make_backend(cfg, target, progress or Progress())
        doc = _Run(cfg, target, settings, backend, state, timer, emit, started, resolved).go(stack)
        return RunResult.of(doc, target.url)
    raise AssertionError("unreachable")  # pragma: no cover


def _with_runtime(cfg: RunConfig, settings: FeatureSettings, state: delta.TableState) -> FeatureSettings:
    """``settings`` with the runtime :func:`fruitdask.features.runtimes.choice.choose` picks
    (and, on an OpenVINO table, the precision and calibration set the table recorded)."""
    from fruitdask.features.runtimes import choice, openvino

    recorded = state.description.feature_settings if state.exists and state.description is not None else None
    chosen = choice.choose(cfg.runtime, cfg.precision, recorded, replacing=cfg.rebuild or cfg.overwrite,
                           openvino_installed=openvino.available())
    if chosen.runtime != "tensorflow" or cfg.runtime != "auto":
        logger.info("runtime %s (%s)", chosen.runtime, chosen.reason)
    if chosen.runtime == "tensorflow":
        return settings
    s = dataclasses.replace(settings, runtime=chosen.runtime, calibration=chosen.calibration)
    return s.with_precision(chosen.precision) if chosen.precision != "auto" else s


def _resolve_precision(requested: str, backend: Backend | None = None) -> precision.Resolved:
    resolved = backend.resolve_precision(requested) if backend else precision.detect_and_resolve(requested)
    if requested != "float32":
        logger.info("precision %s (%s)", resolved.precision, resolved.reason)
    return resolved


def open_output(target: storage.OutputTarget, overwrite: bool) -> delta.TableState:
    """The output's table. A folder with other files than a run writes is refused; an output
    from before the table (Parquet parts and ``_SUCCESS``, no ``_delta_log``) is replaced only
    with ``overwrite``; what a first run killed before its commit left is reused."""
    url, storage_options = target.url, dict(target.storage_options)
    state = delta.open_table(url, storage_options)
    if state.exists:
        return state
    fs, path = target.fs_path
    if fs.isfile(path):
        raise InputError(f"output {url!r} is a file: choose another --output (a folder or prefix)")
    try:
        names = {n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)} if fs.isdir(path) else set()
    except FileNotFoundError:
        names = set()
    foreign = sorted(n for n in names - output.OUTPUT_NAMES if not n.startswith("."))
    if foreign:
        raise InputError(f"output {url!r} holds files fruitdask does not write ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}): choose another --output")
    if not names & {output.SUCCESS_MARKER, output.RUN_JSON}:
        return state  # empty, or left by a first run that never committed: its files are unreferenced
    if not overwrite:
        raise InputError(
            f"output {url!r} holds a fruitdask output from before the features table (Parquet parts, no "
            f"features/_delta_log): pass --overwrite to replace it with a table, or choose another --output"
        )
    logger.warning("replacing the pre-table output at %s (--overwrite)", url)
    storage.remove_prefix(delta.table_url(url), storage_options)
    return state


class _Run:
    """One run's state between its stages (see :func:`run`). After :func:`run`, each value
    has one carrier: the output is ``target``, what decides the features is ``settings``
    (precision resolved, weights' digest added once read), the weights are a
    :class:`~fruitdask.features.weights_file.WeightsSource` from the backend."""

    def __init__(self, cfg: RunConfig, target: storage.OutputTarget, settings: FeatureSettings, backend: Backend,
                 state: delta.TableState, timer: StageTimer, emit: Callable, started: dt.datetime,
                 resolved: precision.Resolved | None) -> None:
        self.cfg, self.target, self.settings, self.backend, self.state = cfg, target, settings, backend, state
        self.timer, self.emit, self.started, self.resolved = timer, emit, started, resolved
        self.so = dict(target.storage_options)
        self.engine_started = False
        self.rekeyed = rekey.Rekeyed()

    def go(self, stack: ExitStack) -> dict:
        # A first run's workers warm up while the client lists; an update lists first, so
        # that a run with nothing to do starts nothing.
        if self.backend.starts_early and not self.state.exists:
            self._start(stack)
        loaded = self._known_weights() or (self._load_weights() if self.cfg.weights not in model.WEIGHTS_CHOICES else None)
        self._rekey()
        spill = stack.enter_context(lake_plan.spill_dir())
        plan = self._plan(spill)
        cfg = self.cfg
        if not (plan.changes_table or cfg.refit or cfg.rebuild or self._settings_changed(loaded)):
            return self._up_to_date(plan)
        if not self.engine_started:
            self._start(stack)  # a remote cluster's workers resolve the precision here
        weights, winfo = loaded or self._load_weights()
        settings = self.settings = self.settings.with_weights(winfo.sha256)
        fp = keys.settings_fingerprint(settings)
        check_settings(self.state, fp, settings, self.target, replacing=cfg.rebuild or cfg.overwrite)
        if fp == self._table_settings().get("fingerprint") and not (plan.changes_table or cfg.refit or cfg.rebuild):
            return self._up_to_date(plan)  # the settings only looked different (e.g. another path to the same file)
        with self.backend.running():
            with self.timer.stage("broadcast"):
                source = self.backend.prepare(weights, winfo)
            outcome = update.apply(self.backend, plan, self.state, self._request(plan, fp, winfo), settings, source,
                                   self.timer)
        checkpoint.clear(self.target)
        return self._record(plan, outcome, winfo)

    def _start(self, stack: ExitStack) -> None:
        with self.timer.stage("startup"):
            self.backend.start(stack, self.settings)
        self.emit("cluster", self.backend.describe())
        if self.resolved is None:  # the workers run elsewhere: they answer for their hardware
            self.resolved = _resolve_precision(self.settings.precision, self.backend)
            self.settings = self.settings.with_precision(self.resolved.precision)
        self.backend.warm_up(stack, self.settings)
        self.engine_started = True

    def _load_weights(self) -> tuple[WeightsArrays, model.WeightsInfo]:
        cfg = self.cfg
        with self.timer.stage("weights"):
            arrays, info = model.load_weights(cfg.weights, image_size=self.settings.image_size, seed=cfg.seed,
                                              storage_options=self.so, allow_random=cfg.allow_random_weights)
        check_random_weights(cfg, info)
        return WeightsArrays.of(arrays, info.sha256), info

    def _rekey(self) -> None:
        """A table keyed otherwise than relative to this input root (written before keys were,
        or against another root) is re-keyed first, in one commit of its own (lake.rekey)."""
        if not rekey.needs_rekey(self.state, self.cfg.input):
            return
        # Its own run id: the files it commits never look like this run's uncommitted ones.
        sink = tasks.Sink(delta.table_url(self.target.url), f"rekey-{self.target.run_id}",
                          str(self.state.meta.get("settings", "")), self.so)
        with self.timer.stage("rekey"):
            self.rekeyed = rekey.rekey(self.state, self.cfg.input, sink, self.target.ensure_held)
            if self.rekeyed.version_after is not None:
                self.state = delta.open_table(self.target.url, self.so)

    def _plan(self, spill: str) -> lake_plan.Plan:
        cfg = self.cfg
        with self.timer.stage("listing"):
            listed = lake_plan.list_input(cfg.input, self.so, cfg.max_file_bytes, spill, self.target.run_id)
            if not listed.n_images and not self.state.exists:
                first = listed.refused.iloc[0]
                raise InputError(f"every one of the {len(listed.refused)} images under {cfg.input!r} was refused "
                                 f"before reading (first: {first['path']}: {first['reason']})")
            self.emit("listed", {"images": listed.n_images, "labels": len(listed.per_label), "per_label": listed.per_label})
        self._calibrate(listed)
        with self.timer.stage("diff"):
            prior = read_errors(self.target) if self.state.exists else None
            plan = lake_plan.make_plan(
                listed, lake_plan.table_keys(self.state), prior, manifest_url=self.target.staging_path("manifest.parquet"),
                storage_options=self.so, part_size=self._part_size(listed.n_images), keep_deleted=cfg.keep_deleted,
                rebuild=cfg.rebuild or (cfg.overwrite and self.state.exists), max_remove_fraction=cfg.max_remove_fraction,
            )
        self.emit("planned", plan_counts(plan))
        return plan

    def _calibrate(self, listed: lake_plan.Listed) -> None:
        """int8 without a recorded calibration set (a table's first int8 run): a seeded
        per-label sample of the images this run lists, recorded in the settings."""
        s = self.settings
        if s.precision != "int8" or s.calibration:
            return
        import pyarrow.parquet as pq

        from fruitdask.features import calibration

        listing = pq.read_table(listed.spill, columns=["image_key", "label"])
        cal = calibration.sample(self.cfg.input, listing["image_key"].to_pylist(), listing["label"].to_pylist(), self.cfg.seed)
        logger.info("int8 calibration: %d images of %d labels (digest %s)", len(cal.keys), len(listed.per_label), cal.digest)
        self.settings = dataclasses.replace(s, calibration=cal.to_json())

    def _part_size(self, n_images: int) -> int:
        """Images per partition: ``--partition-size``, smaller when fewer images than threads."""
        threads = int(self.backend.cluster.get("threads") or 1) if self.engine_started else 1
        return max(1, min(self.cfg.partition_size, -(-n_images // max(threads, 1)) if n_images else 1))

    def _known_weights(self) -> tuple[WeightsFile, model.WeightsInfo] | None:
        """The weights as the table knows them, when ``--weights`` names a file whose bytes are
        those the table was last written with (same sha256): an update then decides whether it
        has anything to do without parsing the file, and nothing parses it on the client unless
        the weights must be staged for workers that cannot read it (see
        :func:`fruitdask.backends.dask.backend.weights_source`; a worker checks the content
        digest as it loads them). None otherwise: the file is read and checked in full."""
        old = self._table_settings()
        if self.cfg.weights in model.WEIGHTS_CHOICES or not old.get("weights_file_sha256"):
            return None
        with self.timer.stage("weights"):
            try:
                digest = storage.url_sha256(self.cfg.weights, self.so)
            except (OSError, FruitdaskError):  # unreadable now: the full load says why, in its own words
                return None
        if digest != old["weights_file_sha256"] or not old.get("weights_sha256"):
            return None
        cfg = self.cfg
        info = model.WeightsInfo(cfg.weights, "file", cfg.weights, old["weights_sha256"], file_sha256=digest)
        return WeightsFile(cfg.weights, info.sha256, self.so), info

    def _table_settings(self) -> dict:
        """The table's feature settings (its description), with their ``fingerprint``."""
        d = self.state.description
        return {**d.feature_settings, "fingerprint": d.settings} if d is not None else {}

    def _settings_changed(self, loaded: tuple[WeightsSource, model.WeightsInfo] | None) -> bool:
        """Whether this run's feature settings may differ from the table's (checked without
        loading weights: a weights file is hashed, a named choice compared by name and seed)."""
        old, cfg = self._table_settings(), self.cfg
        if not self.state.exists or not old:
            return False
        if "image_size" not in old or "pooling" not in old:
            return True  # only the fingerprint is known: the loaded weights' fingerprint decides
        was = FeatureSettings.from_dict(old)
        now = self.settings.with_weights(loaded[1].sha256 if loaded else was.weights_key)
        if self.resolved is None:  # a remote cluster's workers have not answered yet
            now = now.with_precision(was.precision)
        # A named choice (auto, imagenet, random) is not loaded yet: compared by its name and seed.
        seed_moved = loaded is None and cfg.weights in ("random", "auto") and old.get("seed") != cfg.seed
        return bool(differences(was, now)) or old.get("weights") != (loaded[1].requested if loaded else cfg.weights) or seed_moved

    def _request(self, plan: lake_plan.Plan, fp: str, winfo: model.WeightsInfo) -> update.Request:
        cfg, s = self.cfg, self.settings
        # The settings' own serialization, and where the weights came from (not what they are).
        feature_settings = {**s.to_dict(), "weights": winfo.requested, "weights_file_sha256": winfo.file_sha256,
                            "seed": cfg.seed}
        meta = {"run_id": self.target.run_id, "input": cfg.input, "settings": fp, "format": keys.TABLE_FORMAT,
                "keys": keys.KEYS_FORMAT, "key_root": cfg.input, "feature_settings": feature_settings}
        return update.Request(
            target=self.target, run_id=self.target.run_id, settings_fp=fp, components=cfg.components, variance=cfg.variance,
            refit=cfg.refit, rebuild=cfg.rebuild or (cfg.overwrite and self.state.exists), resume=cfg.resume,
            feature_dim=s.feature_dim, pca_batch_size=cfg.pca_batch_size, power_iterations=cfg.pca_power_iterations,
            seed=cfg.seed, meta=meta, description=delta.Description(keys.TABLE_FORMAT, fp, feature_settings),
            check=lambda errors: check_errors(cfg, plan.listed, len(plan.errors) + len(errors)),
            before_commit=self.target.ensure_held,
            record=lambda outcome: self._run_record(plan, outcome, winfo).document(),
        )

    def _up_to_date(self, plan: lake_plan.Plan) -> dict:
        output.republish(self.target, self.state, PAGES)
        counts = {**plan_counts(plan), **rekey_counts(self.rekeyed)}
        logger.info("the table is up to date with the input (version %s, %d images): nothing to do",
                    self.state.version, counts["unchanged"])
        refused = len(plan.errors) - int((plan.errors["stage"] != "list").sum()) if len(plan.errors) else 0
        if refused:
            logger.warning("%d listed files were refused before reading (see --max-file-mb; --debug for the reasons): "
                           "their rows stay in the table as they were", refused)
        return {"run_id": self.target.run_id, "up_to_date": True, "counts": {**counts, "featurized": 0},
                "table": {"version_before": self.state.version, **self._version_before(),
                          "version_after": self.state.version},
                "duration_s": round(self.timer.total, 3), "timings_s": dict(self.timer.stages)}

    def _version_before(self) -> dict:
        """The version this run read first, when its re-keying committed one before its own."""
        return {"version_before": self.rekeyed.version_before} if self.rekeyed.version_after is not None else {}

    def _record(self, plan: lake_plan.Plan, outcome: update.Outcome, winfo: model.WeightsInfo) -> dict:
        record = self._run_record(plan, outcome, winfo)
        with self.timer.stage("publish"):
            return output.publish(record, self.target, PAGES)

    def _run_record(self, plan: lake_plan.Plan, outcome: update.Outcome, winfo: model.WeightsInfo) -> output.RunRecord:
        errors = current_errors(plan, outcome, self.target.run_id)
        assert outcome.reduction is not None  # a run that committed projected its rows with a fit
        return output.RunRecord(
            # run.json's config shows the precision the features were made with, not "auto".
            cfg=dataclasses.replace(self.cfg, precision=self.settings.precision, runtime=self.settings.runtime), output_url=self.target.url,
            run_id=self.target.run_id, started=self.started, timer=self.timer, n_listed=plan.listed,
            n_images=outcome.featurized, per_label=plan.per_label, errors=errors, rows=outcome.added + outcome.updated,
            reduction=outcome.reduction, cluster=self.backend.cluster, precision=self.resolved.to_dict() if self.resolved else {},
            weights=winfo, features=self.settings, warnings=[winfo.warning] if winfo.warning else [], extra=self.backend.extra,
            lake={**lake_counts(plan, outcome), **rekey_counts(self.rekeyed), **self._version_before()},
        )


def check_format(state: delta.TableState, target: storage.OutputTarget, *, replacing: bool) -> None:
    """Refuse a table of another format than this fruitdask writes before anything is
    written: a newer one always (only a newer fruitdask may change it), an older one unless
    ``replacing`` it (``--rebuild`` rewrites it in this format)."""
    from fruitdask import __version__
    from fruitdask.errors import TableFormatError

    found = state.description.format if state.description is not None else keys.TABLE_FORMAT
    where = delta.table_url(target.url)
    if found > keys.TABLE_FORMAT:
        raise TableFormatError(
            f"the table at {where} was written by a newer fruitdask (table format {found}; fruitdask {__version__} "
            f"reads and writes format {keys.TABLE_FORMAT}): upgrade fruitdask to update it; nothing was written"
        )
    if found < keys.TABLE_FORMAT and not replacing:
        raise TableFormatError(
            f"the table at {where} was written by an older fruitdask (table format {found}, this one writes format "
            f"{keys.TABLE_FORMAT}): pass --rebuild to rewrite it in format {keys.TABLE_FORMAT}, or write to another --output"
        )


def check_settings(state: delta.TableState, fp: str, settings: FeatureSettings, target: storage.OutputTarget, *,
                   replacing: bool) -> None:
    """Refuse to mix features made with other settings into the table (unless ``replacing``
    it: ``--rebuild``, ``--overwrite``); the message names each setting that differs."""
    from fruitdask.errors import SettingsMismatchError

    table = state.description
    if not state.exists or table is None or table.settings == fp or replacing:
        return
    was = table.feature_settings
    known = {"image_size", "pooling", "weights_sha256"} <= set(was)  # else a table described from its rows
    differ = [d.between("in the table", "in this run") for d in differences(FeatureSettings.from_dict(was), settings)] if known else []
    if not differ:  # only the fingerprint is known (a table described from its rows), or the format's part of it
        differ = [f"settings fingerprint {table.settings} in the table, {fp} in this run"]
    raise SettingsMismatchError(
        f"the table at {delta.table_url(target.url)} holds features made with other settings than this run's "
        f"({'; '.join(differ)}): write to another --output, or pass --rebuild to featurize everything again "
        f"into a new version"
    )


def plan_counts(plan: lake_plan.Plan) -> dict:
    return {"listed": plan.listed, "added": plan.added, "updated": plan.updated, "removed": plan.removed,
            "unchanged": plan.unchanged, "to_featurize": plan.featurize, "errors_kept": len(plan.errors)}


def lake_counts(plan: lake_plan.Plan, outcome: update.Outcome) -> dict:
    """``run.json``'s table counts: what the run did to the table."""
    return {
        "listed": plan.listed, "added": outcome.added, "updated": outcome.updated, "removed": plan.removed,
        "unchanged": plan.unchanged, "featurized": outcome.featurized, "rows": outcome.rows,
        "version_before": outcome.version_before, "version_after": outcome.version_after, "pca_fit": outcome.fit_id,
        "refitted": outcome.refitted, "files_added": outcome.files_added, "files_removed": outcome.files_removed,
    }


def rekey_counts(done: rekey.Rekeyed) -> dict:
    """``rekeyed`` and ``duplicates_dropped`` for ``run.json``'s counts, when the run re-keyed
    the table, else nothing."""
    if done.version_after is None:
        return {}
    return {"rekeyed": done.rekeyed, "duplicates_dropped": done.duplicates_dropped}


def read_errors(target: storage.OutputTarget) -> pd.DataFrame | None:
    """The previous run's ``errors.parquet`` (None if it has none)."""
    try:
        df = storage.read_parquet(target.final_path(output.ERRORS), dict(target.storage_options))
    except (InputError, FileNotFoundError):
        return None
    except Exception as e:  # noqa: BLE001 - a damaged file only costs retries of its images
        logger.warning("cannot read the previous errors.parquet (%s): its images are retried", e)
        return None
    return df if set(ERROR_COLUMNS) <= set(df.columns) else None


def current_errors(plan: lake_plan.Plan, outcome: update.Outcome, run_id: str) -> pd.DataFrame:
    """Refused at listing, still failing from before, and failed in this run."""
    new = outcome.errors.assign(run_id=run_id)[ERROR_COLUMNS] if len(outcome.errors) else None
    frames_ = [f.astype(object) for f in (plan.errors, new) if f is not None and len(f)]
    return pd.concat(frames_, ignore_index=True)[ERROR_COLUMNS] if frames_ else pd.DataFrame(columns=ERROR_COLUMNS)
