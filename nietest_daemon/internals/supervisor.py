"""Every use of supervisor's internals, in this one module.

- `install_json_log`: supervisord's main log lines rendered as JSON with the workers' keys
  (`loggers.Handler.emit` replaced; children's captured output, already JSON, is not touched).
- `install_prompt_respawn`: supervisord's main loop polls with a 1 s timeout and SIGCHLD does not
  interrupt it, so a killed worker is noticed up to 1 s late and respawned only on the pass after
  that. A wakeup pipe (signal.set_wakeup_fd) registered with its poller (`poller.Poller.poll`
  wrapped) ends the poll as soon as a signal arrives, and the pass after it does not wait.
- `install_systemd_notify`: under systemd (`Type=notify`, NOTIFY_SOCKET set), supervisord's
  main loop (`Supervisor.tick`, called on every pass, at least once a second) tells systemd
  READY=1 once every autostarted process is RUNNING, STATUS= with the counts when they change,
  WATCHDOG=1 every half WATCHDOG_USEC (so systemd restarts a supervisord whose loop hangs), and
  STOPPING=1 when it begins to stop.
- `control_proxy`: the XML-RPC client of supervisord's unix control socket (`supervisor.xmlrpc`),
  optionally with a timeout (its transport's `_get_connection` replaced: it sets none).
- `all_process_info`: supervisord's getAllProcessInfo() as `ProcessInfo` dicts (the keys of
  supervisor/rpcinterface.py's getProcessInfo), the typed answer the programs read.
- `EXITED_LINE`: supervisord's log line for a process exit, the only place its exit status is
  written (the PROCESS_STATE event carries none); the alerts listener reads it.

tests/test_internals_surface.py pins what these rely on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time
import xmlrpc.client
from collections import Counter
from collections.abc import Mapping
from typing import Any, TypedDict, cast

from supervisor import loggers, poller, supervisord
from supervisor.states import ProcessStates, SupervisorStates, getProcessStateDescription
from supervisor.xmlrpc import SupervisorTransport, UnixStreamHTTPConnection

from nietest_daemon.core.logs import iso_timestamp
from nietest_daemon.domain.process_state import ProcessState

#: supervisord's log line for an exit (supervisor/process.py: "exited: %s (%s)"), e.g.
#: "exited: subtask_00 (terminated by SIGKILL; not expected)".
EXITED_LINE = re.compile(r"exited: (?P<name>\S+) \((?P<desc>.*)\)\s*$")

# The format supervisord gives its main log handlers (options.py); children's logs use '%(message)s'.
_MAIN_FORMAT = "%(asctime)s %(levelname)s %(message)s\n"
_emit = loggers.Handler.emit
_LEVELS = {
    "CRIT": "critical",
    "ERRO": "error",
    "WARN": "warning",
    "INFO": "info",
    "DEBG": "debug",
    "TRAC": "debug",
    "BLAT": "debug",
}


def _json_emit(self: loggers.Handler, record: loggers.LogRecord) -> None:
    if self.fmt != _MAIN_FORMAT:
        return _emit(self, record)
    fields = record.asdict()
    line = json.dumps(
        {
            "timestamp": iso_timestamp(),
            "level": _LEVELS.get(fields["levelname"], "info"),
            "event": fields["message"].rstrip("\n"),
            "logger": "supervisord",
            "pid": os.getpid(),
            "process": "supervisord",
        },
        ensure_ascii=False,
    )
    try:
        self.stream.write(line + "\n" if loggers.is_text_stream(self.stream) else (line + "\n").encode())
        self.flush()
    except Exception:
        self.handleError()


def install_prompt_respawn() -> None:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    original_poll = poller.Poller.poll
    state = {"registered": False, "signalled": False}

    def poll(self: poller.BasePoller, timeout: float) -> tuple[list[int], list[int]]:
        if not state["registered"]:
            self.register_readable(wake_r)
            state["registered"] = True
        if state["signalled"]:  # this pass reaped the child; transition() runs after this poll
            timeout, state["signalled"] = 0, False
        readables, writables = original_poll(self, timeout)
        if wake_r in readables:
            readables.remove(wake_r)
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            state["signalled"] = True
        return readables, writables

    poller.Poller.poll = poll
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)


class SystemdNotifier:
    """sd_notify(3) from supervisord's main loop: what `install_systemd_notify` calls each pass."""

    def __init__(self, notify_socket: str, watchdog_usec: int | None) -> None:
        self.address = "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.watchdog_every = watchdog_usec / 2e6 if watchdog_usec else None
        self.last_ping = 0.0
        self.ready = self.stopping = False
        self.status = ""

    def send(self, text: str) -> None:
        # systemd gone or busy: the next pass says it again (or systemd acts on the silence).
        with contextlib.suppress(OSError):
            self.sock.sendto(text.encode(), self.address)

    def update(self, supervisor: Any) -> None:
        expected = [p for g in supervisor.process_groups.values() for p in g.processes.values() if p.config.autostart]
        states = Counter(getProcessStateDescription(p.get_state()) for p in expected)
        status = f"{states.get(ProcessState.RUNNING, 0)} of {len(expected)} processes RUNNING" + "".join(
            f", {n} {state}" for state, n in sorted(states.items()) if state != ProcessState.RUNNING
        )
        if status != self.status:
            self.status = status
            self.send(f"STATUS={status}")
        if not self.ready and all(p.get_state() == ProcessStates.RUNNING for p in expected):
            self.ready = True
            self.send("READY=1")
        if not self.stopping and supervisor.options.mood < SupervisorStates.RUNNING:
            self.stopping = True
            self.send("STOPPING=1")
        now = time.monotonic()
        if self.watchdog_every is not None and now - self.last_ping >= self.watchdog_every:
            self.last_ping = now
            self.send("WATCHDOG=1")


