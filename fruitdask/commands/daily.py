"""``fruitdask daily``: the day's loop. Bring the table up to date, train a candidate on the
new table version, promote it if it passes the gate; record the day.

Every step is idempotent, so a CronJob that fires twice or a pod killed at any step and
started again ends as one uninterrupted day:

1. ``run`` (the same code): a table version per real change, none when up to date;
2. the candidate for the table's current version is looked up in the registry by its
   lineage (table URI, table version, trigger ``daily``) and trained only when there is none;
3. the gate decides; the alias moves by one conditional write; a candidate that is
   already champion is left as it is;
4. ``OUTPUT/runs/<run_id>/daily.json`` says what happened and why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
from dataclasses import dataclass

from fruitdask.commands import run as run_command
from fruitdask.commands.model import add_gate_options
from fruitdask.commands.options import add_run_options, config_from_args
from fruitdask.config import RunConfig

logger = logging.getLogger("fruitdask")

DAILY_JSON = "daily.json"

DAILY_EPILOG = """exit codes: those of `fruitdask run` (see `fruitdask run --help`): 0 whether or
not the candidate was promoted (daily.json says which and why), 4 when the table was
committed but some files were skipped (--skipped-ok makes it 0), non-zero on any failure
(1: a step failed, or another promotion moved the champion meanwhile: run it again).
"""

PARSER_KWARGS = {
    "description": "The daily loop: bring the features table up to date (as `run`), train a candidate classifier "
                   "on the new table version into the registry --models, promote it if it passes the gate. Safe to "
                   "run again after any failure: one table version per change, one candidate per table version.",
    "epilog": DAILY_EPILOG,
    "formatter_class": argparse.RawDescriptionHelpFormatter,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry")
    g.add_argument("--models", required=True, metavar="MODELS", help="the model registry (folder or URI) the candidate goes to")
    add_gate_options(p)
    add_run_options(p)


@dataclass(frozen=True)
class DailyOptions:
    """What ``fruitdask daily`` was asked: the run's configuration, the registry, the gate."""

    config: RunConfig
    models: str
    margin: float = 1.0
    max_unknown_rate: float = 0.10
    max_uncertain_rate: float = 0.25

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DailyOptions:
        return cls(config=config_from_args(args), models=args.models, margin=args.margin,
                   max_unknown_rate=args.max_unknown_rate, max_uncertain_rate=args.max_uncertain_rate)


def command(args: argparse.Namespace) -> int:
    return daily(DailyOptions.from_args(args))


def daily(opts: DailyOptions) -> int:
    """Run, train (once per table version), gate, record; ``run``'s exit code."""
    from fruitdask import storage
    from fruitdask.classifier import gate

    cfg = opts.config
    settings = gate.GateSettings(opts.margin, opts.max_unknown_rate, opts.max_uncertain_rate)  # bad values before the run
    storage.guard_regions([opts.models], cfg.storage)
    result = run_command.execute(cfg)
    url = result.output
    exit_code = run_command.summarize(cfg, result, print_json=False)
    so = storage.storage_options(cfg.storage)
    version = result.version_after
    assert version is not None  # a run that returns has a table (it committed one, or found one)
    mv, trained = _candidate(opts, url, version, result.run_id)
    from fruitdask.classifier.registry import Registry

    if mv.decision:  # decided by an earlier daily: a person's rollback since then stands
        decision = {**mv.decision, "decided_earlier": True}
    else:
        decision = gate.promote(Registry(opts.models, so), mv.version, settings)
    record = {"run_id": result.run_id, "output": url, "models": opts.models,
              "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "table": {"version_before": result.version_before, "version_after": version,
                        "changed": not result.up_to_date},
              "candidate": mv.version, "trained": trained, "metrics": mv.metrics, "promoted": decision["promoted"],
              "reason": decision["reason"], "champion_before": decision.get("champion_before"),
              "champion_after": decision.get("champion_after"), "comparison": decision.get("comparison"),
              "decided_earlier": bool(decision.get("decided_earlier")), "run_exit_code": exit_code}
    storage.write_file(storage.join(url, "runs", result.run_id, DAILY_JSON),
                       json.dumps(record, indent=2, sort_keys=True, default=str).encode(), so)
    logger.info("daily: table version %s, candidate %s (%s), %s", version, mv.version,
                "trained now" if trained else "trained earlier", decision["reason"])
    if not cfg.quiet:
        print(json.dumps({"output": url, "version": version, "changed": not result.up_to_date, "candidate": mv.version,
                          "trained": trained, "promoted": decision["promoted"], "champion": decision.get("champion_after"),
                          "reason": decision["reason"], "daily": f"runs/{result.run_id}/{DAILY_JSON}"}))
    return exit_code


def _candidate(opts: DailyOptions, url: str, version: int, run_id: str):
    """The daily candidate of table ``version``: found by its lineage, or trained and registered now."""
    from fruitdask import storage
    from fruitdask.classifier import candidate
    from fruitdask.classifier.registry import Registry

    settings = opts.config.storage
    so = storage.storage_options(settings)
    registry = Registry(opts.models, so)
    table_uri = url if storage.is_remote(url) else os.path.abspath(url)
    found = registry.find(table_uri, version, "daily")
    if found is not None:
        logger.info("the registry already holds %s, trained by daily on table version %s: not trained again", found.version, version)
        return found, False
    tv = candidate.read_table_version(url, so, version)
    # The run's --weights is where the weights are now (a moved file keeps its sha256).
    weights = None if opts.config.weights in ("auto", "imagenet", "random") else opts.config.weights
    cand = candidate.train_candidate(tv, so, weights_override=weights, trigger="daily", run_id=run_id,
                                     guard=lambda urls: storage.guard_regions(urls, settings))
    return registry.get(registry.register(cand.bundle, cand.metrics, cand.lineage, cand.files)), True
