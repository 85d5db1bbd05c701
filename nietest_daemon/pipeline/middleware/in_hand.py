"""`InHand`: which messages this worker is running, so a shutdown can hand back those it abandons."""

from __future__ import annotations

import threading
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
        self._abandoned = threading.Event()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        with self._lock:
            self._messages[message.message_id] = message

    def after_process_message(self, broker: dramatiq.Broker, message: Any, *, result=None, exception=None) -> None:
        with self._lock:
            self._messages.pop(message.message_id, None)

    after_skip_message = after_process_message

    def before_ack(self, broker: dramatiq.Broker, message: Any) -> None:
        if self._abandoned.is_set():
            threading.Event().wait()

    before_nack = before_ack

    def abandon(self) -> list[Any]:
        with self._lock:
            self._abandoned.set()
            return list(self._messages.values())
