"""`nietest daemon` and `nietest ctl`: supervisord and supervisorctl on etc/supervisord.conf.

The daemon validates the settings, creates the directories, exports every value the
configuration file expands, and execs supervisord (`python -m nietest_daemon.programs.supervisord
-n`, supervisord with the patches of internals/supervisor.py) -- so under systemd the main PID is
supervisord itself, and SIGTERM to it stops every worker gracefully (workers first, the
embedded broker last, by priority).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import xmlrpc.client
from pathlib import Path

from nietest_daemon.core.logs import iso_timestamp
from nietest_daemon.core.redaction import redact, set_secrets
from nietest_daemon.core.settings import Settings
from nietest_daemon.internals import supervisor as supervisor_internals

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def config_path() -> Path:
    """etc/supervisord.conf of the source tree, else the copy packaged into the wheel."""
    for candidate in (PACKAGE_DIR.parent / "etc" / "supervisord.conf", PACKAGE_DIR / "etc" / "supervisord.conf"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("supervisord.conf not found beside the package")


def _tool(name: str) -> str:
    """A console script of the same environment as this interpreter (supervisorctl)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found; is the 'supervisor' package installed?")
    return found


def environment(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings.supervisor_env())
    env["NIETEST_PYTHON"] = sys.executable
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def control_proxy(settings: Settings, timeout: float | None = None) -> xmlrpc.client.ServerProxy:
    """XML-RPC proxy to the running supervisord over its unix socket (`timeout`: per connect and read)."""
    return supervisor_internals.control_proxy(f"unix://{settings.control_socket}", timeout)


def is_running(settings: Settings) -> bool:
    if not settings.control_socket.exists():
        return False
    try:
        control_proxy(settings).supervisor.getPID()
        return True
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        return False


def _start_line(settings: Settings) -> str:
    """The daemon's start-up log line (JSON, to stdout: the journal under systemd)."""
    return json.dumps(
        {
            "timestamp": iso_timestamp(),
            "level": "info",
            "event": "daemon starting",
            "logger": __name__,
            "pid": os.getpid(),
            "process": "daemon",
            "broker": settings.broker_description,
            "store": settings.store_description,
            "config": str(config_path()),
            "home": str(settings.home),
            "queues": {
                q.key: {"name": q.name, "processes": q.processes, "threads": q.threads}
                for q in settings.queues.values()
            },
        }
    )


#: How the store's errors begin (store/base.py): the daemon's line names the store once, before it.
_NAMED_STORE = re.compile(r"^the task store \(.*?\) ")


def _problem(exc: Exception) -> str:
    """What went wrong while preparing the store, as one short line with every secret masked:
    `unavailable: <driver error>`, `failed: <driver error>`, or `<type>: <message>`."""
    text = " ".join(redact(str(exc)).split())
    named = _NAMED_STORE.match(text)
    if named:
        text = text[named.end() :].removeprefix("is ")
        if text.startswith(("unavailable: ", "failed: ")):
            return text[:500]
    return f"{type(exc).__name__}: {text}"[:500]


def run(settings: Settings) -> int:
    """Exec supervisord (JSON logs, prompt respawn: see nietest_daemon/programs/supervisord.py) in the foreground.

    Returns only when it refuses to start.
    """
    if is_running(settings):
        print(f"nietest: a daemon is already running on {settings.control_socket}", file=sys.stderr)
        return 1
    for directory in (settings.data_dir, settings.log_dir):
        directory.mkdir(parents=True, exist_ok=True)
    settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.run_dir.chmod(0o700)
    print(_start_line(settings), flush=True)
    set_secrets(settings.secrets())  # the store's password, masked in whatever its driver says
    from nietest_daemon.store import prepare_store_for  # here: `ctl` and `status` import this module

    try:  # indexes (MongoDB), migrations (PostgreSQL): once here, before any process opens the store
        prepare_store_for(settings)
    except Exception as exc:  # unreachable, refused, a newer schema: say so in one line, start nothing
        print(f"nietest: could not prepare the store ({settings.store_description}): {_problem(exc)}", file=sys.stderr)
        return 1
    os.chdir(settings.data_dir)
    argv = [sys.executable, "-m", "nietest_daemon.programs.supervisord", "-n", "-c", str(config_path())]
    os.execve(sys.executable, argv, environment(settings))


def ctl(settings: Settings, args: list[str]) -> int:
    """supervisorctl against the running daemon, with the daemon's environment."""
    tool = _tool("supervisorctl")
    os.execve(tool, [tool, "-c", str(config_path()), *args], environment(settings))
