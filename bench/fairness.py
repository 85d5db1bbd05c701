"""Fair shares of the job slots between owners and between tasks, on a real daemon against the fake API.

    .venv/bin/python -m bench.fairness

NIETEST_MAX_JOBS=20, fake generation time 1 s, polls 0.25 s apart; one daemon (embedded valkey,
SQLite store, `NIETEST_FAIR_SHARE=owner`, `NIETEST_OWNER_WEIGHTS=heavy=2`) for the whole run.
Cases 1 to 3 submit every task as one owner (the invoking user, `nietest submit`'s default).

1. A 3-image task alone (its solo time, the baseline of this run), then the same task submitted
   behind a running 50,000-image task. Target: behind <= 2 x solo + 1 s (one generation time).
2. Two equal 400-image tasks submitted 5 s apart: the slots each holds while both are active
   (sampled every 0.2 s). Target: equal shares within +-20 %.
3. A priority-3 and a priority-1 400-image task: their shares. Target: 3:1 within +-20 %.
4. Owner A with ten 100-image tasks, then owner B with one 400-image task (`nietest submit
   --owner`): the share of the slots B holds while all eleven wait (sampled for 30 s). Target:
   0.5 within 10 % (0.45 to 0.55), whatever A's number of tasks.
5. Owner `heavy` (weight 2) with two 400-image tasks and owner `light` (weight 1) with one: their
   shares. Target: 2/3 and 1/3 within 10 %.
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
WEIGHTS = "heavy=2"  # NIETEST_OWNER_WEIGHTS of the run (case 5)
WINDOW = 30.0  # seconds of samples in cases 4 and 5


def write_task(directory: Path, name: str, size: int, priority: int = 1) -> Path:
    doc = {**task_document(size), "name": name, "priority": priority}
    path = directory / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def submit_as(env: dict[str, str], path: Path, owner: str | None) -> str:
    """`nietest submit`, as `owner` (None: the command's default, the invoking user)."""
    if owner is None:
        return submit(env, path)
    argv = [sys.executable, "-m", "nietest_daemon", "submit", "--owner", owner, str(path)]
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"nietest submit failed: {out.stderr.strip()}")
    return out.stdout.strip()


def within(value: float, target: float, tolerance: float = 0.1) -> bool:
    return abs(value - target) <= tolerance * target


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
        overrides = {"NIETEST_MAX_JOBS": str(CAP), "IMAGE_POLLING_INTERVAL": "0.25", "NIETEST_OWNER_WEIGHTS": WEIGHTS}
        with daemon(**api.env(), **overrides) as (settings, env):
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

            # 2. to 5.: the slots each task holds while all of them wait
            def held(tasks: list[tuple[Path, str | None]], gap: float = 0.0, window: float = 600) -> list[float]:
                """Submit `tasks` (path, owner), the later ones `gap` s after the first; the mean
                number of slots each holds while every one of them waits, over at most `window` s."""
                ids = [submit_as(env, tasks[0][0], tasks[0][1])]
                time.sleep(gap)
                ids += [submit_as(env, path, owner) for path, owner in tasks[1:]]

                def all_waiting() -> bool:
                    by_task = {s.task_id: s for s in slots.shares(ids)}
                    return all(by_task[t].ready for t in ids)

                wait_for(all_waiting, 60, "every task expanded and waiting", interval=0.05)
                samples: list[list[int]] = []
                ends = time.monotonic() + window
                while time.monotonic() < ends:
                    by_task = {s.task_id: s for s in slots.shares(ids)}
                    if not all(by_task[t].ready for t in ids):  # one of them cannot use a full share
                        break
                    samples.append([by_task[t].holding for t in ids])
                    time.sleep(0.2)
                for task_id in ids:
                    cancel(env, task_id)
                wait_for(lambda: slots.in_flight() == 0, 120, "the slots freed")
                settled = samples[len(samples) // 4 :]  # after the first holders have turned over
                return [statistics.mean(s[i] for s in settled) for i in range(len(ids))]

            def shares(first: Path, second: Path, gap: float) -> tuple[float, float]:
                a, b = held([(first, None), (second, None)], gap)
                return a, b

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
            # 4. one owner's ten tasks against another owner's one
            many = [(write_task(home, f"owner-a-{n}", 150), "owner-a") for n in range(10)]
            mean = held([*many, (write_task(home, "owner-b", 400), "owner-b")], window=WINDOW)
            a_held, b_held = sum(mean[:10]), mean[10]
            b_share = b_held / (a_held + b_held)
            met = within(b_share, 0.5)
            ok &= met
            print(
                f"4. owner A with 10 tasks vs owner B with 1: mean slots held {a_held:.1f} vs {b_held:.1f}, "
                f"B's share {b_share:.2f} (target 0.5 within 10 %: 0.45 to 0.55): {'met' if met else 'MISSED'}"
            )
            # 5. owner weights 2:1
            heavy = [(write_task(home, f"heavy-{n}", 400), "heavy") for n in range(2)]
            mean = held([*heavy, (write_task(home, "light", 400), "light")], window=WINDOW)
            h_held, l_held = mean[0] + mean[1], mean[2]
            h_share, l_share = h_held / (h_held + l_held), l_held / (h_held + l_held)
            met = within(h_share, 2 / 3) and within(l_share, 1 / 3)
            ok &= met
            print(
                f"5. owner weights 2:1 ({WEIGHTS}; 2 tasks vs 1): mean slots held {h_held:.1f} vs {l_held:.1f} "
                f"= {h_held / l_held if l_held else float('inf'):.2f}:1, shares {h_share:.2f} / {l_share:.2f} "
                f"(target 0.67 / 0.33 within 10 %): {'met' if met else 'MISSED'}"
            )
            store.close()
            client.close()
    finally:
        api.close()
    print(f"targets: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
