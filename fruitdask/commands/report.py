"""``fruitdask report OUTPUT``: rebuild the HTML page of a finished run (local or ``s3://``)."""

from __future__ import annotations

import argparse
import logging

from fruitdask.commands.options import add_quiet_debug, add_storage_options, storage_settings

logger = logging.getLogger("fruitdask")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="output folder or URI of a finished `fruitdask run` (holds run.json)")
    add_storage_options(p)
    add_quiet_debug(p)


def command(args: argparse.Namespace) -> int:
    from fruitdask import storage
    from fruitdask.report import page as report

    settings = storage_settings(args)
    storage.guard_regions([args.output], settings)
    report.rebuild(args.output, storage.storage_options(settings), settings=settings)
    if not args.quiet:
        print(report.report_location(args.output))
    return 0
