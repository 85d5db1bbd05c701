""".ci/run runs the README's second command verbatim, split in two (install, then pytest), with the
README's pre-commit checks between the halves: this keeps the three in step. Before the tests it makes
sure a PostgreSQL server answers: the machine's, else a private cluster (its fallback is run here with a
psql that finds no server on 127.0.0.1:5432)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

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


# --- PostgreSQL ------------------------------------------------------------------------------------

PG_START = "# --- PostgreSQL:"
PG_END = "# --- end of PostgreSQL"


def _postgres_block() -> str:
    text = (ROOT / ".ci" / "run").read_text()
    start, end = text.index(PG_START), text.index(PG_END)
    return text[start:end]


def test_ci_makes_sure_postgres_answers_before_the_tests() -> None:
    lines = _ci_lines()
    start = next(i for i, line in enumerate(lines) if line.startswith(PG_START))
    end = next(i for i, line in enumerate(lines) if line.startswith(PG_END))
    tests = next(i for i, line in enumerate(lines) if line.startswith(".venv/bin/python -m pytest"))
    assert start < end < tests
    block = _postgres_block()
    # The machine's server (found by testing/postgres.py), else a private one whose URL pytest is given.
    assert "pg_answers postgresql://postgres@127.0.0.1:5432/postgres" in block
    assert 'export TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/postgres"' in block
    assert "trap stop_private_postgres EXIT" in block and "runuser -u" in block


def _initdb() -> str | None:
    found = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    return str(found) if found else None


@pytest.mark.e2e  # initdb and a server's start: a few seconds
@pytest.mark.skipif(not shutil.which("psql") or not _initdb(), reason="PostgreSQL's programs are not installed")
def test_ci_starts_a_private_postgres_when_the_machine_has_none(tmp_path: Path) -> None:
    """.ci/run's PostgreSQL block, with a psql that finds nothing on 127.0.0.1:5432 (as on a machine
    without a server): a private cluster on another port answers, and is gone once the script exits."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "psql").write_text(
        "#!/bin/bash\n"
        'for a in "$@"; do case "$a" in *127.0.0.1:5432/*) exit 2;; esac; done\n'
        f'exec {shutil.which("psql")} "$@"\n'
    )
    (fake / "psql").chmod(0o755)
    script = (
        "set -euo pipefail\n"
        + _postgres_block()
        + 'echo "URL=$TEST_POSTGRES_URL"\necho "DIR=$pg_dir"\n'
        + 'psql -w -X -A -t -c "select 40 + 2" "$TEST_POSTGRES_URL"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "TEST_POSTGRES_URL"}
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    out = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert out["URL"].startswith("postgresql://postgres@127.0.0.1:") and ":5432/" not in out["URL"]
    assert done.stdout.splitlines()[-1] == "42"  # it answered
    assert not Path(out["DIR"]).exists()  # stopped and removed at exit
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if out["DIR"].encode() in _read(p)]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_ci_installs_the_multihost_rigs_tools() -> None:
    """The multi-host rig (testing/multihost.py) drives `ip` and `nft`: installed as Prometheus and
    Chromium are, before the tests."""
    lines = _ci_lines()
    install = next(i for i, line in enumerate(lines) if line.startswith("if [ ${#need[@]} -gt 0 ]"))
    for command, package in (("ip", "iproute2"), ("nft", "nftables")):
        line = f"command -v {command} >/dev/null || need+=({package})"
        assert line in lines[:install], f".ci/run does not install {package} (for `{command}`)"
