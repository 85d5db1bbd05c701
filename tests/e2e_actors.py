"""Test actors, loaded by workers through NIETEST_ACTOR_MODULES=e2e_actors.

Every queue gets the same set, named `<action>_<queue key>`; each reports to Redis keys under
`test:` on the broker so tests can watch what the workers did.
"""

from __future__ import annotations

import logging
import os
import time

import dramatiq

from nietest_daemon.settings import QUEUE_NAME_VARS

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


for _key, (_var, _default) in QUEUE_NAME_VARS.items():
    _make(_key, os.environ.get(_var) or _default)
