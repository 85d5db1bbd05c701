"""`nietest watchdog`: the supervisord event listener that keeps the workers honest.

**An exited worker's messages go back at once.**
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

**A silent worker is killed.** Every worker beats once a second (coordination/lifelines.py).
Once a second the watchdog compares the beats of the RUNNING workers with NIETEST_HANG_SECONDS
(counted from the process's start if it has not beaten yet): a worker silent that long, being
stopped (SIGSTOP), deadlocked, stuck in C with the GIL held, or holding a message far past its
time limit, is killed with SIGKILL through supervisord, which starts another; its EXITED event
then hands its messages back, as above. The alerts listener is told (`worker unresponsive`).

**The host keeper** (programs/host_keeper.py) runs as a thread of this program: the daemon's lease
on NIETEST_HOST_NAME, the fencing of this host after it was declared lost, and the takeover of the
other hosts that are lost.

**Every unrequested exit is counted** (`count_restart`) in `nietest_process_restarts_total`
(coordination/counters.py): `hang` when this watchdog killed the process for silence, `recycle`
when the worker marked its exit as one before leaving, else `crash`.

Its stdout is the event protocol (`clients/supervisor_events.py`); its JSON log goes to stderr.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import xmlrpc.client
from collections.abc import Callable
from typing import BinaryIO

import redis

from nietest_daemon.clients.supervisor_events import open_protocol_streams, parse_tokens, serve_protocol
from nietest_daemon.coordination import counters, lifelines
from nietest_daemon.coordination.connection import redis_client
from nietest_daemon.coordination.events import WorkerUnresponsive
from nietest_daemon.core.logs import get_logger
from nietest_daemon.core.redaction import set_secrets
from nietest_daemon.core.settings import QUEUE_KEYS, Settings
from nietest_daemon.core.stopping import install_stop_signals
from nietest_daemon.domain.process_state import ProcessState
from nietest_daemon.internals.dramatiq_redis import NietestRedisBroker, process_identity
from nietest_daemon.internals.supervisor import ProcessInfo, all_process_info, control_proxy
from nietest_daemon.pipeline.broker import build_broker
from nietest_daemon.programs.host_keeper import HostKeeper

log = get_logger(__name__)

HUNG_MEMORY_SECONDS = 300.0  # how long a killed worker's exit is awaited to be counted as a hang
KEEPER_RPC_TIMEOUT = 5.0  # the host keeper's calls to supervisord


class Watchdog:
    """Handles supervisord's events: an exited worker's messages go back to their queue."""

    def __init__(self, settings: Settings, broker: NietestRedisBroker, host: str) -> None:
        self.settings = settings
        self.broker = broker
        self.host = host
        self.queues = {key: settings.queue(key).name for key in QUEUE_KEYS}
        self.killed: set[str] = set()  # lifelines of the processes killed for silence, until they exit
        # The same, until their exit is counted as a `hang` restart: the check thread adds, the event
        # thread takes, under the lock.
        self.hung: dict[str, float] = {}
        self._hung_lock = threading.Lock()
        self.kill: Callable[[str], None] | None = None  # signals `group:name` with SIGKILL (supervisord)
        # Silence counts only from the first check that could read the lifelines: from the start,
        # and again after the broker was unreachable (no worker could beat meanwhile).
        self.watching_since: float | None = None

    def handle(self, headers: dict[str, str], payload: str) -> None:
        event = headers.get("eventname")
        fields = parse_tokens(payload.split("\n", 1)[0])
        if event == "PROCESS_STATE_BACKOFF":  # died while starting: a restart too, supervisord retries it
            self.count(fields.get("groupname", ""), fields.get("processname", ""), "crash")
            return
        if event != "PROCESS_STATE_EXITED":
            return
        group, name, pid = fields.get("groupname", ""), fields.get("processname", ""), fields.get("pid", "")
        expected = fields.get("expected") == "1"
        if group in self.queues and pid.isdigit():
            self.hand_back(group, name, int(pid), expected=expected)
        if not expected and pid.isdigit():
            self.count_restart(group, name, int(pid))

    def count_restart(self, group: str, name: str, pid: int) -> str | None:
        """Count an exit nobody asked for in `nietest_process_restarts_total`: a `hang` when this
        watchdog killed it, a `recycle` when the worker said so before exiting, else a `crash`."""
        member = lifelines.member(name, pid)
        with self._hung_lock:
            hung = self.hung.pop(member, None) is not None
        try:
            recycled = (
                not hung
                and group in self.queues
                and counters.recycle_mark(self.broker.client, self.host, name, pid) is not None
            )
        except (redis.RedisError, OSError, ValueError):
            recycled = False
        reason = "hang" if hung else "recycle" if recycled else "crash"
        return reason if self.count(group, name, reason) else None

    def count(self, group: str, name: str, reason: str) -> bool:
        """Add one restart of `group:name` for `reason` to the metrics; False if the broker is away."""
        inc = counters.Increments()
        inc.count(counters.PROCESS_RESTARTS, program=group, process=name, reason=reason)
        try:
            counters.add_call(self.host, inc).run(self.broker.client)
        except (redis.RedisError, OSError) as exc:
            log.warning("could not count a restart in the metrics", process_name=name, error=str(exc))
            return False
        return True

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
        with contextlib.suppress(redis.RedisError, OSError):  # a dead pid's leftover member is never read
            lifelines.forget(self.broker.client, self.host, lifelines.member(name, pid))
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

    def check(self, infos: list[ProcessInfo], now: float) -> list[str]:
        """Kill the RUNNING workers silent for longer than NIETEST_HANG_SECONDS (`infos`:
        supervisord's getAllProcessInfo()); the `group:name` of each one killed."""
        workers = [
            i for i in infos if i["group"] in self.queues and i["statename"] == ProcessState.RUNNING and i["pid"]
        ]
        members = [lifelines.member(i["name"], i["pid"]) for i in workers]
        beats = lifelines.last_beats(self.broker.client, self.host, members)
        if self.watching_since is None:
            self.watching_since = now
        self.killed &= set(members)
        hung = []
        for info, member, last in zip(workers, members, beats, strict=True):
            silent = now - max(last or 0.0, float(info["start"]), self.watching_since)
            if silent <= self.settings.hang_seconds or member in self.killed:
                continue
            self.killed.add(member)
            with self._hung_lock:
                for old in [m for m, t in self.hung.items() if now - t >= HUNG_MEMORY_SECONDS]:
                    del self.hung[old]
                self.hung[member] = now
            hung.append((info, silent, last))
        for info, silent, last in hung:
            self._kill(info, silent, last)
        return [f"{info['group']}:{info['name']}" for info, _, _ in hung]

    def _kill(self, info: ProcessInfo, silent: float, last: float | None) -> None:
        key = f"{info['group']}:{info['name']}"
        log.error(
            "worker unresponsive; killing it",
            process_name=key,
            hung_pid=info["pid"],
            silent_seconds=round(silent, 1),
            last_sign_of_life=last,
            hang_seconds=self.settings.hang_seconds,
        )
        if self.kill is not None:
            self.kill(key)
        lifelines.report_unresponsive(
            self.broker.client,
            WorkerUnresponsive(
                queue=self.queues[info["group"]],
                process=key,
                pid=info["pid"],
                silent_seconds=round(silent, 1),
                host=self.host,
                at=time.time(),
            ),
        )


def _checking(watchdog: Watchdog, rpc: xmlrpc.client.ServerProxy) -> None:
    """The watchdog's once-a-second check of the workers' lifelines, in a thread of its own."""

    def kill(key: str) -> None:
        rpc.supervisor.signalProcess(key, "KILL")

    watchdog.kill = kill
    while True:
        try:
            watchdog.check(all_process_info(rpc), time.time())
        except Exception as exc:  # noqa: BLE001 - the next pass tries again
            watchdog.watching_since = None
            log.warning("lifeline check failed", error=f"{type(exc).__name__}: {exc}"[:300])
        time.sleep(lifelines.BEAT_SECONDS)


def run(settings: Settings) -> int:
    """`nietest watchdog`, as supervisord runs it."""
    set_secrets(settings.secrets())
    stdin: BinaryIO
    stdin, out_fd = open_protocol_streams()
    stop = install_stop_signals(interrupt=True)
    watchdog = Watchdog(settings, build_broker(settings), settings.host_name)
    log.info(
        "watchdog starting",
        host=watchdog.host,
        queues=sorted(watchdog.queues.values()),
        hang_seconds=settings.hang_seconds,
    )
    server_url = os.environ.get("SUPERVISOR_SERVER_URL")
    if server_url:
        threading.Thread(target=_checking, args=(watchdog, control_proxy(server_url)), daemon=True).start()
    keeper = HostKeeper(
        settings,
        watchdog.broker,
        control_proxy(server_url, timeout=KEEPER_RPC_TIMEOUT) if server_url else None,
        # A read that hangs (a partition) must not outlast the lease it is renewing.
        client=redis_client(settings, socket_timeout=max(1.0, min(5.0, settings.host_lost_seconds / 2))),
    )
    threading.Thread(target=keeper.run, name="keeper", daemon=True).start()
    try:
        serve_protocol(stdin, out_fd, watchdog.handle)
        log.info("stdin closed: supervisord is gone")
        keeper.close(graceful=False)
    except SystemExit:
        log.info("watchdog stopping", signal=stop.signal_name)
        keeper.close(graceful=True)
    return 0
