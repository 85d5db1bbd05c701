"""The broker of every nietest process: Dramatiq's Redis broker with nietest's middleware."""

from __future__ import annotations

import dramatiq
from dramatiq.middleware import AgeLimit, Callbacks, CurrentMessage, Pipelines, ShutdownNotifications, TimeLimit

from nietest_daemon.coordination.connection import redis_client
from nietest_daemon.core.settings import Settings
from nietest_daemon.internals.dramatiq_redis import NAMESPACE, NietestRedisBroker
from nietest_daemon.pipeline.middleware.broker_aware_retries import BrokerAwareRetries
from nietest_daemon.pipeline.middleware.catch_exceptions import CatchExceptions
from nietest_daemon.pipeline.middleware.task_tracker import TaskTracker


def build_broker(settings: Settings) -> NietestRedisBroker:
    """The broker of every nietest process; also made the Dramatiq global broker."""
    # after_* hooks run in reverse order: Retries decides, CatchExceptions marks, TaskTracker logs.
    middleware = [
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        TaskTracker(),
        CatchExceptions(),
        BrokerAwareRetries(max_retries=settings.max_retries),
        CurrentMessage(),
    ]
    broker = NietestRedisBroker(
        client=redis_client(settings),
        middleware=middleware,
        namespace=NAMESPACE,
        heartbeat_timeout=int(settings.broker_heartbeat_timeout * 1000),
    )
    dramatiq.set_broker(broker)
    return broker
