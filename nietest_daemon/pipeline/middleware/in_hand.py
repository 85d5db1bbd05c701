"""`InHand`: which messages this worker is running (and since when), so a shutdown can hand back
those it abandons and the worker's lifeline can tell a message stuck far past its time limit."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware


class InHand(Middleware):
    """Tracks the messages being processed, so the shutdown can hand back those it abandons.

    After `abandon()`, a late acknowledgement would delete a message that was just returned to
    the queue; so from then on any ack or nack blocks until the process exits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: dict[str, Any] = {}
        self._started: dict[str, float] = {}
        self.processed = 0  # messages run to their end (recycling by NIETEST_<Q>_MAX_MESSAGES)
        self._abandoned = threading.Event()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        with self._lock:
            self._messages[message.message_id] = message
            self._started[message.message_id] = time.monotonic()

    def after_process_message(self, broker: dramatiq.Broker, message: Any, *, result=None, exception=None) -> None:
        with self._lock:
            self._messages.pop(message.message_id, None)
            self._started.pop(message.message_id, None)
            self.processed += 1

    after_skip_message = after_process_message

    def before_ack(self, broker: dramatiq.Broker, message: Any) -> None:
        if self._abandoned.is_set():
            threading.Event().wait()

    before_nack = before_ack

    def overdue(self, limit_of: Callable[[str], float], grace: float) -> list[tuple[Any, float]]:
        """Messages running for longer than their actor's time limit (`limit_of(actor name)`, in
        seconds) plus `grace`, with how long they have run: Dramatiq's TimeLimit would have
        interrupted them, unless their thread is deadlocked or stuck in C."""
        now = time.monotonic()
        with self._lock:
            running = [(self._messages[i], now - started) for i, started in self._started.items()]
        return [(m, ran) for m, ran in running if ran > limit_of(m.actor_name) + grace]

    def abandon(self) -> list[Any]:
        with self._lock:
            self._abandoned.set()
            return list(self._messages.values())
