"""`nietest alerts`: the supervisor event listener that sends operations alerts to Feishu.

supervisord runs it as `[eventlistener:alerts]` (etc/supervisord.conf) and sends it every
PROCESS_STATE event and a TICK_5. What it sends, to FEISHU_ALERT_WEBHOOK_URL (falling back to
FEISHU_WEBHOOK_URL; with neither, alerts are only logged):

- **worker unresponsive** (warning): the watchdog listener killed a worker that gave no sign of
  life for NIETEST_HANG_SECONDS (programs/watchdog.py); it replaces that kill's restart alert when
  both wait in their windows.
- **worker recycled** (warning): a worker exited on its own past NIETEST_<Q>_MAX_MEMORY or
  _MAX_MESSAGES (exit status 75) for the second time within NIETEST_ALERT_CRASH_LOOP_WINDOW; a
  single recycle is only logged, and is never counted as a crash.
- **restart** (warning): a process exited when nobody asked it to (EXITED, "not expected") and
  supervisord restarted it: queue, process, exit status (from supervisord's own `exited:` log
  line, e.g. "terminated by SIGKILL"), how long it had run, and its state now.
- **crash loop** (critical): NIETEST_ALERT_CRASH_LOOP_RESTARTS unexpected exits of one process
  (exits during start, BACKOFF, included) within NIETEST_ALERT_CRASH_LOOP_WINDOW seconds. One
  alert; its further restarts are not alerted until it has run for a whole window without
  exiting, which sends a recovery notice.
- **FATAL** (critical): supervisord gave up on a process; with the last lines of its log (the
  `event` texts of its JSON lines; secrets are redacted in the files already and again here).
  A FATAL alert replaces a crash-loop or restart alert of the same process still waiting in
  its window. A recovery notice follows if the process later runs steadily again.
- **run of failures** (critical) / **queue recovered** (success): from the pipeline's streak
  events (coordination/streaks.py), drained from the broker every second: the count and the
  most frequent error texts; then the first success after the run.
- **broker unreachable** (critical) / **broker reachable again** (success): the broker did not
  answer a PING for BROKER_GRACE_SECONDS. Workers wait for it with backoff (RUNNING, not
  crash-looping), so this is the one report of "workers cannot start or consume".
- **listener restarted** (warning): the previous listener ended without a clean stop (it was
  killed or crashed, or the whole daemon was): a marker file in the run dir says so at start.

Every kind is coalesced: the first alert of a kind opens a window of
NIETEST_ALERT_COALESCE_SECONDS; everything of that kind arriving within it goes out as one
message when it closes (eight workers killed together: one message listing eight). The card
title carries the host name and, when all items share one, the queue; the colour follows the
severity.

Threads, so that acknowledging an event never waits for anything but supervisord:
- `protocol`: READY, read one event, put it on the engine's queue, `RESULT 2\\nOK`. The real
  stdout (fd 1) is kept for this alone: fd 1 is pointed at stderr and sys.stdout is a log
  stream, so a stray print or a library writing to stdout cannot corrupt the protocol.
- `engine`: all the state and the coalescing windows; hands finished messages to
  `FeishuClient.submit_card` (whose own background thread does the HTTP, the retries and the
  cross-process rate limit).
- `probe`: the blocking I/O: broker PING, draining streak events, one XML-RPC snapshot of the
  processes at start.
The main thread waits for SIGTERM (or the end of stdin), then sends what is pending, removes
the marker and exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue as queue_module
import re
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from nietest_daemon.clients.feishu import FeishuClient, Severity
from nietest_daemon.clients.supervisor_events import open_protocol_streams, parse_tokens, serve_protocol
from nietest_daemon.coordination import counters, lifelines, streaks
from nietest_daemon.coordination.connection import redis_client
from nietest_daemon.core import logs
from nietest_daemon.core.redaction import redact, set_secrets
from nietest_daemon.core.settings import RECYCLED_EXIT, Settings
from nietest_daemon.internals.supervisor import EXITED_LINE, control_proxy

log = logs.get_logger("nietest.alerts")

#: The broker must fail to answer PINGs for this long before it is reported unreachable.
BROKER_GRACE_SECONDS = 10.0
#: How often the probe thread pings the broker and drains streak events.
PROBE_INTERVAL = 1.0
#: No event at all (TICK_5 included) from supervisord for this long: the protocol is out of step; restart.
WATCHDOG_SECONDS = 60.0
#: Lines of a process's log shown in a FATAL alert.
FATAL_LOG_LINES = 15
#: Items listed in one coalesced message; the rest are counted.
MAX_ITEMS = 60
#: Error texts shown for a run of failures.
TOP_ERRORS = 5
MARKER_NAME = "alerts.running"

SEVERITY: dict[str, Severity] = {
    "unresponsive": "warning",
    "recycle": "warning",
    "restart": "warning",
    "crash_loop": "critical",
    "fatal": "critical",
    "process_recovered": "success",
    "failure_run": "critical",
    "queue_recovered": "success",
    "broker_down": "critical",
    "broker_up": "success",
    "listener_restart": "warning",
}
#: Order in which kinds due at the same moment are sent (problems before their recoveries).
KIND_ORDER = list(SEVERITY)


# --- small helpers -----------------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "an unknown time"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def fmt_clock(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%H:%M:%S UTC")


def _parse_timestamp(value: str) -> float | None:
    for fmt, tz in (("%Y-%m-%dT%H:%M:%S.%fZ", UTC), ("%Y-%m-%d %H:%M:%S,%f", None)):
        try:
            parsed = datetime.strptime(value, fmt)
        except ValueError:
            continue
        return parsed.replace(tzinfo=tz).timestamp() if tz else parsed.timestamp()
    return None


def _clean(text: str, limit: int = 300) -> str:
    """Redacted (known secrets, URL passwords, webhook tokens), single line, at most `limit` chars."""
    text = redact(" ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- what supervisord's log says about exits ---------------------------------------------------


class ExitLog:
    """Follows supervisord.log for its `exited: NAME (terminated by SIGKILL; not expected)` lines.

    supervisord writes that line before the EXITED/BACKOFF event reaches any listener, so
    `take(name)` right after the event finds it. The event itself carries no exit status.
    Lines are consumed in order per process; lines older than `max_age` are forgotten (so a
    restarted listener does not pair a new event with an exit its predecessor reported).
    """

    PRIME_BYTES = 64 * 1024

    def __init__(self, path: Path, max_age: float = 60.0) -> None:
        self.path = path
        self.max_age = max_age
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""
        self._pending: dict[str, deque[tuple[float, str]]] = {}

    def take(self, name: str, now_wall: float) -> str | None:
        """The description of `name`'s oldest unreported exit, e.g. "terminated by SIGKILL"."""
        try:
            self._read_new(now_wall)
        except OSError as exc:
            log.warning("cannot read supervisord's log", path=str(self.path), error=str(exc))
        entries = self._pending.get(name)
        while entries:
            at, desc = entries.popleft()
            if at >= now_wall - self.max_age:
                return desc
        return None

    def _read_new(self, now_wall: float) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        chunks: list[bytes] = []
        if self._inode is None:  # first read: the recent past only
            self._offset = max(0, st.st_size - self.PRIME_BYTES)
        elif st.st_ino != self._inode or st.st_size < self._offset:
            # rotated: finish the old file (now supervisord.log.1) if it is still there, then start over
            rotated = self.path.with_name(self.path.name + ".1")
            with contextlib.suppress(OSError):
                if os.stat(rotated).st_ino == self._inode:
                    with open(rotated, "rb") as old:
                        old.seek(self._offset)
                        chunks.append(old.read())
            self._offset = 0
        with open(self.path, "rb") as current:
            current.seek(self._offset)
            chunks.append(current.read())
            self._offset = current.tell()
        self._inode = st.st_ino
        data = self._partial + b"".join(chunks)
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            self._add(raw.decode("utf-8", "replace"), now_wall)

    def _add(self, line: str, now_wall: float) -> None:
        if "exited: " not in line:
            return
        at: float | None = None
        text = line
        if line.startswith("{"):
            try:
                record = json.loads(line)
                text = str(record.get("event", ""))
                at = _parse_timestamp(str(record.get("timestamp", "")))
            except ValueError:
                pass
        else:
            at = _parse_timestamp(line[:23])
        match = EXITED_LINE.search(text)
        if not match:
            return
        desc = re.sub(r";\s*(not )?expected$", "", match.group("desc")).strip()
        self._pending.setdefault(match.group("name"), deque(maxlen=100)).append((at or now_wall, desc))


