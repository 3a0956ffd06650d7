"""Command-line interface: a thin dispatcher over the sub-commands of :mod:`fruitdask.commands`.

``main(argv) -> int`` assembles the parser from the command modules, sets up logging, runs
the command, and is the one boundary where errors become a clean one-line message and an
exit code (no traceback unless ``--debug``); SIGTERM unwinds like Ctrl-C. The commands
never import this module.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from fruitdask import __version__
from fruitdask.config import TF_ENV
from fruitdask.errors import FruitdaskError
from fruitdask.logs import setup_logging

logger = logging.getLogger("fruitdask")

#: The sub-commands, in --help order: each module has ``add_arguments(parser)`` and
#: ``command(args) -> int``, and may have ``PARSER_KWARGS`` for its parser. None of them
#: imports TensorFlow at import time, so ``--help`` stays fast.
COMMAND_MODULES: dict[str, tuple[str, str]] = {
    "run": ("fruitdask.commands.run", "bring the features table up to date with the input: list, diff, featurize new and changed images, PCA, one Delta commit"),
    "train": ("fruitdask.commands.train", "train a fruit classifier on the PCA features of a run output, evaluate it on a Test/ tree"),
    "model": ("fruitdask.commands.model", "the model registry: list versions, show one, promote one through the gate, roll the champion back"),
    "daily": ("fruitdask.commands.daily", "the daily loop: bring the table up to date, train a candidate on the new version, promote it if it passes the gate"),
    "predict": ("fruitdask.commands.predict", "predict the fruit in photos with a model written by `train` (top-k labels)"),
    "report": ("fruitdask.commands.report", "rebuild OUTPUT/report.html, the self-contained HTML page of a finished run"),
    "table": ("fruitdask.commands.table", "the features table's life: history, vacuum, compact, a version's summary (time travel)"),
    "bench": ("fruitdask.commands.bench", "time raw Keras vs the Dask vs the Spark pipeline on the same images and weights"),
    "serve": ("fruitdask.commands.serve", "serve a model written by `train` over HTTP: POST a photo to /v1/predict, get the fruit"),
}

#: Exit codes of a signal (see ``fruitdask run --help``); the others come from the
#: commands and from the ``exit_code`` of the :mod:`fruitdask.errors` classes.
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C so every cluster and temp prefix is closed."""


def _on_sigterm(signum, frame):
    raise Terminated()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. With ``command``, only that sub-command gets its arguments (the
    others are listed, their modules not imported): all that parsing its line needs."""
    parser = argparse.ArgumentParser(
        prog="fruitdask",
        description="`fruitdask run` brings a Delta table of image features up to date with its input: it lists "
        "the images, diffs them against the Delta table, featurizes the new or changed images with VGG16 on Dask or "
        "Spark, reduces them with PCA, and writes everything in one commit (one table version). Data stays in EU "
        "regions. The other commands train and serve a fruit classifier on those features and look after the table.",
    )
    parser.add_argument("--version", action="version", version=f"fruitdask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMAND_MODULES.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        kwargs = {"description": help_text, **getattr(module, "PARSER_KWARGS", {})}
        p = sub.add_parser(name, help=help_text, **kwargs)
        module.add_arguments(p)
        p.set_defaults(func=module.command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    for key, value in TF_ENV.items():
        os.environ.setdefault(key, value)
    argv = list(sys.argv[1:] if argv is None else argv)
    # The first word that is not an option names the command (the top level has no
    # option that takes a value).
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMAND_MODULES else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False))
    setup_logging(bool(getattr(args, "quiet", False)), debug)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _in_main_thread() else None
    try:
        return int(args.func(args) or 0)
    except FruitdaskError as e:
        if debug:
            logger.exception("failed")
        print(f"fruitdask: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        # Anything else (a Dask FuturesCancelledError, a worker's exception, a bug) is still
        # one line and exit 1; the traceback is for --debug.
        if debug:
            logger.exception("failed")
        hint = "" if debug else " (run again with --debug for the traceback)"
        print(f"fruitdask: error: {type(e).__name__}: {_one_line(str(e)) or 'no message'}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fruitdask: interrupted; cluster closed, nothing committed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("fruitdask: terminated; cluster closed, nothing committed", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The process's entry point (``fruitdask``, ``python -m fruitdask``): :func:`main`, then
    exit without the final garbage collections (:func:`fruitdask.commands.startup.exit_quickly`).
    :func:`main` alone (tests, embedding) leaves the collector as it is."""
    from fruitdask.commands.startup import exit_quickly

    exit_quickly(main())


def _one_line(text: str) -> str:
    """A message on one line: its lines joined with "; " (Dask's run over several)."""
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
