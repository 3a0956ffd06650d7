"""``fruitdask run``: the pipeline, from listing the images to the committed Parquet dataset."""

from __future__ import annotations

import argparse
import json
import logging

from fruitdask.commands.options import add_run_options, config_from_args

logger = logging.getLogger("fruitdask")

#: Exit codes of ``run`` (see ``fruitdask run --help`` and docs/faults.md). 1, 2 and 3 come
#: from the ``exit_code`` of the :mod:`fruitdask.errors` classes, 130 and 143 from
#: :mod:`fruitdask.cli`.
EXIT_OK = 0
#: The dataset was committed, but some files were skipped (listed in errors.parquet).
EXIT_SKIPPED = 4

RUN_EPILOG = """exit codes:
  0    success, every listed image was featurized
  4    success with skipped files: the dataset is committed, the unusable images are
       listed in OUTPUT/errors.parquet and counted in run.json (treat as success with
       a warning; --max-errors turns too many of them into exit 3; --skipped-ok
       makes it 0)
  1    failure (input, output, storage, weights, cluster); nothing committed
  2    bad flag or configuration value
  3    more unusable images than --max-errors allows; nothing committed
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM): cluster closed, nothing committed
"""

#: How the dispatcher builds this command's parser (``help`` comes from its table).
PARSER_KWARGS = {
    "description": "Run the pipeline. With no flags it processes the bundled sample on a local cluster.",
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
    elif name == "cluster":
        logger.info("cluster: %s workers, %s threads; dashboard: %s",
                    data.get("n_workers"), data.get("threads"), data.get("dashboard"))


def command(args: argparse.Namespace) -> int:
    from fruitdask.backends import start_early

    cfg = config_from_args(args)
    # Before the pipeline's imports: local workers' imports overlap the client's.
    start_early(cfg)
    from fruitdask import pipeline
    from fruitdask.progress import progress_bar

    # The bar starts with the featurization, after the cluster line (dashboard URL) is printed.
    doc = pipeline.run(cfg, progress=progress_bar(cfg.quiet), on_event=_on_event)
    red = doc["reduction"]
    for w in doc["warnings"]:
        logger.warning("WARNING: %s", w)
    logger.info(
        "wrote %d rows (%d skipped) to %s: K=%d components, %.1f%% variance, %.2f images/s featurizing, %.1fs in all",
        doc["counts"]["rows_written"], doc["counts"]["errors"], cfg.output, red["k"],
        100 * red["variance_reached"], doc["images_per_second"]["featurize"] or 0, doc["duration_s"],
    )
    from fruitdask.report.page import report_location

    report_path = report_location(cfg.output)
    logger.info("report: %s", report_path)
    if not cfg.quiet:
        print(json.dumps({"output": cfg.output, "rows": doc["counts"]["rows_written"], "k": red["k"], "report": report_path}))
    return EXIT_SKIPPED if doc["counts"]["errors"] and not cfg.skipped_ok else EXIT_OK
