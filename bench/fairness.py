"""Fair shares of the job slots between tasks, on a real daemon against the fake API.

    .venv/bin/python -m bench.fairness

NIETEST_MAX_JOBS=20, fake generation time 1 s, polls 0.25 s apart; one daemon (embedded valkey,
SQLite store) for the whole run.

1. A 3-image task alone (its solo time, the baseline of this run), then the same task submitted
   behind a running 50,000-image task. Target: behind <= 2 x solo + 1 s (one generation time).
2. Two equal 400-image tasks submitted 5 s apart: the slots each holds while both are active
   (sampled every 0.2 s). Target: equal shares within +-20 %.
3. A priority-3 and a priority-1 400-image task: their shares. Target: 3:1 within +-20 %.
Each phase cancels what it leaves running (a cancel is one script, whatever the task's size).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.pipeline import FakeAPI, daemon, submit
from bench.scale import task_document
from nietest_daemon.coordination.connection import redis_client
from nietest_daemon.coordination.scheduler import Scheduler
from nietest_daemon.domain.lifecycle import TERMINAL
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.store import open_store_for
from nietest_daemon.testing.waiting import wait_for

CAP = 20


def write_task(directory: Path, name: str, size: int, priority: int = 1) -> Path:
    doc = {**task_document(size), "name": name, "priority": priority}
    path = directory / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def cancel(env: dict[str, str], task_id: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "nietest_daemon", "cancel", task_id], env=env, capture_output=True, check=True
    )


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(f"machine: {platform.machine()}, Python {platform.python_version()}; cap {CAP} slots, generation 1 s")
    api = FakeAPI()
    ok = True
    try:
        with daemon(**api.env(), NIETEST_MAX_JOBS=str(CAP), IMAGE_POLLING_INTERVAL="0.25") as (settings, env):
            api.configure(1.0)
            client = redis_client(settings)
            slots = Scheduler(client, Lane.STANDARD, CAP, lease_seconds=0)
            store = open_store_for(settings)
            home = settings.home

            def finish_time(task_id: str, started: float, timeout: float = 600) -> float:
                wait_for(lambda: (store.get_task(task_id) or {}).get("status") in TERMINAL, timeout, task_id)
                return time.monotonic() - started

            # 1. a small task alone, then behind a 50,000-image campaign
            small = write_task(home, "small", 3)
            started = time.monotonic()
            solo = finish_time(submit(env, small), started)
            big = submit(env, write_task(home, "campaign", 50_000))
            wait_for(
                lambda: slots.in_flight() >= CAP and slots.waiting() > 10_000, 300, "the campaign holding every slot"
            )
            started = time.monotonic()
            behind = finish_time(submit(env, small), started)
            cancel(env, big)
            met = behind <= 2 * solo + 1.0
            ok &= met
            print(
                f"1. 3-image task alone {solo:.1f} s; behind a running 50,000-image task {behind:.1f} s "
                f"(target <= 2 x {solo:.1f} + 1 = {2 * solo + 1:.1f} s): {'met' if met else 'MISSED'}"
            )
            wait_for(lambda: slots.in_flight() == 0, 120, "the campaign's slots freed")

            # 2. and 3.: shares of two tasks while both are active
            def shares(first: Path, second: Path, gap: float) -> tuple[float, float]:
                a = submit(env, first)
                time.sleep(gap)
                b = submit(env, second)

                def both_waiting() -> bool:
                    by_task = {s.task_id: s for s in slots.shares([a, b])}
                    return all(t in by_task and by_task[t].ready for t in (a, b))

                wait_for(both_waiting, 60, "both tasks expanded and waiting", interval=0.05)
                samples: list[tuple[int, int]] = []
                while True:
                    by_task = {s.task_id: s for s in slots.shares([a, b])}
                    sa, sb = by_task.get(a), by_task.get(b)
                    if not sa or not sb or not sa.ready or not sb.ready:  # one of them cannot use a full share
                        break
                    samples.append((sa.holding, sb.holding))
                    time.sleep(0.2)
                cancel(env, a)
                cancel(env, b)
                wait_for(lambda: slots.in_flight() == 0, 120, "the slots freed")
                settled = samples[len(samples) // 4 :]  # after the first holders of `a` have turned over
                return statistics.mean(s[0] for s in settled), statistics.mean(s[1] for s in settled)

            ea, eb = shares(write_task(home, "equal-a", 400), write_task(home, "equal-b", 400), gap=5.0)
            met = abs(ea - eb) <= 0.2 * max(ea, eb)
            ok &= met
            print(
                f"2. equal tasks 5 s apart: mean slots held {ea:.1f} vs {eb:.1f} "
                f"(target equal within 20 %): {'met' if met else 'MISSED'}"
            )
            hi, lo = shares(write_task(home, "prio-3", 400, priority=3), write_task(home, "prio-1", 400), gap=0.0)
            ratio = hi / lo if lo else float("inf")
            met = 2.4 <= ratio <= 3.6
            ok &= met
            print(
                f"3. priority 3 vs 1: mean slots held {hi:.1f} vs {lo:.1f} = {ratio:.2f}:1 "
                f"(target 3:1 within 20 %): {'met' if met else 'MISSED'}"
            )
            store.close()
            client.close()
    finally:
        api.close()
    print(f"targets: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
