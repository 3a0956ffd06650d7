"""``fruitdask run``: bring the output's features table up to date with the input."""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING

from fruitdask.commands.options import add_run_options, config_from_args
from fruitdask.config import RunConfig

if TYPE_CHECKING:  # the pipeline is imported after the early start (see execute)
    from fruitdask.pipeline import RunResult

logger = logging.getLogger("fruitdask")

#: Exit codes of ``run`` (see ``fruitdask run --help`` and docs/faults.md). 1, 2 and 3 come
#: from the ``exit_code`` of the :mod:`fruitdask.errors` classes, 130 and 143 from
#: :mod:`fruitdask.cli`.
EXIT_OK = 0
#: The dataset was committed, but some files were skipped (listed in errors.parquet).
EXIT_SKIPPED = 4

RUN_EPILOG = """exit codes:
  0    success: the table holds every listed image (or was up to date already)
  4    success with skipped files: the table is committed, the unusable images are
       listed in OUTPUT/errors.parquet and counted in run.json (treat as success with
       a warning; --max-errors turns too many of them into exit 3; --skipped-ok
       makes it 0)
  1    failure (input, output, storage, weights, cluster, another run committed
       first, other feature settings than the table's, a listing that misses more
       of the table than --max-remove-fraction allows, two files with one key);
       nothing committed
  2    bad flag or configuration value
  3    more unusable images than --max-errors allows; nothing committed
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM): cluster closed, nothing committed
"""

#: How the dispatcher builds this command's parser (``help`` comes from its table).
PARSER_KWARGS = {
    "description": "Bring the output's features table (Delta Lake) up to date with the input: featurize new and "
                   "changed images, remove the rows of deleted ones, commit one table version. With no flags it "
                   "processes the bundled sample on a local cluster.",
    "epilog": RUN_EPILOG,
    "formatter_class": argparse.RawDescriptionHelpFormatter,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_options(p)


def _on_event(name: str, data: dict) -> None:
    if name == "listed":
        logger.info("%d images, %d labels", data["images"], data["labels"])
        for label, n in data["per_label"].items():
            logger.info("  %-24s %6d", label, n)
    elif name == "planned":
        logger.info("against the table: %d new, %d changed, %d removed, %d unchanged; %d to featurize",
                    data["added"], data["updated"], data["removed"], data["unchanged"], data["to_featurize"])
    elif name == "cluster":
        logger.info("cluster: %s workers, %s threads; dashboard: %s",
                    data.get("n_workers"), data.get("threads"), data.get("dashboard"))


def command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    return summarize(cfg, execute(cfg))


def execute(cfg: RunConfig) -> RunResult:
    """Bring the table up to date (``pipeline.run``); what the run did."""
    from fruitdask.commands.startup import workers_started_early

    with workers_started_early(cfg):  # before the pipeline's imports: the workers' overlap them
        from fruitdask import pipeline
        from fruitdask.progress import progress_bar

        target = pipeline.output_target(cfg)  # from here on the output is this object, not the flag
        # The bar starts with the featurization, after the cluster line (dashboard URL) is printed.
        return pipeline.run(cfg, target=target, progress=progress_bar(cfg.quiet), on_event=_on_event)


def summarize(cfg: RunConfig, result: RunResult, print_json: bool = True) -> int:
    """Log what the run did (and print its JSON line unless quiet); ``run``'s exit code."""
    counts, url = result.counts, result.output
    if result.up_to_date:
        if not cfg.quiet and print_json:
            rekeyed = {k: counts[k] for k in ("rekeyed", "duplicates_dropped") if k in counts}
            print(json.dumps({"output": url, "up_to_date": True, "version": result.version_after, **rekeyed}))
        return EXIT_OK
    for w in result.warnings:
        logger.warning("WARNING: %s", w)
    logger.info(
        "table version %s -> %s: %d added, %d updated, %d removed, %d unchanged (%d skipped); %d rows; PCA fit %s "
        "(K=%d, %.1f%% variance%s); %.2f images/s featurizing, %.1fs in all",
        result.version_before, result.version_after, counts["added"], counts["updated"], counts["removed"],
        counts["unchanged"], counts["errors"], result.rows, result.pca_fit, result.k, 100 * (result.variance_reached or 0),
        ", refitted" if result.refitted else "", result.images_per_second or 0, result.duration_s,
    )
    from fruitdask.report.page import report_location

    report_path = report_location(url)
    logger.info("report: %s", report_path)
    if not cfg.quiet and print_json:
        print(json.dumps({"output": url, "rows": result.rows, "version": result.version_after,
                          "added": counts["added"], "updated": counts["updated"], "removed": counts["removed"],
                          "k": result.k, "report": report_path}))
    return EXIT_SKIPPED if counts["errors"] and not cfg.skipped_ok else EXIT_OK
