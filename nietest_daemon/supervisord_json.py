"""supervisord with its own log lines written as JSON, like every other nietest log.

`nietest daemon` execs `python -m nietest_daemon.supervisord_json -n -c etc/supervisord.conf`:
this is supervisor's own `supervisord` main, unchanged except that the lines of its main log
(supervisord.log and, in the foreground, stdout: the journal under systemd) are rendered with
the same keys as the workers' (`timestamp`, `level`, `event`, `logger`, `pid`, `process`).
The captured output of the children is not touched: it is already JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

from supervisor import loggers
from supervisor.supervisord import main as supervisord_main

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
    now = time.time()
    line = json.dumps(
        {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
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


def main() -> None:
    loggers.Handler.emit = _json_emit
    sys.argv[0] = "supervisord"
    supervisord_main()


if __name__ == "__main__":
    main()
