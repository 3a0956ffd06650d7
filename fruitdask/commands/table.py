"""``fruitdask table``: the life of an output's features table (Delta Lake).

::

    fruitdask table history OUTPUT [--limit N]        versions, newest first, with what each run did
    fruitdask table vacuum OUTPUT [--retain-hours H]  delete files no recent version needs (--dry-run)
    fruitdask table compact OUTPUT [--target-mb MB]   merge the small files daily runs leave
    fruitdask table show OUTPUT [--version V]         rows, labels, PCA fit of a version (time travel)

Each prints a table for people; --json prints one JSON document instead.
"""

from __future__ import annotations

import argparse
import json

from fruitdask.commands.options import add_quiet_debug, add_storage_options, storage_settings

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
                   help=f"vacuum: keep the files versions of the last H hours need (default: {DEFAULT_RETAIN_HOURS}, a week)")
    p.add_argument("--dry-run", action="store_true", help="vacuum: list what would be deleted, delete nothing")
    p.add_argument("--target-mb", type=float, default=128.0, help="compact: target size of a data file (default: 128)")
    p.add_argument("--version", dest="table_version", type=int, help="show: this version instead of the latest")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout instead of text")
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
        if args.retain_hours < 0:
            raise ConfigError(f"--retain-hours must be 0 or more, got {args.retain_hours:g}")
        files = delta.vacuum(args.output, so, int(args.retain_hours), args.dry_run)
        result = {"dry_run": args.dry_run, "retain_hours": args.retain_hours, "files": files}
    elif args.action == "compact":
        if not args.target_mb > 0:
            raise ConfigError(f"--target-mb must be positive, got {args.target_mb:g}")
        result = delta.compact(args.output, so, int(args.target_mb * 2**20))
    else:
        result = delta.summary(args.output, so, args.table_version)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif not args.quiet:
        print(TEXT[args.action](result))
    return 0


def history_text(rows: list[dict]) -> str:
    """One line per version, newest first: what the commit did, ``-`` where it does not say."""
    head = ("version", "time (UTC)", "action", "run", "added", "updated", "removed", "unchanged", "rows", "files +/-",
            "pca fit")
    lines = [head]
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


TEXT = {"history": history_text, "show": show_text, "vacuum": vacuum_text, "compact": compact_text}


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _utc(ms: int | None) -> str:
    import datetime

    if ms is None:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
