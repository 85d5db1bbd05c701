"""`nietest worker QUEUE`: one Dramatiq Worker consuming one queue, in this process.

supervisord runs one of these per configured process. On SIGTERM the worker stops fetching,
finishes the messages in hand within NIETEST_DRAIN_SECONDS, returns every other message it
holds (prefetched, delayed, and any still running past the budget) to the broker, and exits 0.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dramatiq
import redis
import structlog
from dramatiq.errors import ActorNotFound
from dramatiq.middleware import TimeLimit

from nietest_daemon.coordination import counters, lifelines, markers
from nietest_daemon.coordination.connection import wait_for_broker
from nietest_daemon.core import logs
from nietest_daemon.core.redaction import set_secrets
from nietest_daemon.core.settings import RECYCLED_EXIT, Settings
from nietest_daemon.core.stopping import install_stop_signals
from nietest_daemon.internals.dramatiq_redis import NietestRedisBroker, delay_queue_name, process_identity, requeue
from nietest_daemon.pipeline.broker import build_broker
from nietest_daemon.pipeline.context import context
from nietest_daemon.pipeline.middleware.in_hand import InHand
from nietest_daemon.pipeline.sweep import run_sweeper

log = logs.get_logger(__name__)

#: How long an idle consumer waits between fetches (Dramatiq's default is 1000 ms). It also bounds
#: how late a delayed message (the next poll of a subtask) starts after it is due.
WORKER_TIMEOUT_MS = 100

#: Actor modules always loaded; NIETEST_ACTOR_MODULES adds more (tests use it for test actors).
BUILTIN_ACTOR_MODULES = ("nietest_daemon.pipeline.actors",)


def import_actors(settings: Settings) -> list[str]:
    modules = [*BUILTIN_ACTOR_MODULES, *settings.actor_modules]
    for name in modules:
        importlib.import_module(name)
    return modules


def _housekeeping(broker: NietestRedisBroker, queue_name: str, interval: float, stop: threading.Event) -> None:
    """Heartbeat, queue maintenance (see NietestRedisBroker.maintain) and the pipeline's "this
    process is alive" mark, on a timer."""
    while True:
        try:
            markers.mark_alive(broker.client, 3 * interval)
            markers.end_pending_creates(broker.client)
            broker.maintain(queue_name)
            broker.maintain(delay_queue_name(queue_name))
        except (redis.RedisError, OSError) as exc:
            log.warning("queue maintenance failed", error=str(exc))
        if stop.wait(interval):
            return


