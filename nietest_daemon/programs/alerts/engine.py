"""The alert rules and their coalescing windows: `Engine`.

Every kind is coalesced: the first alert of a kind opens a window of
NIETEST_ALERT_COALESCE_SECONDS; everything of that kind arriving within it goes out as one
message when it closes (eight workers killed together: one message listing eight). Kinds due
at the same moment go out in `AlertKind`'s order. Which input raises which kind is told in
the package's docstring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import assert_never

from nietest_daemon.clients.supervisor_events import parse_tokens
from nietest_daemon.coordination.events import (
    BrokerFailover,
    FailureRun,
    HostBack,
    HostLost,
    QueueRecovered,
    WorkerUnresponsive,
)
from nietest_daemon.core.logs import get_logger
from nietest_daemon.core.settings import Settings
from nietest_daemon.domain.process_state import ALIVE, ProcessState
from nietest_daemon.programs.alerts import render
from nietest_daemon.programs.alerts.inputs import (
    BrokerEvent,
    BrokerPing,
    FromBroker,
    Input,
    ListenerRestart,
    ProcessSnapshot,
    SupervisorEvent,
)
from nietest_daemon.programs.alerts.kinds import AlertKind
from nietest_daemon.programs.alerts.records import Alert, Degraded, Exit, Item, Proc

log = get_logger(__name__)

#: The broker must fail to answer PINGs for this long before it is reported unreachable.
BROKER_GRACE_SECONDS = 10.0
#: States in which supervisord's snapshot gives a process's start time.
_STARTED = ALIVE | {ProcessState.BACKOFF}


class Engine:
    """The alert logic. Not thread-safe: one thread calls `handle` and `tick` in order.

    Times come with the inputs (`mono` from time.monotonic, `wall` from time.time) and `tick`,
    so the unit tests drive it with a fake clock. What it reads outside itself is injected:
    `exit_status(name, wall)` (supervisord's log), `is_recycle(proc, pid)` (the worker's recycle
    mark on the broker), `read_log(proc)` (a process's log, for FATAL).
    """

    def __init__(
        self,
        settings: Settings,
        send: Callable[[Alert], None],
        *,
        exit_status: Callable[[str, float], str | None] = lambda name, wall: None,
        is_recycle: Callable[[Proc, int], bool] = lambda proc, pid: False,
        read_log: Callable[[Proc], list[str]] | None = None,
        own_group: str | None = None,
        broker_grace: float = BROKER_GRACE_SECONDS,
    ) -> None:
        self.settings = settings
        self.send = send
        self.exit_status = exit_status
        self.is_recycle = is_recycle
        self.read_log = read_log or (lambda proc: render.log_tail(self._logfile(proc)))
        self.own_group = own_group
        self.coalesce = settings.alert_coalesce_seconds
        self.window = settings.alert_crash_loop_window
        self.threshold = settings.alert_crash_loop_restarts
        self.broker_grace = broker_grace
        self.queue_names = {q.key: q.name for q in settings.queues.values()}
        self.procs: dict[str, Proc] = {}
        self.pending: dict[AlertKind, tuple[float, list[Item]]] = {}
        self.broker_down_since: float | None = None
        self.broker_down_wall: float | None = None
        self.broker_error: str | None = None
        self.broker_alerted = False
        self.sent: list[Alert] = []  # the last messages (kept short), for tests and logs
        self.events = 0

    # --- inputs ---------------------------------------------------------------------------------

    def handle(self, event: Input) -> None:
        """One input, of any kind: the one entry for the engine thread's loop and the shutdown drain."""
        match event:
            case SupervisorEvent():
                self._supervisor_event(event)
            case BrokerPing():
                self._broker_ping(event)
            case ProcessSnapshot():
                self._snapshot(event)
            case FromBroker():
                self._from_broker(event.event, event.mono)
            case ListenerRestart():
                self._listener_restart(event)
            case _:
                assert_never(event)

    def proc(self, group: str, name: str) -> Proc:
        key = f"{group}:{name}"
        proc = self.procs.get(key)
        if proc is None:
            proc = self.procs[key] = Proc(key, group, name, self.queue_names.get(group))
        return proc

    def _supervisor_event(self, event: SupervisorEvent) -> None:
        self.events += 1
        if not event.eventname.startswith("PROCESS_STATE_"):
            return
        fields = parse_tokens(event.payload.split("\n", 1)[0])
        group, name = fields.get("groupname", ""), fields.get("processname", "")
        if not name or (self.own_group and group == self.own_group):
            return
        state_name = event.eventname.removeprefix("PROCESS_STATE_")
        state = ProcessState.of(state_name)
        proc = self.proc(group or name, name)
        proc.seen_event = True
        log.info(
            "process state",
            process_key=proc.key,
            state=state_name,
            from_state=fields.get("from_state"),
            expected=fields.get("expected"),
            process_pid=fields.get("pid"),
        )
        previous, proc.state = proc.state, state
        mono, wall = event.mono, event.wall
        if state is ProcessState.STARTING:
            proc.spawned_at, proc.pid, proc.running_since = mono, None, None
        elif state is ProcessState.RUNNING:
            proc.running_since = mono
            with contextlib.suppress(ValueError):
                proc.pid = int(fields.get("pid", ""))
        elif state in (ProcessState.EXITED, ProcessState.BACKOFF):
            status = self.exit_status(name, wall) or "exit status unknown"  # read even if expected: in order
            if state is ProcessState.EXITED and fields.get("expected") == "1":
                return
            exit_ = Exit(mono, wall, status, self._ran(proc, mono), state is ProcessState.BACKOFF)
            pid = fields.get("pid", "")
            if state is ProcessState.EXITED and pid.isdigit() and self._marked_recycle(proc, int(pid)):
                self._recycled(proc, exit_)
            else:
                self._unexpected_exit(proc, exit_)
        elif state is ProcessState.FATAL:
            self._fatal(proc, mono, wall)
        elif state is ProcessState.STOPPED and proc.degraded:
            log.info("process stopped by request; its crash-loop state is cleared", process_key=proc.key)
            proc.degraded, proc.exits_while_degraded = None, 0
            proc.exits.clear()
        elif state is ProcessState.UNKNOWN:
            log.warning("process in UNKNOWN state", process_key=proc.key, from_state=previous)

    def _snapshot(self, snapshot: ProcessSnapshot) -> None:
        """supervisord's getAllProcessInfo(), asked once at start.

        A listener hears of the processes started with it only once it is RUNNING itself (its
        startsecs later): supervisord's own start times are the right ones. A STARTING event
        received after the snapshot was asked is newer than it and wins.
        """
        mono, wall = snapshot.mono, snapshot.wall
        for info in snapshot.infos:
            group, name = str(info.get("group", "")), str(info.get("name", ""))
            if not name or (self.own_group and group == self.own_group):
                continue
            proc = self.proc(group, name)
            proc.logfile = info.get("stdout_logfile") or proc.logfile
            if proc.spawned_at is not None and proc.spawned_at > snapshot.asked:
                continue
            statename = str(info.get("statename", ""))
            state = ProcessState.of(statename) if statename else None
            if not proc.seen_event:
                proc.state = state or proc.state
                proc.pid = info.get("pid") or None
            start = float(info.get("start") or 0)
            if start and state is not None and state in _STARTED:
                proc.spawned_at = mono - max(0.0, wall - start)
                if proc.state is ProcessState.RUNNING and state is ProcessState.RUNNING:
                    proc.running_since = max(proc.spawned_at, proc.running_since or proc.spawned_at)

    def _from_broker(self, event: BrokerEvent, mono: float) -> None:
        match event:
            case WorkerUnresponsive():
                self._unresponsive(event, mono)
            case FailureRun():
                render_run = partial(render.failure_run, event, self.settings.alert_failure_streak)
                self._add(Item(AlertKind.FAILURE_RUN, event.queue, event.queue, render_run), mono)
            case QueueRecovered():
                render_recovered = partial(render.queue_recovered, event)
                self._add(Item(AlertKind.QUEUE_RECOVERED, event.queue, event.queue, render_recovered), mono)
            case HostLost():
                self._add(Item(AlertKind.HOST_LOST, None, event.host, partial(render.host_lost, event)), mono)
            case HostBack():
                self._add(Item(AlertKind.HOST_BACK, None, event.host, partial(render.host_back, event)), mono)
            case BrokerFailover():
                subject = f"{event.master} now at {event.new} (was {event.old})"
                self._add(Item(AlertKind.BROKER_FAILOVER, None, subject, partial(render.broker_failover, event)), mono)
            case _:
                assert_never(event)

    def _unresponsive(self, report: WorkerUnresponsive, mono: float) -> None:
        """The watchdog killed a worker that gave no sign of life."""
        group, _, name = report.process.partition(":")
        proc = self.proc(group, name or group)
        hang = self.settings.hang_seconds
        self._drop(AlertKind.RESTART, report.process)  # the kill's restart alert says less: this one replaces it
        text = partial(render.unresponsive, report, proc, hang)
        self._add(Item(AlertKind.UNRESPONSIVE, report.queue, report.process, text, worker=True), mono)

    def _broker_ping(self, ping: BrokerPing) -> None:
        mono, wall = ping.mono, ping.wall
        if ping.ok:
            if self.broker_alerted and self.broker_down_since is not None:
                down_for = mono - self.broker_down_since
                since = self.broker_down_wall or wall
                broker = self._broker_name()
                self._add(
                    Item(AlertKind.BROKER_UP, None, "broker", lambda: render.broker_up(broker, down_for, since)), mono
                )
            if self.broker_down_since is not None:
                log.info("broker reachable", down_seconds=round(mono - self.broker_down_since, 3))
            self.broker_down_since, self.broker_down_wall, self.broker_alerted = None, None, False
            return
        if self.broker_down_since is None:
            self.broker_down_since, self.broker_down_wall = mono, wall
            # info: at every start the listener is up before the embedded broker; the alert says the rest
            log.info("broker does not answer", broker=self._broker_name(), error=ping.error)
        self.broker_error = ping.error

    def _listener_restart(self, restart: ListenerRestart) -> None:
        """The previous listener ended without a clean stop (see supervisor_log.Marker)."""
        loop = restart.restarts >= self.threshold

        def text() -> str:
            return render.listener_restart(restart.pid, restart.started_at, restart.restarts, self.window, loop)

        self._add(Item(AlertKind.LISTENER_RESTART, None, "alerts", text), restart.mono)

    # --- time -----------------------------------------------------------------------------------

    def tick(self, mono: float) -> None:
        """Recoveries, the broker's grace period, and the windows that have closed."""
        for proc in self.procs.values():
            if (
                proc.degraded
                and proc.state is ProcessState.RUNNING
                and proc.running_since is not None
                and mono - proc.running_since >= self.window
            ):
                self._recovered(proc, mono)
        if (
            self.broker_down_since is not None
            and not self.broker_alerted
            and mono - self.broker_down_since >= self.broker_grace
        ):
            self.broker_alerted = True
            broker, since, error = self._broker_name(), self.broker_down_wall, self.broker_error
            self._add(
                Item(AlertKind.BROKER_DOWN, None, "broker", lambda: render.broker_down(broker, since, error)), mono
            )
        for kind in AlertKind:
            entry = self.pending.get(kind)
            if entry and mono - entry[0] >= self.coalesce:
                self._flush(kind)

    def next_due(self, mono: float) -> float:
        """Seconds until the next window closes (at most 0.5: recoveries are polled)."""
        waits = [opened + self.coalesce - mono for opened, _ in self.pending.values()]
        return max(0.0, min([0.5, *waits]))

    def flush_all(self) -> None:
        """Send every waiting message now (at shutdown)."""
        for kind in AlertKind:
            if kind in self.pending:
                self._flush(kind)

    # --- the rules ------------------------------------------------------------------------------

    def _ran(self, proc: Proc, mono: float) -> float | None:
        return None if proc.spawned_at is None else mono - proc.spawned_at

    def _logfile(self, proc: Proc) -> Path:
        return Path(proc.logfile) if proc.logfile else self.settings.log_dir / f"{proc.name}.log"

    def _broker_name(self) -> str:
        return self.settings.broker_description  # already without its password

    def _is_worker(self, proc: Proc) -> bool:
        return proc.group in self.queue_names

    def _marked_recycle(self, proc: Proc, pid: int) -> bool:
        """Whether worker `proc` (pid `pid`) marked its exit as a recycle before leaving.

        Only workers recycle, and with the broker out of reach none could leave a mark: the
        others are not looked up (a lookup would wait for the broker's timeout).
        """
        return self._is_worker(proc) and self.broker_down_since is None and self.is_recycle(proc, pid)

    def _unexpected_exit(self, proc: Proc, exit_: Exit) -> None:
        proc.exits.append(exit_)
        recent = [e for e in proc.exits if e.mono > exit_.mono - self.window]
        if proc.degraded:
            proc.exits_while_degraded += 1
            log.info("unexpected exit while degraded; not alerted again", process_key=proc.key, state=proc.degraded)
            return
        worker = self._is_worker(proc)
        if len(recent) >= self.threshold:
            proc.degraded, proc.degraded_at, proc.exits_while_degraded = Degraded.CRASH_LOOP, exit_.mono, 0
            self._drop(AlertKind.RESTART, proc.key)
            loop = partial(render.crash_loop, proc, recent, self.window, self.threshold)
            self._add(Item(AlertKind.CRASH_LOOP, proc.queue, proc.key, loop, worker), exit_.mono)
            return
        if exit_.during_start:
            return  # supervisord retries it; a crash loop or FATAL says more if it keeps failing
        restart = partial(render.restart, proc, exit_)
        self._add(Item(AlertKind.RESTART, proc.queue, proc.key, restart, worker), exit_.mono)

    def _recycled(self, proc: Proc, exit_: Exit) -> None:
        """A worker that passed NIETEST_<Q>_MAX_MEMORY or _MAX_MESSAGES drained and exited on its
        own: not a crash. Alerted only when it recycles again within NIETEST_ALERT_CRASH_LOOP_WINDOW
        (a fast leak, or a limit set too low)."""
        previous = [t for t in proc.recycles if t > exit_.mono - self.window]
        proc.recycles.append(exit_.mono)
        log.info("worker recycled", process_key=proc.key, recycles_in_window=len(previous) + 1)
        if not previous:
            return
        text = partial(render.recycle, proc, exit_.mono - previous[-1], self.window)
        self._add(Item(AlertKind.RECYCLE, proc.queue, proc.key, text, self._is_worker(proc)), exit_.mono)

    def _fatal(self, proc: Proc, mono: float, wall: float) -> None:
        # supersedes whatever about this process is still waiting in a window
        self._drop(AlertKind.RESTART, proc.key)
        self._drop(AlertKind.CRASH_LOOP, proc.key)
        proc.degraded, proc.degraded_at, proc.exits_while_degraded = Degraded.FATAL, mono, 0
        lines = self.read_log(proc)  # now: the file may rotate or be restarted into later
        recent = [e for e in proc.exits if e.mono > mono - self.window]
        text = partial(render.fatal, proc, recent, lines, wall)
        self._add(Item(AlertKind.FATAL, proc.queue, proc.key, text, self._is_worker(proc)), mono)

    def _recovered(self, proc: Proc, mono: float) -> None:
        what, since, exits = proc.degraded, proc.degraded_at, proc.exits_while_degraded
        steady = mono - (proc.running_since or mono)
        proc.degraded, proc.exits_while_degraded = None, 0
        proc.exits.clear()
        text = partial(render.process_recovered, proc, steady, what, mono - since, exits)
        self._add(Item(AlertKind.PROCESS_RECOVERED, proc.queue, proc.key, text, self._is_worker(proc)), mono)

    # --- coalescing -----------------------------------------------------------------------------

    def _add(self, item: Item, mono: float) -> None:
        opened, items = self.pending.get(item.kind, (mono, []))
        items.append(item)
        self.pending[item.kind] = (opened, items)
        log.info("alert pending", kind=item.kind.value, subject=item.subject, waiting=len(items))
        if self.coalesce <= 0:
            self._flush(item.kind)

    def _drop(self, kind: AlertKind, subject: str) -> None:
        entry = self.pending.get(kind)
        if not entry:
            return
        kept = [i for i in entry[1] if i.subject != subject]
        if kept:
            self.pending[kind] = (entry[0], kept)
        else:
            del self.pending[kind]

    def _flush(self, kind: AlertKind) -> None:
        _, items = self.pending.pop(kind)
        alert = render.build(kind, items)
        self.sent.append(alert)
        del self.sent[:-100]
        self.send(alert)
