"""Campaign size: one task each of 1,000, 10,000 and 50,000 subtasks against a fast fake API.

    .venv/bin/python -m bench.scale [--sizes 1000,10000,50000] [--max-jobs 200] [--store sqlite|postgresql]

Each size runs on a fresh real `nietest daemon` (embedded valkey; the SQLite store, or with
`--store postgresql` a fresh PostgreSQL database: bench/stores.py; 1 master, 2 x 5 subtask
threads) against the fake Nieta API in its own process: a job finishes 0.05 s after its create,
polls are 0.05 s apart. For each size it prints:

- throughput (subtasks per second, from the task's stored submission to its end), and its ratio
  to the first size's, measured in the same run (the target: >= 0.8 for 10x and 50x the first size);
- the longest stretch in which a slot stayed idle while subtasks waited (sampled every 0.1 s;
  the target: no stall over 5 s);
- broker memory (`INFO memory` used_memory) per waiting subtask: the slope of used_memory against
  the number of waiting subtasks, sampled as the line drains with every slot busy, from the
  admission of the first cap's worth on (the target: <= 200 bytes). The slope leaves out what
  does not grow with the line: the messages of the running subtasks, the workers' keys. Beside
  it, used_memory at the peak over the idle daemon's;
- peak resident memory (VmHWM) of each subtask worker (the target: independent of the size);
- the store's size at the end (the SQLite file with its WAL, or `pg_database_size`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass

from bench import stores
from bench.pipeline import FakeAPI, daemon, status_kib, submit, worker_pids
from nietest_daemon.coordination.connection import redis_client
from nietest_daemon.coordination.scheduler import Scheduler
from nietest_daemon.domain.lifecycle import TERMINAL, Status
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.store import open_store_for
from nietest_daemon.testing import task_documents as taskdocs


@dataclass
class Result:
    size: int
    seconds: float
    status: str
    completed: int
    longest_idle_while_waiting: float
    peak_waiting: int
    broker_bytes_per_waiting: float  # the slope, see the module doc
    broker_peak_mib: float  # used_memory at the waiting peak, over the idle daemon's
    worker_hwm_mib: list[float]
    store_mib: float

    @property
    def throughput(self) -> float:
        return self.size / self.seconds


def task_document(size: int) -> dict:
    """Two variables whose product is `size` (at most 1000 values each)."""
    cols = min(1000, size)
    rows = size // cols
    assert rows * cols == size, "size must be a multiple of min(1000, size)"
    return taskdocs.task_document(
        f"scale {size}",
        [
            taskdocs.variable_prompt("row", [f"row {i}" for i in range(rows)]),
            taskdocs.variable_prompt("col", [f"col {i}" for i in range(cols)]),
        ],
    )


def run_size(api: FakeAPI, size: int, max_jobs: int, timeout: float, store_kind: str = "sqlite") -> Result:
    overrides = {"NIETEST_MAX_JOBS": str(max_jobs), "IMAGE_POLLING_INTERVAL": "0.05", **api.env()}
    with daemon(store_kind, **overrides) as (settings, env):
        api.configure(0.05)
        client = redis_client(settings)
        slots = Scheduler(client, Lane.STANDARD, max_jobs, lease_seconds=0)
        idle_memory = int(client.info("memory")["used_memory"])
        path = settings.home / f"scale-{size}.json"
        path.write_text(json.dumps(task_document(size)))
        store = open_store_for(settings)
        started = time.monotonic()
        task_id = submit(env, path)
        longest = stall_started = 0.0
        peak_waiting = peak_used = 0
        draining: list[tuple[int, int]] = []  # (waiting, used_memory) after the peak, every slot busy
        task: dict = {}
        deadline = started + timeout
        while time.monotonic() < deadline:
            waiting, in_use = slots.waiting(), slots.in_flight()
            now = time.monotonic()
            if waiting and in_use < max_jobs:
                stall_started = stall_started or now
                longest = max(longest, now - stall_started)
            else:
                stall_started = 0.0
            used = int(client.info("memory")["used_memory"])
            if waiting > peak_waiting:
                peak_waiting, peak_used, draining = waiting, used, []
            elif waiting and in_use >= max_jobs and waiting <= peak_waiting - max_jobs:
                # Past the first cap's worth of admissions: their run messages, enqueued at once at
                # the start, have been taken, so what changes from here is the line.
                draining.append((waiting, used))
            task = store.get_task(task_id) or {}
            if task.get("status") in TERMINAL:
                break
            time.sleep(0.1)
        if task.get("completed_at") and task.get("created_at"):
            seconds = (task["completed_at"] - task["created_at"]).total_seconds()
        else:
            seconds = time.monotonic() - started
        per_waiting = float("nan")
        if len(draining) >= 10:
            per_waiting = statistics.linear_regression(*zip(*draining, strict=True)).slope
        hwm = [status_kib(pid, "VmHWM") / 1024 for pid in worker_pids(settings, "subtask")]
        store.close()
        client.close()
        store_mib = stores.store_mib(settings)
        return Result(
            size=size,
            seconds=seconds,
            status=str(task.get("status")),
            completed=int(task.get("completed_images") or 0),
            longest_idle_while_waiting=longest,
            peak_waiting=peak_waiting,
            broker_bytes_per_waiting=per_waiting,
            broker_peak_mib=max(0, peak_used - idle_memory) / 2**20,
            worker_hwm_mib=hwm,
            store_mib=store_mib,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--max-jobs", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=3600.0)
    stores.add_store_option(parser)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"machine: {platform.machine()}, Python {platform.python_version()}; cap {args.max_jobs} slots;"
        f" store: {args.store}"
    )
    api = FakeAPI()
    results: list[Result] = []
    try:
        for size in sizes:
            r = run_size(api, size, args.max_jobs, args.timeout, args.store)
            results.append(r)
            ratio = r.throughput / results[0].throughput
            print(
                f"{r.size:>6} subtasks: {r.status} ({r.completed} completed) in {r.seconds:7.1f} s = "
                f"{r.throughput:6.1f}/s ({ratio:.2f}x the {results[0].size}); longest idle slot while work "
                f"waited {r.longest_idle_while_waiting:4.1f} s; waiting peak {r.peak_waiting}, broker "
                f"{r.broker_bytes_per_waiting:5.0f} B per waiting subtask ({r.broker_peak_mib:.1f} MiB over idle "
                f"at the peak); worker VmHWM "
                f"{', '.join(f'{m:.1f}' for m in r.worker_hwm_mib)} MiB; store {r.store_mib:.1f} MiB",
                flush=True,
            )
    finally:
        api.close()
    base = results[0]
    met = all(
        r.throughput >= 0.8 * base.throughput
        and r.longest_idle_while_waiting <= 5
        and r.broker_bytes_per_waiting <= 200
        and r.status == Status.COMPLETED
        and max(r.worker_hwm_mib) <= 1.2 * max(base.worker_hwm_mib)
        for r in results
    )
    print(
        "targets (>= 0.8x the first size's throughput, no stall > 5 s, <= 200 B per waiting subtask, "
        f"worker memory within 20 % of the first size's): {'met' if met else 'MISSED'}"
    )
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