def resident_bytes() -> int:
    """This process's resident memory (RSS)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


#: A worker recycles only after running this long: supervisord counts an exit within `startsecs`
#: (2 s) as a failed start, and enough of those in a row would leave the queue FATAL.
RECYCLE_MIN_SECONDS = 10.0


@dataclass
class Recycling:
    """A worker's limits (NIETEST_<Q>_MAX_MEMORY, NIETEST_<Q>_MAX_MESSAGES; 0: none), and why it
    recycles once it does."""

    max_memory: int
    max_messages: int
    reason: str | None = None
    started: float = field(default_factory=time.monotonic)

    def check(self, processed: int, resident: int) -> str | None:
        if time.monotonic() - self.started < RECYCLE_MIN_SECONDS:
            return None
        if self.reason is None and self.max_memory and resident > self.max_memory:
            self.reason = f"resident memory {resident / 2**20:.0f} MB is past {self.max_memory / 2**20:.0f} MB"
        elif self.reason is None and self.max_messages and processed >= self.max_messages:
            self.reason = f"{processed} messages processed, the limit is {self.max_messages}"
        return self.reason


def _lifeline(
    broker: NietestRedisBroker,
    in_hand: InHand,
    host: str,
    process: str,
    hang_seconds: float,
    recycling: Recycling,
    stop: threading.Event,
) -> None:
    """Beat once a second (coordination/lifelines.py) until the process exits, draining included;
    but not while a message has run past its actor's time limit by more than `hang_seconds`: the
    watchdog then kills this worker, and its messages go back to the queue. Past a recycling
    limit, start the graceful drain, as SIGTERM would: supervisord then starts a fresh worker."""
    default_ms = next((m.time_limit for m in broker.middleware if isinstance(m, TimeLimit)), 600_000)

    def limit_of(actor_name: str) -> float:
        try:
            return float(broker.get_actor(actor_name).options.get("time_limit") or default_ms) / 1000
        except ActorNotFound:
            return default_ms / 1000

    reported: set[str] = set()
    while True:
        if not stop.is_set() and recycling.check(in_hand.processed, resident_bytes()):
            log.info("recycling: draining, then exiting for a fresh worker", reason=recycling.reason)
            stop.set()
        stuck = in_hand.overdue(limit_of, hang_seconds)
        for message, ran in stuck:
            if message.message_id not in reported:
                reported.add(message.message_id)
                log.error(
                    "a message is stuck far past its time limit; no more signs of life, the watchdog will restart us",
                    stuck_message_id=message.message_id,
                    actor=message.actor_name,
                    running_seconds=round(ran, 1),
                )
        if not stuck:
            try:
                lifelines.beat(broker.client, host, process, os.getpid())
            except (redis.RedisError, OSError) as exc:
                log.warning("could not record a sign of life", error=str(exc))
        try:
            counters.TALLY.flush(broker.client, host)  # kept for the next beat if the broker is away
        except Exception:  # the lifeline must go on beating whatever the metrics do
            log.exception("could not flush the metrics")
        time.sleep(lifelines.BEAT_SECONDS)


def run(settings: Settings, queue_key: str) -> int:
    queue = settings.queue(queue_key)
    set_secrets(settings.secrets())
    logging.getLogger().setLevel(settings.log_level)
    structlog.contextvars.bind_contextvars(queue=queue.name)

    stop = install_stop_signals(on_stop=lambda s: log.info("stop requested", signal=s.signal_name))

    broker = build_broker(settings)
    # Broker ids that name this process: the watchdog hands its messages back the moment it exits.
    process_name = os.environ.get("SUPERVISOR_PROCESS_NAME") or f"worker-{queue_key}"
    host = settings.host_name
    broker.name_process(process_identity(host, process_name, os.getpid()))
    log.info(
        "worker starting",
        threads=queue.threads,
        broker=settings.broker_description,
        store=settings.store_description,
        drain_seconds=settings.drain_seconds,
    )
    # Actor modules first: a module that cannot load fails the start at once (supervisord counts
    # a failed start only within startsecs), not after the wait for the broker.
    modules = import_actors(settings)
    if not wait_for_broker(broker.client, settings.broker_url, stop):
        log.info("worker stopped before the broker was reachable")
        return 0

    context(settings)
    broker.declare_queue(queue.name)
    in_hand = InHand()
    broker.add_middleware(in_hand)
    worker = dramatiq.Worker(
        broker, queues={queue.name}, worker_threads=queue.threads, worker_timeout=WORKER_TIMEOUT_MS
    )
    worker.start()
    recycling = Recycling(queue.max_memory, queue.max_messages)
    threading.Thread(
        target=_lifeline,
        args=(
            broker,
            in_hand,
            host,
            process_name,
            settings.hang_seconds,
            recycling,
            stop,
        ),
        name="lifeline",
        daemon=True,
    ).start()
    interval = max(0.5, min(settings.broker_heartbeat_timeout / 4, 15.0))
    threading.Thread(
        target=_housekeeping, args=(broker, queue.name, interval, stop), name="housekeeping", daemon=True
    ).start()
    if queue_key == "master":
        threading.Thread(target=run_sweeper, args=(stop,), name="sweeper", daemon=True).start()
    actors = sorted(a for a in broker.get_declared_actors() if broker.get_actor(a).queue_name == queue.name)
    log.info("worker started", actors=actors, actor_modules=modules)

    stop.wait()
    started = time.monotonic()
    log.info("draining", budget_seconds=settings.drain_seconds)
    worker.stop(timeout=int(settings.drain_seconds * 1000))
    abandoned = in_hand.abandon()
    if abandoned:
        try:
            requeue(broker, queue.name, abandoned)
        except redis.RedisError as exc:
            log.error(
                "could not return unfinished messages; they come back after the heartbeat timeout",
                error=str(exc),
                message_ids=[m.message_id for m in abandoned],
            )
    counters.TALLY.flush(broker.client, host)
    if recycling.reason:
        try:  # the watchdog and the alerts listener tell this exit from a crash by its mark
            counters.mark_recycling(broker.client, host, process_name, os.getpid(), reason=recycling.reason)
        except (redis.RedisError, OSError) as exc:
            log.warning("could not mark this exit as a recycle", error=str(exc))
    log.info(
        "worker stopped",
        seconds=round(time.monotonic() - started, 3),
        returned_unfinished=len(abandoned),
    )
    logging.shutdown()
    # Threads still stuck in an abandoned message must not keep the process alive.
    os._exit(RECYCLED_EXIT if recycling.reason else 0)
