"""Test actors, loaded by workers through NIETEST_ACTOR_MODULES=e2e_actors.

Every queue gets the same set, named `<action>_<queue key>`; each reports to Redis keys under
`test:` on the broker so tests can watch what the workers did.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import dramatiq

from nietest_daemon.core.settings import QUEUE_NAME_VARS

log = logging.getLogger("e2e_actors")


def _client():
    return dramatiq.get_broker().client


def _make(key: str, queue_name: str) -> None:
    @dramatiq.actor(actor_name=f"record_{key}", queue_name=queue_name, max_retries=0)
    def record(token: str, seconds: float = 0.0) -> None:
        """Mark `token` started, work `seconds`, mark it done."""
        client = _client()
        client.rpush("test:started", f"{token}:{os.getpid()}")
        time.sleep(seconds)
        client.rpush("test:done", f"{token}:{os.getpid()}")

    @dramatiq.actor(actor_name=f"chatter_{key}", queue_name=queue_name, max_retries=0)
    def chatter(lines: int, size: int) -> None:
        """Write `lines` log lines of about `size` bytes (log rotation)."""
        for i in range(lines):
            log.info("chatter %d %s", i, "x" * size)
        _client().rpush("test:done", f"chatter:{os.getpid()}")

    @dramatiq.actor(actor_name=f"leak_{key}", queue_name=queue_name, max_retries=0)
    def leak(url: str) -> None:
        """Try hard to log secrets: the token, a URL with a password, and an exception holding both."""
        token = os.environ.get("NIETA_XTOKEN", "")
        log.warning("token is %s and url is %s", token, url)
        print(f"stray print of {token} {url}")
        _client().rpush("test:done", f"leak:{os.getpid()}")
        raise RuntimeError(f"failed with token {token} at {url}")

    @dramatiq.actor(actor_name=f"blink_{key}", queue_name=queue_name, max_retries=0)
    def blink(token: str, failures: int) -> None:
        """Fail with a broker connection error on the first `failures` runs, then mark `token` done."""
        client = _client()
        if client.incr(f"test:blink:{token}") <= failures:
            import redis

            raise redis.ConnectionError("Connection refused (the broker blinked)")
        client.rpush("test:done", f"{token}:{os.getpid()}")

    @dramatiq.actor(actor_name=f"hog_{key}", queue_name=queue_name, max_retries=0)
    def hog(token: str, megabytes: int) -> None:
        """Leak `megabytes` of resident memory for good (what NIETEST_<Q>_MAX_MEMORY recycles)."""
        block = bytearray(megabytes * 1024 * 1024)
        block[::4096] = b"\x01" * len(range(0, len(block), 4096))  # touch every page: resident
        _leaked.append(block)
        _client().rpush("test:done", f"{token}:{os.getpid()}")


_leaked: list[bytearray] = []

for _key, (_var, _default) in QUEUE_NAME_VARS.items():
    _make(_key, os.environ.get(_var) or _default)


# --- added for the alerts tests (tests/test_alerts_e2e.py) --------------------------------------

_lock = threading.Lock()
_shared: dict[str, object] = {}


def _settings():
    from nietest_daemon.core import settings as settings_module

    with _lock:
        if "settings" not in _shared:
            _shared["settings"] = settings_module.load()
        return _shared["settings"]


def _feishu():
    """One FeishuClient per worker process, on the task webhook, as task notices use it."""
    from nietest_daemon.clients.feishu import FeishuClient

    settings = _settings()
    with _lock:
        if "feishu" not in _shared:
            _shared["feishu"] = FeishuClient(
                settings.feishu_task_webhook_url, settings.feishu_webhook_secret, _client(), trust_env=False
            )
        return _shared["feishu"]


def _make_alert_actors(key: str, queue_name: str) -> None:
    @dramatiq.actor(actor_name=f"outcome_{key}", queue_name=queue_name, max_retries=0)
    def outcome(ok: bool, error: str | None = None) -> None:
        """One subtask outcome on this queue, recorded as the pipeline records it (failure streaks)."""
        from nietest_daemon.coordination import streaks

        streaks.record(_client(), queue_name, ok, error, threshold=_settings().alert_failure_streak)
        _client().rpush("test:done", f"outcome:{os.getpid()}")

    @dramatiq.actor(actor_name=f"notify_{key}", queue_name=queue_name, max_retries=0)
    def notify(token: str) -> None:
        """Queue a Feishu card on the shared client's background sender, then mark `token` done."""
        _feishu().submit_card(f"notice {token}", "a test notice", "info")
        _client().rpush("test:done", f"{token}:{os.getpid()}")


for _key, (_var, _default) in QUEUE_NAME_VARS.items():
    _make_alert_actors(_key, os.environ.get(_var) or _default)
