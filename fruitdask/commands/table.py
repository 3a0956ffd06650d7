"""``fruitdask table``: the life of an output's features table (Delta Lake).

::

    fruitdask table history OUTPUT [--limit N]        versions, newest first, with what each run did
    fruitdask table vacuum OUTPUT [--retain-hours H]  delete files no recent version needs (--dry-run)
    fruitdask table compact OUTPUT [--target-mb MB]   merge the small files daily runs leave
                                                      (vacuum, compact: under the output's lock, --wait-lock S)
    fruitdask table show OUTPUT [--version V]         rows, labels, PCA fit of a version (time travel)

Each prints a table for people; --json prints one JSON document instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fruitdask.commands.options import add_quiet_debug, add_storage_options, add_wait_lock, storage_settings
from fruitdask.config import StorageSettings
from fruitdask.errors import ConfigError

logger = logging.getLogger("fruitdask")

#: Default retention of ``vacuum``: versions of the last week stay readable (Delta's default).
DEFAULT_RETAIN_HOURS = 168

PARSER_KWARGS = {
    "description": "The life of an output's features table: history, vacuum, compaction, a version's summary. "
                   "Old versions stay readable (time travel) until a vacuum removes the files they need.",
    "epilog": __doc__.split("::", 1)[1],
    "formatter_class": argparse.RawDescriptionHelpFormatter,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("history", "vacuum", "compact", "show"), help="what to do with the table")
    p.add_argument("output", metavar="OUTPUT", help="output folder or URI of `fruitdask run` (holds features/)")
    p.add_argument("--limit", type=int, help="history: newest N versions only (default: all)")
    p.add_argument("--retain-hours", type=float, default=DEFAULT_RETAIN_HOURS,
                   help=f"vacuum: keep the files versions of the last H whole hours need, and files younger than that "
                   f"no version names (default: {DEFAULT_RETAIN_HOURS}, a week)")
    p.add_argument("--dry-run", action="store_true", help="vacuum: list what would be deleted, delete nothing")
    p.add_argument("--target-mb", type=float, default=128.0, help="compact: target size of a data file (default: 128)")
    p.add_argument("--version", dest="table_version", type=int, help="show: this version instead of the latest")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout instead of text")
    add_wait_lock(p.add_argument_group("vacuum, compact: the output's lock"))
    add_storage_options(p)
    add_quiet_debug(p)


Action = Literal["history", "vacuum", "compact", "show"]


@dataclass(frozen=True)
class TableOptions:
    """What ``fruitdask table`` was asked, typed and checked: built from the flags in one place."""

    action: Action
    output: str
    storage: StorageSettings
    limit: int | None = None
    retain_hours: int = DEFAULT_RETAIN_HOURS
    dry_run: bool = False
    target_mb: float = 128.0
    table_version: int | None = None
    json: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        if not self.target_mb > 0:
            raise ConfigError(f"--target-mb must be positive, got {self.target_mb:g}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TableOptions:
        return cls(action=args.action, output=args.output, storage=storage_settings(args), limit=args.limit,
                   retain_hours=retain_hours(args.retain_hours), dry_run=bool(args.dry_run), target_mb=args.target_mb,
                   table_version=args.table_version, json=bool(args.json), quiet=bool(args.quiet))


def command(args: argparse.Namespace) -> int:
    return table(TableOptions.from_args(args))


def table(opts: TableOptions) -> int:
    """Do ``opts.action`` on the output's table; print the result (text, or JSON with ``--json``)."""
    from fruitdask import storage
    from fruitdask.lake import table as delta

    settings, output = opts.storage, opts.output
    storage.guard_regions([output], settings)
    so = storage.storage_options(settings)
    result: Any
    if opts.action == "history":
        result = delta.history(output, so, opts.limit)
    elif opts.action == "vacuum":
        files = under_lease(output, so, settings, "vacuum",
                            lambda: delta.vacuum(output, so, opts.retain_hours, opts.dry_run))
        result = {"dry_run": opts.dry_run, "retain_hours": opts.retain_hours, "files": files}
        if opts.json:  # the text output says it on stdout; beside JSON, a line for the people reading the log
            logger.info("%s %d files no version of the last %d hours needs", "would delete" if opts.dry_run else "deleted",
                        len(files), opts.retain_hours)
    elif opts.action == "compact":
        result = under_lease(output, so, settings, "compact", lambda: delta.compact(output, so, int(opts.target_mb * 2**20)))
    else:
        result = delta.summary(output, so, opts.table_version)
    if opts.json:
        print(json.dumps(result, indent=2, default=str))
    elif not opts.quiet:
        print(TEXT[opts.action](result))
    return 0