def log_tail(path: Path, lines: int = FATAL_LOG_LINES, max_bytes: int = 256 * 1024) -> list[str]:
    """The last `lines` lines of a process's log, each rendered short: time, level, event, exception."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError as exc:
        return [f"(log {path.name} unreadable: {exc.strerror or exc})"]
    raw_lines = data.decode("utf-8", "replace").splitlines()
    if size > max_bytes and raw_lines:
        raw_lines = raw_lines[1:]  # the first one is probably cut
    picked = [line for line in raw_lines if line.strip()][-lines:]
    return [render_log_line(line) for line in picked] or [f"(log {path.name} is empty)"]


def render_log_line(line: str) -> str:
    """One JSON log line as `HH:MM:SS level event (exception)`; anything else as (redacted) text."""
    try:
        record = json.loads(line)
    except ValueError:
        return _clean(line)
    if not isinstance(record, dict):
        return _clean(line)
    stamp = str(record.get("timestamp", ""))
    text = f"{stamp[11:19]} {record.get('level', '?')} {record.get('event', '')}".strip()
    exception = record.get("exception")
    if isinstance(exception, list) and exception and isinstance(exception[-1], dict):
        last = exception[-1]
        text += f" [{last.get('exc_type', 'exception')}: {last.get('exc_value', '')}]"
    elif isinstance(exception, str) and exception:
        text += f" [{exception.strip().splitlines()[-1]}]"
    if record.get("error") and "exception" not in record:
        text += f" (error: {record['error']})"
    return _clean(text)


# --- the engine --------------------------------------------------------------------------------


@dataclass
class Exit:
    """One unexpected exit of a process."""

    mono: float
    wall: float
    status: str  # "terminated by SIGKILL", "exit status 1", "exit status unknown"
    ran: float | None  # seconds since it was spawned
    during_start: bool  # BACKOFF: it died before supervisord counted it as started


@dataclass
class Proc:
    """What the listener knows about one supervised process."""

    key: str  # group:name, as supervisorctl names it
    group: str
    name: str
    queue: str | None
    state: str = "UNKNOWN"
    pid: int | None = None
    spawned_at: float | None = None  # monotonic
    running_since: float | None = None  # monotonic
    logfile: str | None = None
    exits: deque[Exit] = field(default_factory=lambda: deque(maxlen=1000))
    degraded: str | None = None  # None, "crash loop" or "FATAL"
    degraded_at: float = 0.0
    exits_while_degraded: int = 0
    seen_event: bool = False
    recycles: deque[float] = field(default_factory=lambda: deque(maxlen=100))  # monotonic


@dataclass
class Item:
    """One alert waiting in its kind's coalescing window."""

    kind: str
    queue: str | None
    subject: str  # the process key, queue name or "broker"
    render: Callable[[], str]  # rendered when the message is built (so it can say "now RUNNING")
    worker: bool = False


