"""What the engine keeps: a supervised process and its exits, an alert waiting in its window, a message."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from nietest_daemon.clients.feishu import Severity
from nietest_daemon.domain.process_state import ProcessState
from nietest_daemon.programs.alerts.kinds import AlertKind


class Degraded(StrEnum):
    """Why a process is not alerted again until it runs steadily for a whole window (the value is said in texts)."""

    CRASH_LOOP = "crash loop"
    FATAL = "FATAL"


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
    state: ProcessState = ProcessState.UNKNOWN
    pid: int | None = None
    spawned_at: float | None = None  # monotonic
    running_since: float | None = None  # monotonic
    logfile: str | None = None
    exits: deque[Exit] = field(default_factory=lambda: deque(maxlen=1000))
    degraded: Degraded | None = None
    degraded_at: float = 0.0
    exits_while_degraded: int = 0
    seen_event: bool = False
    recycles: deque[float] = field(default_factory=lambda: deque(maxlen=100))  # monotonic


@dataclass
class Item:
    """One alert waiting in its kind's coalescing window."""

    kind: AlertKind
    queue: str | None
    subject: str  # the process key, queue name or "broker"
    render: Callable[[], str]  # rendered when the message is built (so it can say "now RUNNING")
    worker: bool = False


@dataclass
class Alert:
    """One message: what the engine hands to the sender."""

    kind: AlertKind
    title: str
    content: str
    severity: Severity
    queue: str | None
    subjects: list[str]
