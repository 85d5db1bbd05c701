"""What the engine is told: one dataclass per kind of input, put on the listener's inbox by its
threads and handed to `Engine.handle`, by the engine thread's loop and by the drain at shutdown.

`mono` (time.monotonic) and `wall` (time.time) are stamped when the input arrived.
"""

from __future__ import annotations

from dataclasses import dataclass

from nietest_daemon.coordination.events import (
    BrokerFailover,
    FailureRun,
    HostBack,
    HostLost,
    QueueRecovered,
    WorkerUnresponsive,
)
from nietest_daemon.internals.supervisor import ProcessInfo


@dataclass(frozen=True)
class SupervisorEvent:
    """One event from supervisord, as the protocol thread read it (PROCESS_STATE_*, TICK_5, ...)."""

    eventname: str
    payload: str
    mono: float
    wall: float


@dataclass(frozen=True)
class BrokerPing:
    """One PING of the broker by the probe thread: answered, or the error."""

    ok: bool
    error: str | None
    mono: float
    wall: float


@dataclass(frozen=True)
class ProcessSnapshot:
    """supervisord's getAllProcessInfo(), asked at monotonic `asked` (once, at start)."""

    infos: list[ProcessInfo]
    asked: float
    mono: float
    wall: float


#: The events other processes leave on the broker for the alerts listener (and the failover its own watch finds).
BrokerEvent = WorkerUnresponsive | FailureRun | QueueRecovered | HostLost | HostBack | BrokerFailover


@dataclass(frozen=True)
class FromBroker:
    """An event another process left on the broker (coordination/events.py), drained by the probe thread."""

    event: BrokerEvent
    mono: float


@dataclass(frozen=True)
class ListenerRestart:
    """The previous listener ended without a clean stop (its marker was still there); `restarts`
    unclean ones within the crash-loop window, this one included."""

    pid: int | None
    started_at: float | None  # unix time
    restarts: int
    mono: float


#: Every input `Engine.handle` takes.
Input = SupervisorEvent | BrokerPing | ProcessSnapshot | FromBroker | ListenerRestart
