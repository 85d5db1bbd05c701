"""`nietest watchdog`: the supervisord event listener that hands a dead worker's messages back.

A worker fetches messages ahead of running them (prefetch) and holds its polls in memory until
they are due: all of them sit in its ack sets on the broker. When the worker dies, Dramatiq
returns them only once the worker's heartbeat is older than NIETEST_BROKER_HEARTBEAT_TIMEOUT
(60 s by default). supervisord knows at once: on PROCESS_STATE_EXITED of a worker, for any
reason, this listener marks the broker ids of exactly that process (`<host>/<process>/<pid>/...`,
see `NietestRedisBroker.name_process`) dead and runs the queue maintenance that hands their
messages back, within milliseconds.

Only an exited process is treated this way, so a message never runs twice while its first run
is alive. A worker that died while starting (BACKOFF, which names no pid) is left to the
heartbeat timeout: its name may already belong to the replacement.

Its stdout is the event protocol (`event_listener.py`); its JSON log goes to stderr.
"""

from __future__ import annotations

import signal
import socket
import time
from typing import Any, BinaryIO

import redis

from nietest_daemon.core.logs import get_logger
from nietest_daemon.core.redaction import set_secrets
from nietest_daemon.core.settings import QUEUE_KEYS, Settings
from nietest_daemon.internals.dramatiq_redis import NietestRedisBroker, process_identity
from nietest_daemon.pipeline.broker import build_broker
from nietest_daemon.programs.event_listener import open_protocol_streams, parse_tokens, serve_protocol

log = get_logger(__name__)


class Watchdog:
    """Handles supervisord's events: an exited worker's messages go back to their queue."""

    def __init__(self, settings: Settings, broker: NietestRedisBroker, host: str) -> None:
        self.settings = settings
        self.broker = broker
        self.host = host
        self.queues = {key: settings.queue(key).name for key in QUEUE_KEYS}

    def handle(self, headers: dict[str, str], payload: str) -> None:
        if headers.get("eventname") != "PROCESS_STATE_EXITED":
            return
        fields = parse_tokens(payload.split("\n", 1)[0])
        group, name, pid = fields.get("groupname", ""), fields.get("processname", ""), fields.get("pid", "")
        if group not in self.queues or not pid.isdigit():
            return
        self.hand_back(group, name, int(pid), expected=fields.get("expected") == "1")

    def hand_back(self, group: str, name: str, pid: int, *, expected: bool) -> int:
        """Hand back what worker `name` (pid `pid`) of queue `group` held; how many messages."""
        started = time.monotonic()
        try:
            count = self.broker.hand_back_dead(process_identity(self.host, name, pid), [self.queues[group]])
        except (redis.RedisError, OSError) as exc:
            log.warning(
                "could not hand back an exited worker's messages; they come back after the heartbeat timeout",
                process_name=name,
                exited_pid=pid,
                error=str(exc),
            )
            return 0
        if count or not expected:
            log.info(
                "exited worker's messages handed back",
                process_name=name,
                exited_pid=pid,
                expected=expected,
                messages=count,
                ms=round((time.monotonic() - started) * 1000, 1),
            )
        return count


def run(settings: Settings) -> int:
    """`nietest watchdog`, as supervisord runs it."""
    set_secrets(settings.secrets())
    stdin: BinaryIO
    stdin, out_fd = open_protocol_streams()
    stopping: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    watchdog = Watchdog(settings, build_broker(settings), socket.gethostname())
    log.info("watchdog starting", host=watchdog.host, queues=sorted(watchdog.queues.values()))
    try:
        serve_protocol(stdin, out_fd, watchdog.handle)
        log.info("stdin closed: supervisord is gone")
    except SystemExit:
        log.info("watchdog stopping", signal=signal.Signals(stopping[0]).name if stopping else None)
    return 0
