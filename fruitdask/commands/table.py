"""``fruitdask table``: the life of an output's features table (Delta Lake).

::

    fruitdask table history OUTPUT [--limit N]        versions, newest first, with what each run did
    fruitdask table vacuum OUTPUT [--retain-hours H]  delete files no recent version needs (--dry-run)
    fruitdask table compact OUTPUT [--target-mb MB]   merge the small files daily runs leave
                                                      (vacuum, compact: under the output's lock, --wait-lock S)
    fruitdask table show OUTPUT [--version V]         rows, labels, PCA fit of a version (time travel)
"""

from __future__ import annotations

import argparse
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from fruitdask.commands.options import add_quiet_debug, add_storage_options, add_wait_lock, storage_settings
from fruitdask.config import StorageSettings

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
    add_wait_lock(p.add_argument_group("vacuum, compact: the output's lock"))
    add_storage_options(p)
    add_quiet_debug(p)


def command(args: argparse.Namespace) -> int:
    from fruitdask import storage
    from fruitdask.errors import ConfigError
    from fruitdask.lake import table as delta

    settings = storage_settings(args)
    storage.guard_regions([args.output], settings)
    so = storage.storage_options(settings)
    if args.action == "history":
        result = delta.history(args.output, so, args.limit)
    elif args.action == "vacuum":
        hours = retain_hours(args.retain_hours)
        files = under_lease(args.output, so, settings, "vacuum", lambda: delta.vacuum(args.output, so, hours, args.dry_run))
        logger.info("%s %d files no version of the last %g hours needs", "would delete" if args.dry_run else "deleted",
                    len(files), args.retain_hours)
        result = {"dry_run": args.dry_run, "files": files}
    elif args.action == "compact":
        if not args.target_mb > 0:
            raise ConfigError(f"--target-mb must be positive, got {args.target_mb:g}")
        result = under_lease(args.output, so, settings, "compact",
                             lambda: delta.compact(args.output, so, int(args.target_mb * 2**20)))
    else:
        result = delta.summary(args.output, so, args.table_version)
    if not args.quiet:
        print(json.dumps(result, indent=2, default=str))
    return 0


def retain_hours(value: float) -> int:
    """``--retain-hours`` as the whole hours delta-rs takes: a fraction is refused, never
    truncated (0.5 would have become 0 and deleted what versions of the last hour need)."""
    from fruitdask.errors import ConfigError

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
