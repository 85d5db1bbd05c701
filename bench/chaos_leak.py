"""A leak for the chaos run (bench/chaos.py): loaded by every worker through NIETEST_ACTOR_MODULES,
it makes the `subtask_ops` workers keep 4 MB more resident memory after every message they run,
as a leaking library would, so that NIETEST_SUBTASK_OPS_MAX_MEMORY recycles them mid-run."""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

LEAK_BYTES = 4 * 1024 * 1024
_kept: list[bytearray] = []


class Leak(Middleware):
    def after_process_message(self, broker: dramatiq.Broker, message: Any, *, result=None, exception=None) -> None:
        block = bytearray(LEAK_BYTES)
        block[::4096] = b"\x01" * len(range(0, LEAK_BYTES, 4096))  # touched: resident
        _kept.append(block)


if os.environ.get("SUPERVISOR_PROCESS_NAME", "").startswith("subtask_ops"):
    dramatiq.get_broker().add_middleware(Leak())
