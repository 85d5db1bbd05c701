"""Actor used by bench/restart.py: reports which process handled a message, and when."""

import os
import time

import dramatiq

from nietest_daemon.core.settings import QUEUE_NAME_VARS

_var, _default = QUEUE_NAME_VARS["subtask"]


@dramatiq.actor(actor_name="bench_ping", queue_name=os.environ.get(_var) or _default, max_retries=0)
def bench_ping(token: str) -> None:
    dramatiq.get_broker().client.rpush(f"bench:{token}", f"{time.clock_gettime(time.CLOCK_BOOTTIME)}:{os.getpid()}")
