"""supervisord's process states, by the names its XML-RPC API (`statename`) and its events carry."""

from __future__ import annotations

from enum import StrEnum


class ProcessState(StrEnum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def of(cls, name: str) -> ProcessState:
        """The state named `name`; a name supervisord may add later reads as UNKNOWN."""
        try:
            return cls(name)
        except ValueError:
            return cls.UNKNOWN


#: States in which the process is alive (its pid is real).
ALIVE: frozenset[ProcessState] = frozenset({ProcessState.STARTING, ProcessState.RUNNING, ProcessState.STOPPING})
#: States that need an operator: supervisord gave up on the process, or lost track of it.
FAILING: frozenset[ProcessState] = frozenset({ProcessState.FATAL, ProcessState.UNKNOWN})
