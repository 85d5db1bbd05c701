"""JSON logs for every nietest process.

One stdlib handler renders everything -- structlog events, dramatiq / redis / httpx / pymongo
records, stray writes to sys.stderr, uncaught exceptions -- as one JSON object per line:
`timestamp` (ISO-8601 UTC, ms, Z), `level`, `event`, `logger`, `pid`, `process`, bound context
(`queue`, `actor`, `message_id`, ...), exceptions as a structured `exception` field. Known
secrets, URL passwords and Feishu hook tokens are masked in the rendered line (by the shared
redactor of core.redaction), and no line exceeds 16 KiB.

`configure()` uses only the standard library, structlog and core.redaction (standard library
only), so the entry point calls it before importing anything else: even an import error reaches the log file as JSON.

Logger names, one scheme: every nietest module logs through `get_logger(__name__)`, so a line's
`logger` is the module that wrote it (e.g. `nietest_daemon.pipeline.middleware.task_tracker`).
Libraries keep their own names (`dramatiq.worker`, `httpx`). The other names are deliberate and
name where a line comes from rather than which module wrote it: `valkey` (programs/embedded_broker.py
relays valkey-server's own lines), `supervisord` (its main log, rendered by internals/supervisor.py),
`stdout` and `stderr` (stray writes, captured here) and `nietest` (uncaught exceptions, from the
hooks installed here).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import MutableMapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO, cast

import structlog
import structlog.tracebacks
from structlog.typing import EventDict, Processor, WrappedLogger

from nietest_daemon.core.redaction import redact

MAX_LINE_BYTES = 16 * 1024
_CORE_KEYS = ("timestamp", "level", "event", "logger", "pid", "process")


def iso_timestamp(epoch: float | None = None) -> str:
    """ISO-8601 UTC with milliseconds and `Z`: the `timestamp` of every nietest log line."""
    now = datetime.now(UTC) if epoch is None else datetime.fromtimestamp(epoch, UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _timestamp(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    event["timestamp"] = iso_timestamp()
    return event


def _process_fields(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    event.setdefault("pid", os.getpid())
    event.setdefault("process", os.environ.get("SUPERVISOR_PROCESS_NAME") or _PROCESS_NAME)
    return event


def _stdlib_fields(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    record = event.pop("_record", None)
    event.pop("_from_structlog", None)
    if record is not None:
        event.setdefault("logger", record.name)
        if record.levelno >= logging.WARNING and record.name not in ("stdout", "stderr"):
            event.setdefault("source", f"{record.module}:{record.lineno}")
    return event


def render_line(event: MutableMapping[str, Any]) -> str:
    """Serialize, redact and cap one event at MAX_LINE_BYTES."""
    event.pop("exc_info", None)
    ordered = {k: event.pop(k) for k in _CORE_KEYS if k in event}
    ordered.update(event)
    line = redact(json.dumps(ordered, default=str, ensure_ascii=False))
    if len(line.encode()) <= MAX_LINE_BYTES:
        return line
    # Too long: shorten every long value, then drop whatever is still too big.
    shortened: dict[str, Any] = {}
    for key, value in ordered.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
        if key in _CORE_KEYS and key != "event":
            shortened[key] = value
        elif len(text) > 2048:
            shortened[key] = text[:2048] + f"... [{len(text) - 2048} chars cut]"
        else:
            shortened[key] = value
    shortened["truncated"] = True
    line = redact(json.dumps(shortened, default=str, ensure_ascii=False))
    if len(line.encode()) <= MAX_LINE_BYTES:
        return line
    core = {k: shortened[k] for k in _CORE_KEYS if k in shortened}
    core["truncated"] = True
    return redact(json.dumps(core, default=str, ensure_ascii=False))[:MAX_LINE_BYTES]


def _render(_: WrappedLogger, __: str, event: EventDict) -> str:
    return render_line(event)


_PRE_CHAIN: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    _timestamp,
    _process_fields,
]
_PROCESS_NAME = "nietest"
_configured = False


class _StreamToLog:
    """Replaces sys.stdout / sys.stderr: each line written becomes one JSON log record.

    A stray print() or a library writing to stderr then cannot put a non-JSON line, or an
    unredacted secret, into a log file.
    """

    def __init__(self, name: str, level: int, fd: int) -> None:
        self._buffer = ""
        self._lock = threading.Lock()
        self._log = logging.getLogger(name)
        self._level = level
        self._fd = fd

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            if line.strip():
                self._log.log(self._level, line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            rest, self._buffer = self._buffer, ""
        if rest.strip():
            self._log.log(self._level, rest)

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd

    @property
    def encoding(self) -> str:
        return "utf-8"


def configure(
    process: str = "nietest",
    *,
    level: str | None = None,
    stream: TextIO | None = None,
    capture_std: bool = True,
) -> None:
    """Route all logging of this process through the JSON renderer onto `stream` (stdout).

    With `capture_std`, later writes to sys.stdout and sys.stderr become log records too.
    """
    global _PROCESS_NAME, _configured
    _PROCESS_NAME = process
    level = level or os.environ.get("NIETEST_LOG_LEVEL", "INFO").upper()
    if level not in logging.getLevelNamesMapping():
        level = "INFO"
    out = stream or sys.__stdout__ or sys.stdout
    if hasattr(out, "reconfigure"):
        out.reconfigure(line_buffering=True)

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_PRE_CHAIN, structlog.stdlib.ExtraAdder()],
        processors=[
            _stdlib_fields,
            # Structured exceptions, without frame locals: locals can hold secrets and huge values.
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            _render,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Chatty libraries: their debug output is noise in production logs.
    for name in ("httpx", "httpcore", "pymongo", "urllib3"):
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelName(level)))
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            *_PRE_CHAIN,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )

    if capture_std and not isinstance(sys.stderr, _StreamToLog):
        sys.stdout = _StreamToLog("stdout", logging.INFO, 1)
        sys.stderr = _StreamToLog("stderr", logging.ERROR, 2)

    def excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            return
        logging.getLogger("nietest").critical("unhandled exception", exc_info=(exc_type, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        logging.getLogger("nietest").critical(
            "unhandled exception in thread",
            # exc_value may be None (typeshed's tuple wants an exception); logging formats it as is.
            exc_info=cast(
                tuple[type[BaseException], BaseException, TracebackType | None],
                (args.exc_type, args.exc_value, args.exc_traceback),
            ),
            # Not `thread`: a LogRecord attribute; the clash made this hook raise and lose the exception.
            extra={"thread_name": getattr(args.thread, "name", None)},
        )

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    _configured = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
