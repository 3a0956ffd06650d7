"""``fruitdask report OUTPUT``: rebuild the HTML page of a finished run (local or ``s3://``)."""

from __future__ import annotations

import argparse
import logging
import os

from .config import StorageSettings, build_config

logger = logging.getLogger("fruitdask")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTPUT", help="output folder or URI of a finished `fruitdask run` (holds run.json)")
    g = p.add_argument_group("storage (s3://)")
    g.add_argument("--s3-endpoint", dest="storage_endpoint_url", help="S3 endpoint URL (default: AWS, or $AWS_ENDPOINT_URL)")
    g.add_argument("--aws-profile", dest="storage_profile", help="AWS profile name (default: the usual AWS credential chain)")
    g.add_argument("--aws-region", dest="storage_region", help="AWS region for the S3 client (default: from the AWS config)")
    g.add_argument("--allowed-regions", dest="storage_allowed_regions",
                   type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
                   help="comma-separated regions buckets may live in (default: the EU member-state regions)")
    g = p.add_argument_group("output")
    g.add_argument("--quiet", "-q", action="store_true", default=None, help="print nothing but errors")
    g.add_argument("--debug", action="store_true", default=None, help="verbose logs and tracebacks on errors")


def storage_settings(args: argparse.Namespace) -> StorageSettings:
    """Storage settings from flags over ``FRUITDASK_STORAGE_*``/AWS environment over defaults."""
    flags = {k: v for k, v in vars(args).items() if k.startswith("storage_")}
    return build_config({**flags, "input": args.output, "output": args.output}, os.environ).storage


def command(args: argparse.Namespace) -> int:
    from . import report, storage

    settings = storage_settings(args)
    storage.guard_regions([args.output], settings)
    report.rebuild(args.output, settings.storage_options(), settings=settings)
    if not args.quiet:
        print(report.report_location(args.output))
    return 0
