"""`BrokerAwareRetries`: Dramatiq's Retries, except that an actor which failed only because a
service was unreachable (the broker, or the task store: `StoreUnavailable`) is retried (with a short
backoff) whatever MAX_RETRIES says: the failure is not the message's, and a dead letter would leave
its subtask to the sweep.
"""

from __future__ import annotations

import time
from typing import Any

import dramatiq
from dramatiq.middleware import Retries

from nietest_daemon.coordination.connection import BROKER_OUTAGE_ERRORS, unreachable_service
from nietest_daemon.core.backoff import backoff
from nietest_daemon.core.logs import get_logger
from nietest_daemon.pipeline.messages import ids_of

log = get_logger(__name__)

#: Retries of a message whose actor failed on an outage of the broker or the store (about 14 minutes in all).
BROKER_ERROR_RETRIES = 20
BROKER_ERROR_MAX_BACKOFF_MS = 60_000
BROKER_ENQUEUE_PATIENCE_SECONDS = 600.0


class BrokerAwareRetries(Retries):
    def after_process_message(self, broker: dramatiq.Broker, message: Any, *, result=None, exception=None) -> None:
        attempts = message.options.get("broker_error_retries", 0)  # the name predates store outages
        service = unreachable_service(exception)
        if service is None or attempts >= BROKER_ERROR_RETRIES:
            super().after_process_message(broker, message, result=result, exception=exception)
            return
        message.options["broker_error_retries"] = attempts + 1
        delay = int(backoff(attempts, base=500, cap=BROKER_ERROR_MAX_BACKOFF_MS))
        log.warning(
            f"{service} unreachable during the message; retrying it",
            error=str(exception),
            retry_in_ms=delay,
            **ids_of(message),
        )
        # The broker may still be down. The retry copy must exist before the original is acked
        # (Dramatiq acks it after this hook, and will keep trying until the broker is back), so
        # keep trying too; past the patience the original is failed: dead-lettered, not lost.
        deadline = time.monotonic() + BROKER_ENQUEUE_PATIENCE_SECONDS
        tries = 0
        while True:
            try:
                broker.enqueue(message, delay=delay)
                return
            except BROKER_OUTAGE_ERRORS as exc:
                if time.monotonic() >= deadline:
                    log.error("broker unreachable; message dead-lettered", error=str(exc), **ids_of(message))
                    message.fail()
                    return
                time.sleep(backoff(tries, base=0.5, cap=5.0))
                tries += 1
