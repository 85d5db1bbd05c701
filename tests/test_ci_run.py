""".ci/run runs the README's second command verbatim, split in two (install, then pytest), with the
README's pre-commit checks between the halves: this keeps the three in step."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALL = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]'"
CHECKS_START = ".venv/bin/ruff check ."


def _readme_line(prefix: str) -> str:
    [line] = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(prefix)]
    return line


def _ci_lines() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]


def test_ci_runs_the_readme_test_command_in_two_halves() -> None:
    command = _readme_line(INSTALL)
    install, sep, tests = command.partition(" && .venv/bin/python -m pytest")
    assert sep, f"README's second command is no longer install && pytest: {command}"
    lines = _ci_lines()
    pytest_half = sep.removeprefix(" && ") + tests
    assert install in lines and pytest_half in lines, f".ci/run must run {install!r} then {pytest_half!r}"
    assert lines.index(install) < lines.index(pytest_half)


def test_ci_runs_the_readme_checks_between_install_and_tests() -> None:
    checks = _readme_line(CHECKS_START).split(" && ")
    lines = _ci_lines()
    install = lines.index(INSTALL)
    tests = next(i for i, line in enumerate(lines) if line.startswith(".venv/bin/python -m pytest"))
    for check in checks:
        assert f"check {check}" in lines[install:tests], f".ci/run does not run the README's {check!r} before the tests"


def test_ci_stops_at_the_first_failure() -> None:
    assert "set -euo pipefail" in _ci_lines()
