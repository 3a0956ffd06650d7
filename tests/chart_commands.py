"""The chart's fruitdask command lines, parsed by the CLI of this checkout.

The scheduled pods (issue #32) call flags and a command that other branches of the same
issue add: ``daily`` and ``--models`` (registry-daily), ``--wait-lock`` (lease),
``--max-remove-fraction`` (keys-guard). Until they are merged, :func:`as_far_as_known`
leaves out exactly those the CLI lacks (and runs ``daily`` as ``run``, whose every option
it takes), and fails on any other unknown flag; once merged, nothing is left out.
"""

from __future__ import annotations

import argparse

from fruitdask.cli import COMMAND_MODULES, build_parser

PENDING_FLAGS: frozenset[str] = frozenset()  # every branch of #32 is merged: nothing is left out
PENDING_COMMANDS: dict[str, str] = {}


def _options(command: str) -> set[str]:
    parser = build_parser(command)
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices[command]._option_string_actions)


def as_far_as_known(command: str, args: list[str]) -> tuple[str, list[str], set[str]]:
    """``(command, args, left out)``: the command line this checkout's CLI can parse."""
    if command not in COMMAND_MODULES:
        assert command in PENDING_COMMANDS, f"fruitdask has no command {command!r}"
        command = PENDING_COMMANDS[command]
    known = _options(command)
    kept: list[str] = []
    left_out: set[str] = set()
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and a.split("=", 1)[0] not in known:
            left_out.add(a)
            takes_value = "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--")
            i += 2 if takes_value else 1
            continue
        kept.append(a)
        i += 1
    assert left_out <= PENDING_FLAGS, f"flags no branch of issue #32 adds: {sorted(left_out - PENDING_FLAGS)}"
    return command, kept, left_out


def parse(command: str, args: list[str]) -> tuple[argparse.Namespace, set[str]]:
    """Parse ``fruitdask COMMAND ARGS`` (:func:`as_far_as_known`) with the CLI's parser."""
    command, kept, left_out = as_far_as_known(command, args)
    return build_parser(command).parse_args([command, *kept]), left_out


def in_container(container: dict) -> dict:
    """A copy of a rendered ``python -m fruitdask COMMAND`` container whose command line is
    :func:`as_far_as_known` (for the container tests; unchanged once the branches merged)."""
    head, command = container["command"][:3], container["command"][3]
    assert head == ["python", "-m", "fruitdask"], container["command"]
    rest = container["command"][4:] + container.get("args", [])
    command, kept, _ = as_far_as_known(command, rest)
    return {**container, "command": [*head, command], "args": kept}
