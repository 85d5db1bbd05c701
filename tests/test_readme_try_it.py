"""README's "Try it without an API token" works as written.

The commands are read from README.md (the fenced block under that heading), not copied here, so
the test fails when README drifts. They run in one shell in a fresh directory holding what a
checkout gives them (`.venv`, the repository's `examples/`), with a home of their own: the bundled
fake API and the daemon start in the background, one task goes through, and the report shows its
images. Every process the commands started is stopped afterwards, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from nietest_daemon.testing.daemon import NIETEST, clean_env, pids_of_home
from nietest_daemon.testing.waiting import WaitTimeout, wait_for

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Try it without an API token"
DEADLINE_SECONDS = 120  # the whole block: the daemon answers within seconds, the 6 images within a few more
PNG = b"\x89PNG\r\n\x1a\n"


def try_it_commands() -> list[str]:
    """The commands of the first fenced block under the heading, one per line, comments dropped."""
    readme = (ROOT / "README.md").read_text()
    assert HEADING + "\n" in readme, f"README.md has no {HEADING!r} section"
    section = readme.split(HEADING + "\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```sh\n(.*?)^```", section, re.S | re.M)
    assert block, f"no ```sh block under {HEADING!r}"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_try_it_is_at_most_five_commands() -> None:
    commands = try_it_commands()
    assert 1 <= len(commands) <= 5, commands
    assert any("nietest_daemon.testing.fake_nieta" in c for c in commands), "the block starts no fake API"
    assert any("submit examples/task.json --wait" in c for c in commands), "the block submits no example task"
    assert any(" report " in c for c in commands), "the block writes no report"


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stop_everything(shell: subprocess.Popen[bytes], home: Path) -> None:
    """SIGTERM the shell's process group (the shell, the fake, the daemon: background jobs of a
    non-interactive shell stay in it), wait for every process of the home to exit, SIGKILL the rest.
    Every process the commands start inherits NIETEST_HOME, so `pids_of_home` finds them all."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(shell.pid, signal.SIGTERM)
    try:
        wait_for(lambda: not pids_of_home(home), 60, what="every process of the README's commands to exit")
    except WaitTimeout:
        for pid in pids_of_home(home):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pids_of_home(home), 15, what="the killed processes to go")
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            shell.wait(10)


@pytest.mark.e2e
def test_try_it_runs_one_task_to_a_report(short_tmp: Path) -> None:
    commands = try_it_commands()
    ports = {int(p) for c in commands for p in re.findall(r"--port (\d+)", c)}
    busy = sorted(p for p in ports if not _port_is_free(p))
    assert not busy, f"port {busy} is taken on 127.0.0.1: the README's fake API cannot listen there"

    venv = Path(sys.prefix)
    assert (venv / "bin" / "nietest").exists(), f"the tests do not run in a virtualenv with nietest: {venv}"
    work = short_tmp / "checkout"
    work.mkdir()
    (work / ".venv").symlink_to(venv)
    shutil.copytree(ROOT / "examples", work / "examples")
    home = short_tmp / "home"
    env = clean_env(NIETEST_HOME=str(home))
    output = short_tmp / "output.txt"
    script = work / "try-it.sh"
    script.write_text("\n".join(commands) + "\n")

    with output.open("wb") as out:
        shell = subprocess.Popen(
            ["bash", str(script)],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        try:
            code = shell.wait(DEADLINE_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the README's commands did not finish in {DEADLINE_SECONDS} s:\n{output.read_text()}")
        said = output.read_text()
        assert code == 0, f"the last command exited {code}:\n{said}"

        reports = list(work.glob("nietest-report-*.html"))
        assert len(reports) == 1, f"expected one report in {work}: {reports}\n{said}"
        task_id = reports[0].name.removeprefix("nietest-report-").removesuffix(".html")
        shown = subprocess.run(
            [*NIETEST, "status", task_id, "--json"], env=env, capture_output=True, text=True, timeout=30
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        task = json.loads(shown.stdout)
        assert (task["status"], task["partially_completed"]) == ("completed", False), task
        total = task["total_images"]
        assert total == 6, task  # examples/task.json: three styles, standard and Lumina

        page = reports[0].read_text()
        images = sorted(set(re.findall(r'<img [^>]*src="([^"]+)"', page)))
        assert len(images) == total, images
        for url in images:  # the fake still runs and serves them
            with urllib.request.urlopen(url, timeout=10) as answer:
                assert answer.read().startswith(PNG), url
    finally:
        _stop_everything(shell, home)
