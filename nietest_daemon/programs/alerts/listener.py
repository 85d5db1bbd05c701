"""The listener process: threads around one `Engine`, one `FeishuClient` and the protocol.

Threads, so that acknowledging an event never waits for anything but supervisord:
- `protocol`: READY, read one event, put it on the inbox, `RESULT 2\\nOK`. The real stdout
  (fd 1) is kept for this alone: fd 1 is pointed at stderr and sys.stdout is a log stream, so
  a stray print or a library writing to stdout cannot corrupt the protocol.
- `engine`: takes the inbox's inputs (inputs.py) one at a time to `Engine.handle`, and closes
  the coalescing windows on time; finished messages go to `FeishuClient.submit_card` (whose own
  background thread does the HTTP, the retries and the cross-process rate limit).
- `probe`: the blocking I/O: broker PING, draining the streak, watchdog and host events, one XML-RPC
  snapshot of the processes at start.
- `failover` (with a `redis+sentinel://` broker URL only): asks the Sentinels for the primary every
  second; a failover this daemon recorded first goes on the inbox (failover.py).
The main thread waits for SIGTERM (or the end of stdin), hands what is still on the inbox to
the same `Engine.handle`, sends what is pending, removes the marker and exits 0.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import xmlrpc.client
from functools import partial
from typing import Any, BinaryIO

import redis

from nietest_daemon.clients.feishu import FeishuClient
from nietest_daemon.clients.supervisor_events import open_protocol_streams, serve_protocol
from nietest_daemon.coordination import counters, hosts, lifelines, streaks
from nietest_daemon.coordination.connection import redis_client
from nietest_daemon.coordination.events import BrokerFailover
from nietest_daemon.core.logs import get_logger
from nietest_daemon.core.redaction import set_secrets
from nietest_daemon.core.settings import Settings
from nietest_daemon.core.stopping import StopRequest, install_stop_signals
from nietest_daemon.internals.supervisor import all_process_info, control_proxy
from nietest_daemon.programs.alerts.engine import Engine
from nietest_daemon.programs.alerts.failover import FailoverWatch
from nietest_daemon.programs.alerts.inputs import (
    BrokerPing,
    FromBroker,
    Input,
    ListenerRestart,
    ProcessSnapshot,
    SupervisorEvent,
)
from nietest_daemon.programs.alerts.records import Alert, Proc
from nietest_daemon.programs.alerts.render import MAX_ITEMS, clean
from nietest_daemon.programs.alerts.supervisor_log import MARKER_NAME, ExitLog, Marker

log = get_logger(__name__)

#: How often the probe thread pings the broker and drains the streak, watchdog and host events.
PROBE_INTERVAL = 1.0
#: The longest silence from supervisord (no event at all, its TICK_5 included) before the
#: listener exits for supervisord to restart it: the protocol is out of step.
MAX_SUPERVISORD_SILENCE_SECONDS = 60.0


class Listener:
    """The process: threads around one `Engine`, one `FeishuClient` and the protocol."""

    def __init__(self, settings: Settings, stdin: BinaryIO, out_fd: int, stop: StopRequest | None = None) -> None:
        self.settings = settings
        self.stdin = stdin
        self.out_fd = out_fd
        self.stop = stop or StopRequest()  # set by SIGTERM, or by the main thread to end the others
        self.server_url = os.environ.get("SUPERVISOR_SERVER_URL")  # the supervisord that runs us, if one does
        self.inbox: queue.Queue[Input] = queue.Queue()
        self.protocol_done = threading.Event()
        self.protocol_error: BaseException | None = None
        self.last_event = time.monotonic()
        self.redis = redis_client(settings, socket_timeout=3)
        self.host = settings.host_name
        self.client = FeishuClient(
            settings.feishu_alert_webhook_url,
            settings.feishu_webhook_secret,
            self.redis,
            host=self.host,
            on_result=partial(counters.TALLY.feishu_message, "alert"),
        )
        self.exit_log = ExitLog(settings.log_dir / "supervisord.log")
        self.engine = Engine(
            settings,
            self._send,
            exit_status=self.exit_log.take,
            is_recycle=self._is_recycle,
            own_group=os.environ.get("SUPERVISOR_GROUP_NAME") or "alerts",
        )
        self.marker = Marker(settings.run_dir / MARKER_NAME, settings.alert_crash_loop_window)

    def _send(self, alert: Alert) -> None:
        log.info(
            "alert",
            kind=alert.kind.value,
            title=alert.title,
            severity=alert.severity,
            alert_queue=alert.queue,
            subjects=alert.subjects[:MAX_ITEMS],
            content=alert.content[:4000],
            webhook=self.client.configured,
        )
        counters.TALLY.alert(alert.kind.value)
        self.client.submit_card(alert.title, alert.content, alert.severity, queue=alert.queue)

    def _is_recycle(self, proc: Proc, pid: int) -> bool:
        """Whether the worker left its recycle mark on the broker (the engine thread asks, at its exit)."""
        try:
            return counters.recycle_mark(self.redis, self.host, proc.name, pid) is not None
        except (redis.RedisError, OSError, ValueError) as exc:
            log.warning("cannot read the recycle mark", process_key=proc.key, error=clean(str(exc)))
            return False

    def _handle(self, event: Input) -> None:
        try:
            self.engine.handle(event)
        except Exception:
            log.exception("alert engine error", input=type(event).__name__)

    # --- threads --------------------------------------------------------------------------------

    def _on_event(self, headers: dict[str, str], payload: str) -> None:
        self.last_event = time.monotonic()
        self.inbox.put(SupervisorEvent(headers.get("eventname", ""), payload, time.monotonic(), time.time()))

    def _protocol(self) -> None:
        try:
            serve_protocol(self.stdin, self.out_fd, self._on_event)
            log.info("stdin closed: supervisord is gone")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.protocol_error = exc
        finally:
            self.protocol_done.set()

    def _engine(self) -> None:
        engine = self.engine
        while not self.stop.is_set():
            try:
                event = self.inbox.get(timeout=engine.next_due(time.monotonic()) or 0.01)
            except queue.Empty:
                pass
            else:
                self._handle(event)
            try:
                engine.tick(time.monotonic())
            except Exception:
                log.exception("alert engine error", input="tick")

    def _probe(self) -> None:
        snapshot_tries = 0
        while True:
            ok, error = True, None
            try:
                self.redis.ping()
            except Exception as exc:
                ok, error = False, clean(f"{type(exc).__name__}: {exc}")
            self.inbox.put(BrokerPing(ok, error, time.monotonic(), time.time()))
            if ok:
                try:
                    for streak in streaks.drain_events(self.redis):
                        self.inbox.put(FromBroker(streak, time.monotonic()))
                    for report in lifelines.drain_events(self.redis):
                        self.inbox.put(FromBroker(report, time.monotonic()))
                    for host_event in hosts.drain_events(self.redis):
                        self.inbox.put(FromBroker(host_event, time.monotonic()))
                except Exception as exc:
                    log.warning("cannot read streak, watchdog or host events", error=clean(str(exc)))
                counters.TALLY.flush(self.redis, self.host)
            if 0 <= snapshot_tries < 30:  # supervisord answers at once, unless it is very busy starting
                snapshot_tries = -1 if self._snapshot(first=snapshot_tries == 0) else snapshot_tries + 1
            if self.stop.wait(PROBE_INTERVAL):
                return

    def _failover_found(self, event: BrokerFailover) -> None:
        self.inbox.put(FromBroker(event, time.monotonic()))

    def _rpc(self) -> xmlrpc.client.ServerProxy | None:
        """XML-RPC to the supervisord that runs us (SUPERVISOR_SERVER_URL), or None outside supervisord."""
        return control_proxy(self.server_url) if self.server_url else None

    def _snapshot(self, first: bool) -> bool:
        asked = time.monotonic()
        try:
            rpc = self._rpc()
            if rpc is None:
                return True
            infos = all_process_info(rpc)
        except Exception as exc:
            if first:
                log.warning("cannot ask supervisord for its processes yet; retrying", error=clean(str(exc)))
            return False
        self.inbox.put(ProcessSnapshot(list(infos), asked, time.monotonic(), time.time()))
        return True

    # --- main -----------------------------------------------------------------------------------

    def run(self) -> int:
        previous, restarts = self.marker.start(time.time())
        log.info(
            "alerts listener starting",
            webhook=self.client.configured,
            signed=bool(self.settings.feishu_webhook_secret),
            coalesce_seconds=self.settings.alert_coalesce_seconds,
            crash_loop=f"{self.settings.alert_crash_loop_restarts} in {self.settings.alert_crash_loop_window:g}s",
            failure_streak=self.settings.alert_failure_streak,
            previous_clean=previous is None,
        )
        if previous is not None:
            if restarts <= self.settings.alert_crash_loop_restarts:
                self.inbox.put(_listener_restart(previous, restarts))
            else:
                log.error("alerts listener keeps restarting; not alerted again", restarts=restarts)

        threads = [
            threading.Thread(target=self._engine, name="engine", daemon=True),
            threading.Thread(target=self._probe, name="probe", daemon=True),
            threading.Thread(target=self._protocol, name="protocol", daemon=True),
        ]
        watch = FailoverWatch(self.settings, self.redis, self.host) if self.settings.sentinel else None
        if watch is not None:
            report = self._failover_found
            threads.append(threading.Thread(target=watch.run, args=(self.stop, report), name="failover", daemon=True))
        for thread in threads:
            thread.start()

        code = 0
        while not self.stop.is_set() and not self.protocol_done.wait(0.25):
            dead = [t.name for t in threads[:2] if not t.is_alive()]
            if dead and not self.stop.is_set():  # they end by themselves once a stop signal is here
                log.critical("alerts listener thread died; exiting so that supervisord restarts it", threads=dead)
                code = 70
                break
            if time.monotonic() - self.last_event > MAX_SUPERVISORD_SILENCE_SECONDS and self.server_url:
                log.critical(
                    "no event from supervisord for too long (TICK_5 expected); exiting so that it restarts us",
                    seconds=MAX_SUPERVISORD_SILENCE_SECONDS,
                )
                code = 71
                break
        if self.protocol_error is not None:
            log.critical("listener protocol error", error=repr(self.protocol_error)[:500])
            code = 72
        if self.stop.signal_name:
            log.info("alerts listener stopping", signal=self.stop.signal_name)

        self.stop.set()  # the engine and probe threads end
        threads[0].join(2.0)
        self.shutdown()
        if watch is not None:
            watch.close()
        if code == 0:
            self.marker.clean_stop()
        log.info("alerts listener stopped", events=self.engine.events, exit_code=code)
        return code

    def shutdown(self) -> None:
        """Hand over everything still queued, send what is pending now rather than at its window's
        end, and wait a little for the webhook."""
        self.drain()
        try:
            self.engine.flush_all()
        except Exception:
            log.exception("could not send the pending alerts")
        self.client.close(timeout=5.0)
        counters.TALLY.flush(self.redis, self.host)

    def drain(self) -> None:
        """Every input still on the inbox to `Engine.handle`, as the engine thread would have."""
        while True:
            try:
                event = self.inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(event)


def _listener_restart(previous: dict[str, Any], restarts: int) -> ListenerRestart:
    """The input telling of the previous listener, from its marker's record."""
    pid, started = previous.get("pid"), previous.get("started_at")
    return ListenerRestart(
        pid=pid if isinstance(pid, int) else None,
        started_at=float(started) if isinstance(started, int | float) else None,
        restarts=restarts,
        mono=time.monotonic(),
    )


def run(settings: Settings) -> int:
    """`nietest alerts`: logs are already JSON on stderr (see __main__); fds 0/1 carry the protocol."""
    set_secrets(settings.secrets())
    stdin, out_fd = open_protocol_streams()
    stop = install_stop_signals(ignore_hangup=True)
    return Listener(settings, stdin, out_fd, stop).run()
