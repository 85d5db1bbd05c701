"""Every use of supervisor's internals, in this one module.

- `install_json_log`: supervisord's main log lines rendered as JSON with the workers' keys
  (`loggers.Handler.emit` replaced; children's captured output, already JSON, is not touched).
- `install_prompt_respawn`: supervisord's main loop polls with a 1 s timeout and SIGCHLD does not
  interrupt it, so a killed worker is noticed up to 1 s late and respawned only on the pass after
  that. A wakeup pipe (signal.set_wakeup_fd) registered with its poller (`poller.Poller.poll`
  wrapped) ends the poll as soon as a signal arrives, and the pass after it does not wait.
- `control_proxy`: the XML-RPC client of supervisord's unix control socket (`supervisor.xmlrpc`).
- `EXITED_LINE`: supervisord's log line for a process exit, the only place its exit status is
  written (the PROCESS_STATE event carries none); the alerts listener reads it.

tests/test_internals_surface.py pins what these rely on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import xmlrpc.client

from supervisor import loggers, poller
from supervisor.xmlrpc import SupervisorTransport

from nietest_daemon.core.logs import iso_timestamp

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


def install_json_log() -> None:
    loggers.Handler.emit = _json_emit


def control_proxy(server_url: str) -> xmlrpc.client.ServerProxy:
    """XML-RPC proxy to a running supervisord at `server_url` (`unix:///path/to/socket`)."""
    transport = SupervisorTransport(None, None, server_url)
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
