"""The text of the alerts: durations and times, process log lines, each kind's message, the card."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from nietest_daemon.coordination.events import (
    BrokerFailover,
    FailureRun,
    HostBack,
    HostLost,
    QueueRecovered,
    WorkerUnresponsive,
)
from nietest_daemon.core.redaction import redact
from nietest_daemon.domain.process_state import ProcessState
from nietest_daemon.programs.alerts.kinds import AlertKind
from nietest_daemon.programs.alerts.records import Alert, Degraded, Exit, Item, Proc

#: Lines of a process's log shown in a FATAL alert.
FATAL_LOG_LINES = 15
#: Items listed in one coalesced message; the rest are counted.
MAX_ITEMS = 60
#: Error texts shown for a run of failures.
TOP_ERRORS = 5


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


def clean(text: str, limit: int = 300) -> str:
    """Redacted (known secrets, URL passwords, webhook tokens), single line, at most `limit` chars."""
    text = redact(" ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- a process's log -------------------------------------------------------------------------------


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
        return clean(line)
    if not isinstance(record, dict):
        return clean(line)
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
    return clean(text)


# --- each kind's text ------------------------------------------------------------------------------


def on(proc: Proc) -> str:
    return f" (queue {proc.queue})" if proc.queue else ""


def now_state(proc: Proc) -> str:
    if proc.state is ProcessState.RUNNING:
        return f"now {proc.state} (pid {proc.pid})"
    return f"now {proc.state}"


def exits(recent: list[Exit]) -> list[str]:
    return [
        f"- {fmt_clock(e.wall)}: {e.status} after {fmt_duration(e.ran)}"
        + (" (while starting)" if e.during_start else "")
        for e in recent[-10:]
    ]


def restart(proc: Proc, exit_: Exit) -> str:
    return (
        f"- **{proc.key}**{on(proc)}: {exit_.status} after running {fmt_duration(exit_.ran)} "
        f"(at {fmt_clock(exit_.wall)}); restarted, {now_state(proc)}"
    )


def crash_loop(proc: Proc, recent: list[Exit], window: float, threshold: int) -> str:
    lines = [
        f"**{proc.key}**{on(proc)} exited unexpectedly {len(recent)} times within "
        f"{fmt_duration(window)} (alert threshold {threshold}); supervisord keeps restarting it, "
        f"{now_state(proc)}. Further restarts are not alerted until it has run for "
        f"{fmt_duration(window)} without exiting.",
        *exits(recent),
    ]
    return "\n".join(lines)


def fatal(proc: Proc, recent: list[Exit], lines: list[str], wall: float) -> str:
    parts = [
        f"**{proc.key}**{on(proc)} entered FATAL at {fmt_clock(wall)}: it kept exiting while starting "
        f"and supervisord stopped retrying. It stays down until someone runs `nietest ctl start {proc.key}`.",
    ]
    if recent:
        parts.append("Exits:")
        parts += exits(recent)
    parts.append(f"Last {len(lines)} lines of its log:")
    parts += [f"> {line}" for line in lines]
    return "\n".join(parts)


def short_fatal(text: str) -> str:
    """A FATAL message past the first three of one card: its first line and its last three."""
    lines = text.split("\n")
    return "\n".join(lines[:1] + lines[-3:])


def recycle(proc: Proc, since: float, window: float) -> str:
    return (
        f"**{proc.key}** recycled again {fmt_duration(since)} after its previous recycle "
        f"(its NIETEST_<Q>_MAX_MEMORY or _MAX_MESSAGES limit; window {fmt_duration(window)}): "
        f"a fast leak, or a limit set too low. {now_state(proc).capitalize()}."
    )


def process_recovered(proc: Proc, steady: float, what: Degraded | None, ago: float, exits_meanwhile: int) -> str:
    n = exits_meanwhile
    return (
        f"**{proc.key}**{on(proc)} has run steadily for {fmt_duration(steady)} (pid {proc.pid}) "
        f"after its {what} {fmt_duration(ago)} ago"
        + (f" ({n} more unexpected exit{'s' if n != 1 else ''} meanwhile)." if n else ".")
    )


def unresponsive(report: WorkerUnresponsive, proc: Proc, hang_seconds: float) -> str:
    return (
        f"**{report.process}** (pid {report.pid}) gave no sign of life for {report.silent_seconds:.0f} s "
        f"(NIETEST_HANG_SECONDS={hang_seconds:g}): killed and restarted; "
        f"its messages went back to the queue; {now_state(proc)}."
    )


def failure_run(run: FailureRun, threshold: int) -> str:
    top = Counter(clean(e, 200) for e in run.errors).most_common(TOP_ERRORS)
    lines = [f"**{run.queue}**: {run.failures} consecutive subtasks failed (alert threshold {threshold})."]
    if top:
        lines.append(f"Most frequent errors (of the last {len(run.errors)}):")
        lines += [f"- {count}× {text}" for text, count in top]
    return "\n".join(lines)


def queue_recovered(event: QueueRecovered) -> str:
    return f"**{event.queue}**: a subtask succeeded again after {event.failures} consecutive failures."


def host_lost(event: HostLost) -> str:
    n, s = event.messages, event.subtasks
    return (
        f"**{event.host}** gave no sign of life for {fmt_duration(event.silent_seconds)} "
        f"(NIETEST_HOST_LOST_SECONDS): taken over by **{event.taken_over_by}** at {fmt_clock(event.at)}. "
        f"{n} message{'s' if n != 1 else ''} it held went back to the queues, "
        f"continuing {s} subtask{'s' if s != 1 else ''} on the other hosts."
    )


def host_back(event: HostBack) -> str:
    k = event.workers_restarted
    return (
        f"**{event.host}** beats again, {fmt_duration(event.lost_seconds)} after it was declared lost. "
        f"Its work had been handed back, so it restarted its {k} worker{'s' if k != 1 else ''} "
        "(nothing they held runs twice) and takes new work again."
    )


def broker_down(broker: str, since: float | None, error: str | None) -> str:
    return (
        f"The broker ({broker}) has not answered since "
        f"{fmt_clock(since or time.time())}: {clean(error or 'no answer')}. Workers cannot start or "
        "consume; they wait for it with backoff and resume on their own when it is back."
    )


def broker_up(broker: str, down_for: float, since: float) -> str:
    return (
        f"The broker answers again ({broker}), after {fmt_duration(down_for)} "
        f"unreachable (since {fmt_clock(since)}). Waiting workers resume on their own."
    )


def broker_failover(event: BrokerFailover) -> str:
    return (
        f"The Sentinels made **{event.new}** the primary of **{event.master}** (config epoch {event.epoch}); "
        f"it was {event.old}. Seen at {fmt_clock(event.at)} by {event.seen_by}. Every process finds the new "
        "primary by itself: a few seconds of broker errors, which workers wait out. Writes the old primary "
        "had not yet passed to a replica are lost; what guards against paying twice is in docs/architecture.md."
    )


def listener_restart(pid: int | None, started_at: float | None, restarts: int, window: float, loop: bool) -> str:
    since = f", up since {fmt_clock(started_at)}" if started_at is not None else ""
    text = (
        f"The alerts listener was restarted: the previous one (pid {pid}{since}) ended without a clean "
        "stop (killed, crashed, or the whole daemon was). Events that supervisord buffered meanwhile "
        "were delivered to the new one; crash-loop counters started again from zero."
    )
    if loop:
        text += f" It has restarted {restarts} times within {fmt_duration(window)}: see alerts.log."
    return text


# --- the card --------------------------------------------------------------------------------------


def build(kind: AlertKind, items: list[Item]) -> Alert:
    """One message for the items of `kind` that waited in its window together."""
    queues = {i.queue for i in items}
    queue = queues.pop() if len(queues) == 1 else None
    n = len(items)
    subjects = [i.subject for i in items]
    shown = items if n <= MAX_ITEMS else items[:MAX_ITEMS]
    parts = []
    for index, item in enumerate(shown):
        try:
            text = item.render()
            parts.append(text if kind is not AlertKind.FATAL or index < 3 else short_fatal(text))
        except Exception as exc:  # a message must go out even if one line cannot be rendered
            parts.append(f"{item.subject}: (could not render: {type(exc).__name__})")
    if n > len(shown):
        parts.append(f"… and {n - len(shown)} more (see alerts.log).")
    separator = "\n" if kind is AlertKind.RESTART else "\n\n"
    title = kind.card_title(subjects, workers=all(i.worker for i in items))
    return Alert(kind, title, separator.join(parts), kind.severity, queue, subjects)
