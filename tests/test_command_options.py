"""Each command owns its options, typed: one frozen value built from its parsed flags in one
place (``<Command>Options.from_args``), then handed to the function that does the work.

The crash this guards against (#30): ``fruitdask table`` called a shared helper with a
signature that had changed under it, and no test ran the command. Here every flag a command's
parser defines must reach a field of its options value (a new flag cannot be silently
dropped), each options value is frozen, and building it from the defaults works, so a change
of a helper's signature fails here or in mypy (``make test`` runs it over ``fruitdask/commands``),
not in a user's shell.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib

import pytest

from fruitdask.cli import COMMAND_MODULES, build_parser
from fruitdask.config import RunConfig

#: command -> (module attribute of its options class, flags it renames on the way in).
OPTIONS = {
    "report": ("ReportOptions", {}),
    "predict": ("PredictOptions", {}),
    "train": ("TrainOptions", {}),
    "bench": ("BenchOptions", {"backends": "engines"}),
    "serve": ("ServeOptions", {}),
    "table": ("TableOptions", {}),
    "model": ("ModelOptions", {}),
    "daily": ("DailyOptions", {}),
}

#: serve flags whose ServeSettings field has another name (``--memory-limit`` sizes the
#: connection and byte limits instead of being kept).
SERVE_RENAMED = {"body_timeout": "body_timeout_s", "header_timeout": "header_timeout_s", "keep_alive": "keep_alive_s",
                 "top": "default_top", "decode_timeout": "decode_timeout_s", "model_poll_seconds": "model_poll_s"}

#: Minimal command lines that parse (required arguments only).
MINIMAL = {
    "report": ["report", "out"],
    "predict": ["predict", "a.jpg", "--model", "m"],
    "train": ["train", "--features", "out", "--test-input", "t"],
    "bench": ["bench"],
    "serve": ["serve", "--model", "m"],
    "table": ["table", "history", "out"],
    "model": ["model", "list", "m"],
    "daily": ["daily", "--models", "m"],
    "run": ["run"],
}


def _sub_parser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _dests(p: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in p._actions if a.dest not in ("help", argparse.SUPPRESS)}


def _carried(dest: str, fields: set[str], renamed: dict[str, str]) -> bool:
    """A flag reaches the options: by its name, renamed, or inside the storage settings;
    ``--debug`` and ``--quiet`` are also the dispatcher's (logging and tracebacks)."""
    return dest in ("debug", "quiet") or renamed.get(dest, dest) in fields or (dest.startswith("storage_") and "storage" in fields)


def test_every_command_has_typed_options_or_the_run_configuration() -> None:
    assert set(COMMAND_MODULES) == {*OPTIONS, "run"}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_flag_reaches_a_field_of_the_command_options(name: str) -> None:
    cls_name, renamed = OPTIONS[name]
    cls = getattr(importlib.import_module(COMMAND_MODULES[name][0]), cls_name)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    fields = {f.name for f in dataclasses.fields(cls)}
    lost = {d for d in _dests(_sub_parser(name)) if not _carried(d, fields, renamed)}
    if name == "serve":  # the server's flags are sized into its frozen ServeSettings
        from fruitdask.serve.settings import ServeSettings

        sized = {f.name for f in dataclasses.fields(ServeSettings)}
        lost = {d for d in lost if d not in sized and SERVE_RENAMED.get(d) not in sized and d != "memory_limit"}
    if name in ("bench", "daily"):  # they also take every run option, into a RunConfig
        run_fields = {f.name for f in dataclasses.fields(RunConfig)}
        lost = {d for d in lost if d not in run_fields and not d.startswith(("kube_", "storage_"))}
    assert not lost, f"`fruitdask {name}` flags that reach no field of {cls_name}: {sorted(lost)}"


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_options_build_from_the_parsed_defaults_and_are_frozen(name: str) -> None:
    cls_name, _ = OPTIONS[name]
    cls = getattr(importlib.import_module(COMMAND_MODULES[name][0]), cls_name)
    opts = cls.from_args(build_parser(name).parse_args(MINIMAL[name]))
    assert isinstance(opts, cls)
    first = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(opts, first, None)


def test_run_flags_reach_the_run_configuration() -> None:
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    lost = {d for d in _dests(_sub_parser("run"))
            if d != "debug" and d not in fields and not d.startswith(("storage_", "kube_"))}
    assert not lost, sorted(lost)


def test_bad_values_are_refused_where_the_options_are_built() -> None:
    from fruitdask.commands.bench import BenchOptions
    from fruitdask.commands.predict import PredictOptions
    from fruitdask.errors import ConfigError

    with pytest.raises(ConfigError, match="--top must be at least 1"):
        PredictOptions.from_args(build_parser("predict").parse_args(["predict", "a.jpg", "--model", "m", "--top", "0"]))
    with pytest.raises(ConfigError, match="--backends"):
        BenchOptions.from_args(build_parser("bench").parse_args(["bench", "--backends", "raw,flink"]))
    from fruitdask.commands.table import TableOptions

    with pytest.raises(ConfigError, match="--retain-hours must be a whole number"):
        TableOptions.from_args(build_parser("table").parse_args(["table", "vacuum", "out", "--retain-hours", "0.5"]))
    with pytest.raises(ConfigError, match="--limit must be at least 1"):
        TableOptions.from_args(build_parser("table").parse_args(["table", "history", "out", "--limit", "0"]))
    with pytest.raises(ConfigError, match="--images 1"):
        BenchOptions.from_args(build_parser("bench").parse_args(["bench", "--images", "1"]))
