"""programs/cli.py's dispatch table: every subcommand has one entry, each entry names a function
that takes what the parser gives it, and no program is imported before its command runs."""

from __future__ import annotations

import argparse
import importlib
import inspect
import subprocess
import sys

import pytest

from nietest_daemon.core import settings as settings_module
from nietest_daemon.programs import cli

SUBCOMMANDS = next(
    a.choices for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
)  # the parser's own list


def test_every_subcommand_has_exactly_one_entry() -> None:
    assert set(cli.COMMANDS) == set(SUBCOMMANDS)


@pytest.mark.parametrize(
    "argv",
    [
        ["daemon"],
        ["worker", "subtask"],
        ["broker"],
        ["alerts"],
        ["watchdog"],
        ["metrics"],
        ["ctl", "status", "subtask:*"],
        ["status", "--json"],
        ["status", "T1", "--json"],
        ["submit", "task.json", "--wait"],
        ["submit", "task.json", "--owner", "alice"],
        ["cancel", "T1"],
        ["tasks", "--status", "failed", "--limit", "3", "--json"],
        ["tasks", "--owner", "alice", "--status", "pending"],
        ["report", "T1", "-o", "r.html", "--rows", "a", "--cols", "b"],
        ["retry", "T1", "--cancelled"],
        ["export", "T1", "--format", "csv"],
    ],
    ids=" ".join,
)
def test_each_command_calls_a_function_that_takes_its_arguments(argv: list[str]) -> None:
    args = cli.build_parser().parse_args(argv)
    command = cli.command_of(args)
    module_name, function_name = command.target.split(":")
    function = getattr(importlib.import_module(f"nietest_daemon.programs.{module_name}"), function_name)
    settings = settings_module.load({})
    bound = inspect.signature(function).bind(
        settings, *(getattr(args, n) for n in command.positional), **{n: getattr(args, n) for n in command.keywords}
    )
    assert bound.arguments  # binding raised if a name or a count were wrong


def test_a_task_id_makes_status_about_that_task() -> None:
    parser = cli.build_parser()
    assert cli.command_of(parser.parse_args(["status"])).target == "overview:run"
    assert cli.command_of(parser.parse_args(["status", "T1"])).target == "task_commands:status"


def test_the_parser_and_the_table_import_no_program() -> None:
    code = (
        "import sys; from nietest_daemon.programs import cli; cli.build_parser(); cli.COMMANDS; "
        "print(sorted(m for m in sys.modules if m.startswith('nietest_daemon.programs.') or m == 'dramatiq'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['nietest_daemon.programs.cli']"


def test_owner_options_reach_their_commands() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["submit", "t.json", "--owner", "alice"]).owner == "alice"
    assert parser.parse_args(["submit", "t.json"]).owner is None  # submit picks the default
    assert parser.parse_args(["tasks", "--owner", "bob"]).owner == "bob"
    assert "owner" in cli.COMMANDS["submit"].keywords and "owner" in cli.COMMANDS["tasks"].keywords
