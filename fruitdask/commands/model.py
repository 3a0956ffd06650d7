"""``fruitdask model``: the model registry that ``train --models`` and ``daily`` fill.

::

    fruitdask model list MODELS [--json]             every version, oldest first; which is champion
    fruitdask model show MODELS VERSION              one version: metrics, lineage, the gate's decision
    fruitdask model promote MODELS VERSION [--force] gate it against the champion, move the alias if it passes
    fruitdask model rollback MODELS                  the champion goes back to the previous one
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass

from fruitdask.commands.options import add_quiet_debug, add_storage_options, storage_settings
from fruitdask.config import StorageSettings
from fruitdask.errors import ConfigError

logger = logging.getLogger("fruitdask")

ACTIONS = ("list", "show", "promote", "rollback")

PARSER_KWARGS = {
    "description": "The model registry: versions trained by `train --models` and `daily`, their metrics and "
                   "lineage, and the champion alias that `serve` follows. `promote` moves the alias only if the "
                   "candidate passes the gate (or with --force).",
    "epilog": __doc__.split("::", 1)[1],
    "formatter_class": argparse.RawDescriptionHelpFormatter,
}


def add_gate_options(p: argparse.ArgumentParser) -> None:
    """The gate's bounds, shared by ``model promote`` and ``daily``."""
    from fruitdask.classifier.gate import GateSettings

    d = GateSettings()
    g = p.add_argument_group("gate (promotion)")
    g.add_argument("--margin", type=float, default=d.margin_points, metavar="POINTS",
                   help="a candidate's held-out accuracy and macro F1 may be lower than the champion's by at most this "
                   f"many percentage points (default: {d.margin_points:g})")
    g.add_argument("--max-unknown-rate", type=float, default=d.max_unknown_rate,
                   help="highest share of held-out fruit photos answered `unknown`, unless the champion's is as high "
                   f"(default: {d.max_unknown_rate:g})")
    g.add_argument("--max-uncertain-rate", type=float, default=d.max_uncertain_rate,
                   help="highest share of held-out fruit photos answered `uncertain`, unless the champion's is as high "
                   f"(default: {d.max_uncertain_rate:g})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=ACTIONS, help="what to do with the registry")
    p.add_argument("models", metavar="MODELS", help="the registry folder or URI (`train --models`, `daily --models`)")
    p.add_argument("version", metavar="VERSION", nargs="?", help="show, promote: the model version (see `model list`)")
    p.add_argument("--json", dest="as_json", action="store_true", help="list: one JSON list instead of a table")
    p.add_argument("--force", action="store_true", help="promote: move the alias even if the gate refuses (a person's call)")
    add_gate_options(p)
    add_storage_options(p)
    add_quiet_debug(p)


@dataclass(frozen=True)
class ModelOptions:
    """What ``fruitdask model`` was asked, typed."""

    action: str
    models: str
    storage: StorageSettings
    version: str | None = None
    as_json: bool = False
    force: bool = False
    margin: float = 1.0
    max_unknown_rate: float = 0.10
    max_uncertain_rate: float = 0.25
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelOptions:
        if args.action in ("show", "promote") and not args.version:
            raise ConfigError(f"`fruitdask model {args.action}` needs a VERSION: see `fruitdask model list {args.models}`")
        if args.action in ("list", "rollback") and args.version:
            raise ConfigError(f"`fruitdask model {args.action}` takes no VERSION (got {args.version!r})")
        return cls(action=args.action, models=args.models, storage=storage_settings(args), version=args.version,
                   as_json=bool(args.as_json), force=bool(args.force), margin=args.margin,
                   max_unknown_rate=args.max_unknown_rate, max_uncertain_rate=args.max_uncertain_rate,
                   quiet=bool(args.quiet))


def command(args: argparse.Namespace) -> int:
    return model(ModelOptions.from_args(args))


def model(opts: ModelOptions) -> int:
    from fruitdask import storage
    from fruitdask.classifier import gate
    from fruitdask.classifier.registry import Registry

    storage.guard_regions([opts.models], opts.storage)
    registry = Registry(opts.models, storage.storage_options(opts.storage))
    if opts.action == "list":
        champion = (registry.champion().doc or {}).get("version")
        rows = [mv.row(champion) for mv in registry.versions()]
        _print(opts, rows if opts.as_json else None, _table(rows))
        return 0
    if opts.action == "show":
        mv = registry.get(str(opts.version))
        champion = (registry.champion().doc or {}).get("version")
        _print(opts, {**mv.row(champion), "url": mv.url, "lineage": mv.lineage, "decision": mv.decision}, None)
        return 0
    if opts.action == "promote":
        settings = gate.GateSettings(opts.margin, opts.max_unknown_rate, opts.max_uncertain_rate)
        # The gate reads the candidate's table again: a location from a stored document, guarded.
        table = registry.get(str(opts.version)).lineage.get("table_uri")
        if table:
            storage.check_protocols([table], "table location in lineage.json", "the registry was edited: train the model again")
            storage.guard_regions([table], opts.storage)
        decision = gate.promote(registry, str(opts.version), settings, force=opts.force)
        logger.info("%s", decision["reason"])
        _print(opts, decision, None)
        return 0
    doc = gate.rollback(registry)
    logger.info("champion rolled back to %s", doc["version"])
    _print(opts, doc, None)
    return 0


def _print(opts: ModelOptions, doc: object, text: str | None) -> None:
    if opts.quiet:
        return
    print(text if text is not None and doc is None else json.dumps(doc, indent=2, default=str))


def _table(rows: list[dict]) -> str:
    lines = [f"{'version':28} {'champion':8} {'table':>5} {'accuracy':>8} {'macro F1':>8}  promoted / reason"]
    for r in rows:
        m = r["metrics"]
        acc, f1 = m.get("accuracy"), m.get("macro_f1")
        lines.append(f"{r['version']:28} {'*' if r['champion'] else '':8} {r['table_version']!s:>5} "
                     f"{'' if acc is None else f'{acc:.4f}':>8} {'' if f1 is None else f'{f1:.4f}':>8}  "
                     f"{'' if r['promoted'] is None else r['promoted']} {r['reason'] or ''}".rstrip())
    return "\n".join(lines)