@dataclass
class Alert:
    """One message: what the engine hands to the sender."""

    kind: str
    title: str
    content: str
    severity: Severity
    queue: str | None
    subjects: list[str]


class Engine:
    """The alert logic. Not thread-safe: one thread calls `handle_*` and `tick` in order.

    Times are passed in (`mono` from time.monotonic, `wall` from time.time), so the unit tests
    drive it with a fake clock.
    """

    def __init__(
        self,
        settings: Settings,
        send: Callable[[Alert], None],
        *,
        exit_status: Callable[[str, float], str | None] = lambda name, wall: None,
        read_log: Callable[[Proc], list[str]] | None = None,
        own_group: str | None = None,
        broker_grace: float = BROKER_GRACE_SECONDS,
    ) -> None:
        self.settings = settings
        self.send = send
        self.exit_status = exit_status
        self.read_log = read_log or (lambda proc: log_tail(self._logfile(proc)))
        self.own_group = own_group
        self.coalesce = settings.alert_coalesce_seconds
        self.window = settings.alert_crash_loop_window
        self.threshold = settings.alert_crash_loop_restarts
        self.broker_grace = broker_grace
        self.queue_names = {q.key: q.name for q in settings.queues.values()}
        self.procs: dict[str, Proc] = {}
        self.pending: dict[str, tuple[float, list[Item]]] = {}
        self.broker_down_since: float | None = None
        self.broker_down_wall: float | None = None
        self.broker_error: str | None = None
        self.broker_alerted = False
        self.sent: list[Alert] = []  # the last messages (kept short), for tests and logs
        self.events = 0

    # --- inputs ---------------------------------------------------------------------------------

    def proc(self, group: str, name: str) -> Proc:
        key = f"{group}:{name}"
        proc = self.procs.get(key)
        if proc is None:
            proc = self.procs[key] = Proc(key, group, name, self.queue_names.get(group))
        return proc

    def handle_event(self, eventname: str, payload: str, mono: float, wall: float) -> None:
        """One event from supervisord (the protocol thread stamped its arrival)."""
        self.events += 1
        if not eventname.startswith("PROCESS_STATE_"):
            return
        fields = parse_tokens(payload.split("\n", 1)[0])
        group, name = fields.get("groupname", ""), fields.get("processname", "")
        if not name or (self.own_group and group == self.own_group):
            return
        state = eventname.removeprefix("PROCESS_STATE_")
        proc = self.proc(group or name, name)
        proc.seen_event = True
        log.info(
            "process state",
            process_key=proc.key,
            state=state,
            from_state=fields.get("from_state"),
            expected=fields.get("expected"),
            process_pid=fields.get("pid"),
        )
        previous, proc.state = proc.state, state
        if state == "STARTING":
            proc.spawned_at, proc.pid, proc.running_since = mono, None, None
        elif state == "RUNNING":
            proc.running_since = mono
            with contextlib.suppress(ValueError):
                proc.pid = int(fields.get("pid", ""))
        elif state in ("EXITED", "BACKOFF"):
            status = self.exit_status(name, wall) or "exit status unknown"
            if state == "EXITED" and fields.get("expected") == "1":
                return
            self._unexpected_exit(proc, Exit(mono, wall, status, self._ran(proc, mono), state == "BACKOFF"))
        elif state == "FATAL":
            self._fatal(proc, mono, wall)
        elif state == "STOPPED" and proc.degraded:
            log.info("process stopped by request; its crash-loop state is cleared", process_key=proc.key)
            proc.degraded, proc.exits_while_degraded = None, 0
            proc.exits.clear()
        elif state == "UNKNOWN":
            log.warning("process in UNKNOWN state", process_key=proc.key, from_state=previous)

    def handle_snapshot(self, infos: Iterable[dict[str, Any]], asked: float, mono: float, wall: float) -> None:
        """supervisord's getAllProcessInfo(), asked (at monotonic `asked`) once at start.

        A listener hears of the processes started with it only once it is RUNNING itself (its
        startsecs later): supervisord's own start times are the right ones. A STARTING event
        received after `asked` is newer than the snapshot and wins.
        """
        for info in infos:
            group, name = str(info.get("group", "")), str(info.get("name", ""))
            if not name or (self.own_group and group == self.own_group):
                continue
            proc = self.proc(group, name)
            proc.logfile = info.get("stdout_logfile") or proc.logfile
            if proc.spawned_at is not None and proc.spawned_at > asked:
                continue
            state = str(info.get("statename", ""))
            if not proc.seen_event:
                proc.state = state or proc.state
                proc.pid = info.get("pid") or None
            start = float(info.get("start") or 0)
            if start and state in ("STARTING", "RUNNING", "BACKOFF", "STOPPING"):
                proc.spawned_at = mono - max(0.0, wall - start)
                if proc.state == "RUNNING" and state == "RUNNING":
                    proc.running_since = max(proc.spawned_at, proc.running_since or proc.spawned_at)

    def handle_watchdog(self, event: dict[str, Any], mono: float) -> None:
        """The watchdog killed a worker that gave no sign of life (lifelines.drain_events)."""
        process = str(event.get("process") or "?")
        silent = float(event.get("silent_seconds") or 0)

        def render() -> str:
            return (
                f"**{process}** (pid {event.get('pid')}) gave no sign of life for {silent:.0f} s "
                f"(NIETEST_HANG_SECONDS={self.settings.hang_seconds:g}): killed and restarted; "
                f"its messages went back to the queue; {self._now_state(self.proc(*process.split(':', 1)))}."
            )

        self._drop("restart", process)  # the kill's restart alert says less: this one replaces it
        self._add(Item("unresponsive", event.get("queue"), process, render, worker=True), mono)

    def handle_streak(self, event: dict[str, Any], mono: float) -> None:
        """A streak event from the pipeline (streaks.drain_events)."""
        queue = str(event.get("queue") or "?")
        failures = int(event.get("failures") or 0)
        if event.get("kind") == "failure_run":
            errors = [str(e) for e in event.get("errors") or []]
            top = Counter(_clean(e, 200) for e in errors).most_common(TOP_ERRORS)
            threshold = self.settings.alert_failure_streak

            def render() -> str:
                lines = [f"**{queue}**: {failures} consecutive subtasks failed (alert threshold {threshold})."]
                if top:
                    lines.append(f"Most frequent errors (of the last {len(errors)}):")
                    lines += [f"- {count}× {text}" for text, count in top]
                return "\n".join(lines)

            self._add(Item("failure_run", queue, queue, render), mono)
        elif event.get("kind") == "recovered":
            self._add(
                Item(
                    "queue_recovered",
                    queue,
                    queue,
                    lambda: f"**{queue}**: a subtask succeeded again after {failures} consecutive failures.",
                ),
                mono,
            )
        else:
            log.warning("unknown streak event", streak_event=event)

    def handle_broker(self, ok: bool, error: str | None, mono: float, wall: float) -> None:
        """One PING of the broker by the probe thread."""
        if ok:
            if self.broker_alerted and self.broker_down_since is not None:
                down_for = mono - self.broker_down_since
                since = self.broker_down_wall or wall
                self._add(
                    Item(
                        "broker_up",
                        None,
                        "broker",
                        lambda: (
                            f"The broker answers again ({self._broker_name()}), after {fmt_duration(down_for)} "
                            f"unreachable (since {fmt_clock(since)}). Waiting workers resume on their own."
                        ),
                    ),
                    mono,
                )
            if self.broker_down_since is not None:
                log.info("broker reachable", down_seconds=round(mono - self.broker_down_since, 3))
            self.broker_down_since, self.broker_down_wall, self.broker_alerted = None, None, False
            return
        if self.broker_down_since is None:
            self.broker_down_since, self.broker_down_wall = mono, wall
            # info: at every start the listener is up before the embedded broker; the alert says the rest
            log.info("broker does not answer", broker=self._broker_name(), error=error)
        self.broker_error = error

    def handle_listener_restart(self, previous: dict[str, Any], restarts: int, mono: float) -> None:
        """The previous listener ended without a clean stop (see `Marker`)."""
        pid = previous.get("pid")
        started = previous.get("started_at")
        since = f", up since {fmt_clock(float(started))}" if isinstance(started, int | float) else ""
        loop = restarts >= self.threshold

        def render() -> str:
            text = (
                f"The alerts listener was restarted: the previous one (pid {pid}{since}) ended without a clean "
                "stop (killed, crashed, or the whole daemon was). Events that supervisord buffered meanwhile "
                "were delivered to the new one; crash-loop counters started again from zero."
            )
            if loop:
                text += f" It has restarted {restarts} times within {fmt_duration(self.window)}: see alerts.log."
            return text

        self._add(Item("listener_restart", None, "alerts", render), mono)

    # --- time -----------------------------------------------------------------------------------

    def tick(self, mono: float) -> None:
        """Recoveries, the broker's grace period, and the windows that have closed."""
        for proc in self.procs.values():
            if (
                proc.degraded
                and proc.state == "RUNNING"
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
            since, error = self.broker_down_wall, self.broker_error
            self._add(
                Item(
                    "broker_down",
                    None,
                    "broker",
                    lambda: (
                        f"The broker ({self._broker_name()}) has not answered since "
                        f"{fmt_clock(since or time.time())}: {_clean(error or 'no answer')}. Workers cannot start or "
                        "consume; they wait for it with backoff and resume on their own when it is back."
                    ),
                ),
                mono,
            )
        for kind in KIND_ORDER:
            entry = self.pending.get(kind)
            if entry and mono - entry[0] >= self.coalesce:
                self._flush(kind)

    def next_due(self, mono: float) -> float:
        """Seconds until the next window closes (at most 0.5: recoveries are polled)."""
        waits = [opened + self.coalesce - mono for opened, _ in self.pending.values()]
        return max(0.0, min([0.5, *waits]))

    def flush_all(self) -> None:
        """Send every waiting message now (at shutdown)."""
        for kind in KIND_ORDER:
            if kind in self.pending:
                self._flush(kind)

    # --- the rules ------------------------------------------------------------------------------

    def _ran(self, proc: Proc, mono: float) -> float | None:
        return None if proc.spawned_at is None else mono - proc.spawned_at

    def _logfile(self, proc: Proc) -> Path:
        return Path(proc.logfile) if proc.logfile else self.settings.log_dir / f"{proc.name}.log"

    def _broker_name(self) -> str:
        return self.settings.broker_description  # already without its password

    def _unexpected_exit(self, proc: Proc, exit_: Exit) -> None:
        if exit_.status.startswith(f"exit status {RECYCLED_EXIT}"):
            self._recycled(proc, exit_)
            return
        proc.exits.append(exit_)
        recent = [e for e in proc.exits if e.mono > exit_.mono - self.window]
        if proc.degraded:
            proc.exits_while_degraded += 1
            log.info("unexpected exit while degraded; not alerted again", process_key=proc.key, state=proc.degraded)
            return
        if len(recent) >= self.threshold:
            proc.degraded, proc.degraded_at, proc.exits_while_degraded = "crash loop", exit_.mono, 0
            self._drop("restart", proc.key)
            self._add(
                Item(
                    "crash_loop",
                    proc.queue,
                    proc.key,
                    lambda: self._render_loop(proc, recent),
                    proc.group in self.queue_names,
                ),
                exit_.mono,
            )
            return
        if exit_.during_start:
            return  # supervisord retries it; a crash loop or FATAL says more if it keeps failing
        self._add(
            Item(
                "restart",
                proc.queue,
                proc.key,
                lambda: self._render_restart(proc, exit_),
                proc.group in self.queue_names,
            ),
            exit_.mono,
        )

    def _recycled(self, proc: Proc, exit_: Exit) -> None:
        """A worker that passed NIETEST_<Q>_MAX_MEMORY or _MAX_MESSAGES drained and exited on its
        own: not a crash. Alerted only when it recycles again within NIETEST_ALERT_CRASH_LOOP_WINDOW
        (a fast leak, or a limit set too low)."""
        previous = [t for t in proc.recycles if t > exit_.mono - self.window]
        proc.recycles.append(exit_.mono)
        log.info("worker recycled", process_key=proc.key, recycles_in_window=len(previous) + 1)
        if not previous:
            return
        since = exit_.mono - previous[-1]

        def render() -> str:
            return (
                f"**{proc.key}** recycled again {fmt_duration(since)} after its previous recycle "
                f"(its NIETEST_<Q>_MAX_MEMORY or _MAX_MESSAGES limit; window {fmt_duration(self.window)}): "
                f"a fast leak, or a limit set too low. {self._now_state(proc).capitalize()}."
            )

        self._add(Item("recycle", proc.queue, proc.key, render, proc.group in self.queue_names), exit_.mono)

    def _fatal(self, proc: Proc, mono: float, wall: float) -> None:
        # supersedes whatever about this process is still waiting in a window
        self._drop("restart", proc.key)
        self._drop("crash_loop", proc.key)
        proc.degraded, proc.degraded_at, proc.exits_while_degraded = "FATAL", mono, 0
        lines = self.read_log(proc)  # now: the file may rotate or be restarted into later
        recent = [e for e in proc.exits if e.mono > mono - self.window]
        self._add(
            Item(
                "fatal",
                proc.queue,
                proc.key,
                lambda: self._render_fatal(proc, recent, lines, wall),
                proc.group in self.queue_names,
            ),
            mono,
        )

    def _recovered(self, proc: Proc, mono: float) -> None:
        what, since, exits = proc.degraded, proc.degraded_at, proc.exits_while_degraded
        steady = mono - (proc.running_since or mono)
        proc.degraded, proc.exits_while_degraded = None, 0
        proc.exits.clear()
        self._add(
            Item(
                "process_recovered",
                proc.queue,
                proc.key,
                lambda: (
                    f"**{proc.key}**{self._on(proc)} has run steadily for {fmt_duration(steady)} (pid {proc.pid}) "
                    f"after its {what} {fmt_duration(mono - since)} ago"
                    + (f" ({exits} more unexpected exit{'s' if exits != 1 else ''} meanwhile)." if exits else ".")
                ),
                proc.group in self.queue_names,
            ),
            mono,
        )

    # --- coalescing -----------------------------------------------------------------------------

    def _add(self, item: Item, mono: float) -> None:
        opened, items = self.pending.get(item.kind, (mono, []))
        items.append(item)
        self.pending[item.kind] = (opened, items)
        log.info("alert pending", kind=item.kind, subject=item.subject, waiting=len(items))
        if self.coalesce <= 0:
            self._flush(item.kind)

    def _drop(self, kind: str, subject: str) -> None:
        entry = self.pending.get(kind)
        if not entry:
            return
        kept = [i for i in entry[1] if i.subject != subject]
        if kept:
            self.pending[kind] = (entry[0], kept)
        else:
            del self.pending[kind]

    def _flush(self, kind: str) -> None:
        _, items = self.pending.pop(kind)
        alert = self.build(kind, items)
        self.sent.append(alert)
        del self.sent[:-100]
        self.send(alert)

    def build(self, kind: str, items: list[Item]) -> Alert:
        queues = {i.queue for i in items}
        queue = queues.pop() if len(queues) == 1 else None
        n = len(items)
        subjects = [i.subject for i in items]
        noun = "worker" if all(i.worker for i in items) else "process"
        one = items[0].subject
        titles = {
            "unresponsive": f"Worker unresponsive: {one}" if n == 1 else f"{n} workers unresponsive",
            "recycle": f"Worker recycled twice within the window: {one}" if n == 1 else f"{n} workers recycling often",
            "restart": f"{noun.capitalize()} restarted: {one}" if n == 1 else f"{n} {noun} restarts",
            "crash_loop": f"Crash loop: {one}" if n == 1 else f"Crash loops: {n} processes",
            "fatal": f"FATAL: supervisord gave up on {one}"
            if n == 1
            else f"FATAL: supervisord gave up on {n} processes",
            "process_recovered": f"Recovered: {one} runs steadily again" if n == 1 else f"Recovered: {n} processes",
            "failure_run": "Run of failed subtasks"
            if n == 1
            else f"Runs of failed subtasks on {len(set(subjects))} queues",
            "queue_recovered": "Queue recovered: subtasks succeed again" if n == 1 else f"{n} queues recovered",
            "broker_down": "Broker unreachable",
            "broker_up": "Broker reachable again",
            "listener_restart": "Alerts listener restarted",
        }
        shown = items if n <= MAX_ITEMS else items[:MAX_ITEMS]
        parts = []
        for index, item in enumerate(shown):
            try:
                parts.append(item.render() if kind != "fatal" or index < 3 else _short_fatal(item.render()))
            except Exception as exc:  # a message must go out even if one line cannot be rendered
                parts.append(f"{item.subject}: (could not render: {type(exc).__name__})")
        if n > len(shown):
            parts.append(f"… and {n - len(shown)} more (see alerts.log).")
        separator = "\n" if kind == "restart" else "\n\n"
        return Alert(kind, titles[kind], separator.join(parts), SEVERITY[kind], queue, subjects)

    # --- rendering ------------------------------------------------------------------------------

    def _on(self, proc: Proc) -> str:
        return f" (queue {proc.queue})" if proc.queue else ""

    def _now_state(self, proc: Proc) -> str:
        if proc.state == "RUNNING":
            return f"now RUNNING (pid {proc.pid})"
        return f"now {proc.state}"

    def _render_restart(self, proc: Proc, exit_: Exit) -> str:
        return (
            f"- **{proc.key}**{self._on(proc)}: {exit_.status} after running {fmt_duration(exit_.ran)} "
            f"(at {fmt_clock(exit_.wall)}); restarted, {self._now_state(proc)}"
        )

    def _render_exits(self, exits: list[Exit]) -> list[str]:
        return [
            f"- {fmt_clock(e.wall)}: {e.status} after {fmt_duration(e.ran)}"
            + (" (while starting)" if e.during_start else "")
            for e in exits[-10:]
        ]

    def _render_loop(self, proc: Proc, recent: list[Exit]) -> str:
        lines = [
            f"**{proc.key}**{self._on(proc)} exited unexpectedly {len(recent)} times within "
            f"{fmt_duration(self.window)} (alert threshold {self.threshold}); supervisord keeps restarting it, "
            f"{self._now_state(proc)}. Further restarts are not alerted until it has run for "
            f"{fmt_duration(self.window)} without exiting.",
            *self._render_exits(recent),
        ]
        return "\n".join(lines)

    def _render_fatal(self, proc: Proc, recent: list[Exit], lines: list[str], wall: float) -> str:
        parts = [
            f"**{proc.key}**{self._on(proc)} entered FATAL at {fmt_clock(wall)}: it kept exiting while starting "
            f"and supervisord stopped retrying. It stays down until someone runs `nietest ctl start {proc.key}`.",
        ]
        if recent:
            parts.append("Exits:")
            parts += self._render_exits(recent)
        parts.append(f"Last {len(lines)} lines of its log:")
        parts += [f"> {line}" for line in lines]
        return "\n".join(parts)


def _short_fatal(text: str) -> str:
    lines = text.split("\n")
    return "\n".join(lines[:1] + lines[-3:])


# --- the marker: was the previous listener stopped cleanly? -------------------------------------


class Marker:
    """`alerts.running` in the run dir: present while a listener runs, removed by a clean stop.

    Found at start, it means the previous listener was killed or crashed. It also keeps the
    times of recent unclean restarts, so a listener that keeps dying is called a crash loop.
    """

    def __init__(self, path: Path, window: float) -> None:
        self.path = path
        self.window = window

    def start(self, now_wall: float) -> tuple[dict[str, Any] | None, int]:
        """Write ours; return the previous listener's record if it did not stop cleanly, and the restart count."""
        previous: dict[str, Any] | None = None
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict):
                previous = loaded
        restarts: list[float] = []
        if previous is not None:
            restarts = [float(t) for t in previous.get("restarts", []) if float(t) > now_wall - self.window]
            restarts.append(now_wall)
        record = {"pid": os.getpid(), "started_at": now_wall, "restarts": restarts}
        try:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("cannot write the listener marker", path=str(self.path), error=str(exc))
        return previous, len(restarts)

    def clean_stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# --- the listener protocol ---------------------------------------------------------------------


