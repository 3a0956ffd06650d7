"""``fruitdask report OUTPUT``: rebuild the HTML page of a finished run (local or ``s3://``)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from fruitdask.commands.options import add_quiet_debug, add_storage_options, storage_settings
from fruitdask.config import StorageSettings

logger = logging.getLogger("fruitdask")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="output folder or URI of a finished `fruitdask run` (holds run.json)")
    add_storage_options(p)
    add_quiet_debug(p)


@dataclass(frozen=True)
class ReportOptions:
    """What ``fruitdask report`` was asked, typed: built from the flags in one place."""

    output: str
    storage: StorageSettings
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ReportOptions:
        return cls(output=args.output, storage=storage_settings(args), quiet=bool(args.quiet))


def command(args: argparse.Namespace) -> int:
    return report(ReportOptions.from_args(args))


def report(opts: ReportOptions) -> int:
    """Rebuild ``OUTPUT/report.html``; print where it is."""
    from fruitdask import storage
    from fruitdask.report import page

    storage.guard_regions([opts.output], opts.storage)
    page.rebuild(opts.output, storage.storage_options(opts.storage), settings=opts.storage)
    if not opts.quiet:
        print(page.report_location(opts.output))
    return 0