def install_systemd_notify(environ: Mapping[str, str] = os.environ) -> SystemdNotifier | None:
    """Notify systemd from supervisord's main loop, when NOTIFY_SOCKET says it listens."""
    path = environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    watchdog = int(usec) if usec.isdigit() and (not pid or pid == str(os.getpid())) else None
    notifier = SystemdNotifier(path, watchdog)
    original_tick = supervisord.Supervisor.tick

    def tick(self: supervisord.Supervisor, now: float | None = None) -> None:
        original_tick(self, now)
        try:
            notifier.update(self)
        except Exception as exc:  # noqa: BLE001 - never break supervisord's loop for a notification
            self.options.logger.warn(f"systemd notification failed: {type(exc).__name__}: {exc}")

    supervisord.Supervisor.tick = tick
    return notifier


def install_json_log() -> None:
    loggers.Handler.emit = _json_emit


def control_proxy(server_url: str, timeout: float | None = None) -> xmlrpc.client.ServerProxy:
    """XML-RPC proxy to a running supervisord at `server_url` (`unix:///path/to/socket`).

    `timeout` bounds the connect and each read of a unix socket (supervisor's own transport sets
    none: a wedged supervisord would hang the caller); a timeout raises OSError."""
    transport = SupervisorTransport(None, None, server_url)
    if timeout is not None and server_url.startswith("unix://"):
        path = server_url[len("unix://") :]

        def connection() -> UnixStreamHTTPConnection:
            conn = _TimedUnixConnection("localhost", timeout=timeout)
            conn.socketfile = path
            return conn

        transport._get_connection = connection
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


class ProcessInfo(TypedDict):
    """One process as supervisord's getProcessInfo() answers (times: unix seconds, 0 for never)."""

    name: str
    group: str
    description: str
    start: int
    stop: int
    now: int
    state: int
    statename: str  # a `ProcessState` value
    spawnerr: str
    exitstatus: int
    logfile: str
    stdout_logfile: str
    stderr_logfile: str
    pid: int  # 0 when not running


def all_process_info(proxy: xmlrpc.client.ServerProxy) -> list[ProcessInfo]:
    """supervisord's getAllProcessInfo() through `proxy` (raises what the proxy raises)."""
    # XML-RPC answers are untyped; tests/test_internals_surface.py pins these keys to supervisor's.
    return cast(list[ProcessInfo], proxy.supervisor.getAllProcessInfo())


class _TimedUnixConnection(UnixStreamHTTPConnection):
    socketfile: str

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socketfile)
