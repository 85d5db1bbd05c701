"""What the pipeline needs in one process (settings, store, broker client, API clients, job
slots), built once per process on first use."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import partial

import redis

from nietest_daemon.clients.feishu import FeishuClient
from nietest_daemon.clients.nieta import NietaClient
from nietest_daemon.coordination import counters
from nietest_daemon.coordination.connection import redis_client
from nietest_daemon.coordination.scheduler import Scheduler
from nietest_daemon.core import settings as settings_module
from nietest_daemon.core.settings import Settings
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.store import Store, open_store_for


@dataclass
class Context:
    settings: Settings
    store: Store
    redis: redis.Redis
    nieta: NietaClient | None
    notifier: FeishuClient
    schedulers: dict[Lane, Scheduler]  # job-slot admission, one per lane
    host: str  # NIETEST_HOST_NAME: names this host's metrics (coordination/counters.py) and its cards

    def queue_of(self, lane: Lane) -> str:
        return self.settings.queue(lane.queue_key).name

    def polling(self, lane: Lane) -> tuple[int, float]:
        """The lane's polling budget: (attempts, interval in seconds)."""
        s = self.settings
        if lane is Lane.LUMINA:
            return s.lumina_max_polling_attempts, s.lumina_polling_interval
        return s.image_max_polling_attempts, s.image_polling_interval


_context: Context | None = None
_context_lock = threading.Lock()


def context(settings: Settings | None = None) -> Context:
    """The process's context, built on the first call (from `settings`, else the environment)."""
    global _context
    with _context_lock:
        if _context is None:
            _context = build_context(settings or settings_module.load())
        return _context


def slot_lease_seconds(settings: Settings) -> float:
    """How long a job slot stays held without a poll renewing it."""
    return max(120.0, 10 * max(settings.image_polling_interval, settings.lumina_polling_interval))


def build_schedulers(settings: Settings, client: redis.Redis) -> dict[Lane, Scheduler]:
    """The job slots of each lane, admitting as this host."""
    lease, host = slot_lease_seconds(settings), settings.host_name
    return {
        Lane.STANDARD: Scheduler(client, Lane.STANDARD, settings.max_jobs, lease, host=host),
        Lane.LUMINA: Scheduler(client, Lane.LUMINA, settings.max_lumina_jobs, lease, host=host),
    }


def build_context(settings: Settings) -> Context:
    client = redis_client(settings, socket_timeout=10)
    nieta = None
    if settings.nieta_xtoken:
        nieta = NietaClient(
            settings.nieta_xtoken,
            settings.nieta_api_base_url,
            settings.nieta_ops_api_base_url,
            observe=counters.TALLY.api_request,
        )
    notifier = FeishuClient(
        settings.feishu_task_webhook_url,
        settings.feishu_webhook_secret,
        client,
        host=settings.host_name,
        on_result=partial(counters.TALLY.feishu_message, "task"),
    )
    return Context(
        settings=settings,
        store=open_store_for(settings),
        redis=client,
        nieta=nieta,
        notifier=notifier,
        schedulers=build_schedulers(settings, client),
        host=settings.host_name,
    )
