"""supervisord, as `nietest daemon` runs it: supervisor's own main with two small changes.

`nietest daemon` execs `python -m nietest_daemon.supervisord -n -c etc/supervisord.conf`.

1. JSON logs: the lines of supervisord's main log (supervisord.log and, in the foreground,
   stdout: the journal under systemd) are rendered with the same keys as the workers'
   (`timestamp`, `level`, `event`, `logger`, `pid`, `process`). The captured output of the
   children is not touched: it is already JSON.
2. Prompt respawn: supervisord's main loop polls with a 1 s timeout and SIGCHLD does not
   interrupt it, so a killed worker is noticed up to 1 s late and respawned only on the
   pass after that: 1-2 s of lost capacity per crash. A wakeup pipe (signal.set_wakeup_fd)
   ends the poll as soon as a signal arrives, and the pass after it does not wait, so the
   replacement is spawned within milliseconds. Idle, the loop still wakes once a second.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from supervisor import loggers, poller
from supervisor.supervisord import main as supervisord_main

from nietest_daemon.logs import iso_timestamp

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


def _install_prompt_respawn() -> None:
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


def main() -> None:
    loggers.Handler.emit = _json_emit
    _install_prompt_respawn()
    sys.argv[0] = "supervisord"
    supervisord_main()


if __name__ == "__main__":
    main()