# --- running it --------------------------------------------------------------------------------


def _rpc(settings: Settings) -> Any | None:
    """XML-RPC to the supervisord that runs us (SUPERVISOR_SERVER_URL), or None outside supervisord."""
    url = os.environ.get("SUPERVISOR_SERVER_URL")
    if not url:
        return None
    return control_proxy(url)


class Listener:
    """The process: threads around one `Engine`, one `FeishuClient` and the protocol."""

    def __init__(self, settings: Settings, stdin: BinaryIO, out_fd: int) -> None:
        self.settings = settings
        self.stdin = stdin
        self.out_fd = out_fd
        self.inbox: queue_module.Queue[tuple[str, Any, float, float]] = queue_module.Queue()
        self.stop = threading.Event()
        self.protocol_done = threading.Event()
        self.protocol_error: BaseException | None = None
        self.last_event = time.monotonic()
        self.redis = redis_client(settings, socket_timeout=3)
        self.host = socket.gethostname()
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
            own_group=os.environ.get("SUPERVISOR_GROUP_NAME") or "alerts",
        )
        self.marker = Marker(settings.run_dir / MARKER_NAME, settings.alert_crash_loop_window)

    def _send(self, alert: Alert) -> None:
        log.info(
            "alert",
            kind=alert.kind,
            title=alert.title,
            severity=alert.severity,
            alert_queue=alert.queue,
            subjects=alert.subjects[:MAX_ITEMS],
            content=alert.content[:4000],
            webhook=self.client.configured,
        )
        counters.TALLY.alert(alert.kind)
        self.client.submit_card(alert.title, alert.content, alert.severity, queue=alert.queue)

    # --- threads --------------------------------------------------------------------------------

    def _on_event(self, headers: dict[str, str], payload: str) -> None:
        self.last_event = time.monotonic()
        self.inbox.put(("event", (headers.get("eventname", ""), payload), time.monotonic(), time.time()))

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
                kind, data, mono, wall = self.inbox.get(timeout=engine.next_due(time.monotonic()) or 0.01)
            except queue_module.Empty:
                kind = ""
            try:
                if kind == "event":
                    engine.handle_event(data[0], data[1], mono, wall)
                elif kind == "broker":
                    engine.handle_broker(data[0], data[1], mono, wall)
                elif kind == "streak":
                    engine.handle_streak(data, mono)
                elif kind == "watchdog":
                    engine.handle_watchdog(data, mono)
                elif kind == "snapshot":
                    engine.handle_snapshot(data[1], data[0], mono, wall)
                elif kind == "listener_restart":
                    engine.handle_listener_restart(data[0], data[1], mono)
                engine.tick(time.monotonic())
            except Exception:
                log.exception("alert engine error", input=kind)

    def _probe(self) -> None:
        snapshot_tries = 0
        while True:
            ok, error = True, None
            try:
                self.redis.ping()
            except Exception as exc:
                ok, error = False, _clean(f"{type(exc).__name__}: {exc}")
            self.inbox.put(("broker", (ok, error), time.monotonic(), time.time()))
            if ok:
                try:
                    for event in streaks.drain_events(self.redis):
                        self.inbox.put(("streak", event, time.monotonic(), time.time()))
                    for event in lifelines.drain_events(self.redis):
                        self.inbox.put(("watchdog", event, time.monotonic(), time.time()))
                except Exception as exc:
                    log.warning("cannot read streak or watchdog events", error=_clean(str(exc)))
                counters.TALLY.flush(self.redis, self.host)
            if 0 <= snapshot_tries < 30:  # supervisord answers at once, unless it is very busy starting
                snapshot_tries = -1 if self._snapshot(first=snapshot_tries == 0) else snapshot_tries + 1
            if self.stop.wait(PROBE_INTERVAL):
                return

    def _snapshot(self, first: bool) -> bool:
        asked = time.monotonic()
        try:
            rpc = _rpc(self.settings)
            if rpc is None:
                return True
            infos = rpc.supervisor.getAllProcessInfo()
        except Exception as exc:
            if first:
                log.warning("cannot ask supervisord for its processes yet; retrying", error=_clean(str(exc)))
            return False
        self.inbox.put(("snapshot", (asked, infos), time.monotonic(), time.time()))
        return True

    # --- main -----------------------------------------------------------------------------------

    def run(self) -> int:
        stop_signal: list[int] = []

        def on_signal(signum: int, _frame: Any) -> None:
            stop_signal.append(signum)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

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
                self.inbox.put(("listener_restart", (previous, restarts), time.monotonic(), time.time()))
            else:
                log.error("alerts listener keeps restarting; not alerted again", restarts=restarts)

        threads = [
            threading.Thread(target=self._engine, name="engine", daemon=True),
            threading.Thread(target=self._probe, name="probe", daemon=True),
            threading.Thread(target=self._protocol, name="protocol", daemon=True),
        ]
        for thread in threads:
            thread.start()

        code = 0
        while not stop_signal and not self.protocol_done.is_set():
            self.protocol_done.wait(0.25)
            dead = [t.name for t in threads[:2] if not t.is_alive()]
            if dead:
                log.critical("alerts listener thread died; exiting so that supervisord restarts it", threads=dead)
                code = 70
                break
            if time.monotonic() - self.last_event > WATCHDOG_SECONDS and os.environ.get("SUPERVISOR_SERVER_URL"):
                log.critical(
                    "no event from supervisord for too long (TICK_5 expected); exiting so that it restarts us",
                    seconds=WATCHDOG_SECONDS,
                )
                code = 71
                break
        if self.protocol_error is not None:
            log.critical("listener protocol error", error=repr(self.protocol_error)[:500])
            code = 72
        if stop_signal:
            log.info("alerts listener stopping", signal=signal.Signals(stop_signal[0]).name)

        # Hand over everything still queued, then send what is pending now rather than at its window's end.
        self.stop.set()
        threads[0].join(2.0)
        try:
            self._drain_inbox()
            self.engine.flush_all()
        except Exception:
            log.exception("could not send the pending alerts")
        self.client.close(timeout=5.0)
        counters.TALLY.flush(self.redis, self.host)
        if code == 0:
            self.marker.clean_stop()
        log.info("alerts listener stopped", events=self.engine.events, exit_code=code)
        return code

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, data, mono, wall = self.inbox.get_nowait()
            except queue_module.Empty:
                return
            if kind == "event":
                self.engine.handle_event(data[0], data[1], mono, wall)
            elif kind == "streak":
                self.engine.handle_streak(data, mono)
            elif kind == "watchdog":
                self.engine.handle_watchdog(data, mono)


def run(settings: Settings) -> int:
    """`nietest alerts`: logs are already JSON on stderr (see __main__); fds 0/1 carry the protocol."""
    set_secrets(settings.secrets())
    stdin, out_fd = open_protocol_streams()
    listener = Listener(settings, stdin, out_fd)
    return listener.run()