def retain_hours(value: float) -> int:
    """``--retain-hours`` as the whole hours delta-rs takes: a fraction is refused, never
    truncated (0.5 would have become 0 and deleted what versions of the last hour need)."""
    if not (value >= 0 and float(value).is_integer()):
        raise ConfigError(f"--retain-hours must be a whole number of hours, 0 or more, got {value:g}: delta-rs vacuums "
                          f"by whole hours; pass {max(0, int(value)) + 1} to keep a little more, or 0 to keep only "
                          "what the latest version needs")
    return int(value)


def under_lease(output: str, storage_options: dict[str, Any], settings: StorageSettings, action: str,
                work: Callable[[], Any]) -> Any:
    """Run ``work`` holding the output's lock, as a run does: no run commits meanwhile (a
    compaction carries the newest description; a vacuum never deletes a live run's files)
    and no run meets a half-done maintenance. Waits up to ``--wait-lock`` for a live holder."""
    from fruitdask import storage
    from fruitdask.config import check_lock_wait
    from fruitdask.lake import table as delta

    check_lock_wait(settings)
    delta.load(output, storage_options)  # no table, no lock (and no lock file beside a mistyped path)
    target = storage.OutputTarget.for_update(output, storage_options, run_id=f"table-{action}-{uuid.uuid4().hex[:8]}",
                                             lease_ttl=settings.lock_ttl, lock_wait=settings.lock_wait)
    target.lock()
    try:
        return work()
    finally:
        target.unlock()


def history_text(rows: list[dict]) -> str:
    """One line per version, newest first: what the commit did, ``-`` where it does not say."""
    head = ("version", "time (UTC)", "action", "run", "added", "updated", "removed", "unchanged", "rows", "files +/-",
            "pca fit")
    lines: list[tuple[str, ...]] = [head]
    for r in rows:
        files = "" if r["files_added"] is None and r["files_removed"] is None else f"+{r['files_added'] or 0} -{r['files_removed'] or 0}"
        fit = (r["pca_fit"] or "") + (" (new)" if r["new_fit"] else "")
        lines.append((str(r["version"]), _utc(r["timestamp"]), r["action"] or "", r["run_id"] or "",
                      *(_count(r[k]) for k in ("added", "updated", "removed", "unchanged", "rows")), files, fit))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    right = {0, 4, 5, 6, 7, 8}
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))).rstrip()
                     for line in lines)


def show_text(s: dict) -> str:
    meta = s.get("fruitdask") or {}
    lines = [f"version {s['version']}: {s['rows']} rows in {s['files']} files",
             f"PCA fits: {', '.join(s['pca_fits']) or '-'}",
             f"last run: {meta.get('run_id', '-')} (input {meta.get('input', '-')})", "labels:"]
    width = max((len(k) for k in s["labels"]), default=0)
    lines += [f"  {label.ljust(width)}  {n:>8}" for label, n in s["labels"].items()]
    return "\n".join(lines)


def vacuum_text(result: dict) -> str:
    verb = "would delete" if result["dry_run"] else "deleted"
    head = f"{verb} {len(result['files'])} files no version of the last {result['retain_hours']:g} hours needs"
    return "\n".join([head, *(f"  {f}" for f in result["files"])])


def compact_text(metrics: dict) -> str:
    if not metrics.get("numFilesRemoved"):
        return "nothing to compact: no two small files to merge"
    return f"compacted: {metrics['numFilesRemoved']} files merged into {metrics.get('numFilesAdded', 0)}"


TEXT: dict[str, Callable[[Any], str]] = {"history": history_text, "show": show_text, "vacuum": vacuum_text, "compact": compact_text}


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _utc(ms: int | None) -> str:
    import datetime

    if ms is None:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
