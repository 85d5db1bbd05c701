"""The body of one process of tests/test_store_contract.py's SQLite race across processes.

A module of its own so that each spawned process imports only the store, not the test module
(hypothesis, mongomock and the rest: about a second per process).
"""

from __future__ import annotations

import random
from typing import Any

from nietest_daemon.domain.lifecycle import Status
from nietest_daemon.store import SQLiteStore


def finish_every_subtask(data_dir: str, ids: list[str], seed: int, barrier: Any, results: Any) -> None:
    """One process of the race: its own store, every subtask, its own order."""
    handle = SQLiteStore(data_dir)
    rng = random.Random(seed)
    order = ids[:]
    rng.shuffle(order)
    changed: list[str] = []
    finalised: list[str | None] = []
    barrier.wait()
    for sid in order:
        outcome = handle.finish_subtask(sid, Status.COMPLETED if rng.random() < 0.7 else Status.FAILED)
        assert outcome is not None
        if outcome.changed:
            changed.append(sid)
        if outcome.finalised:
            finalised.append(outcome.task_status)
    handle.close()
    results.put((changed, finalised))
