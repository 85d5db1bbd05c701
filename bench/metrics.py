"""What a scrape of `/metrics` costs as the store and the broker fill up.

    .venv/bin/python bench/metrics.py [--sizes 5000,50000,500000] [--tasks 2000] [--scrapes 200]
                                      [--store sqlite|postgresql]

A real `nietest daemon` (embedded valkey, its `metrics` program; the SQLite store, or with
`--store postgresql` a fresh PostgreSQL database: bench/stores.py). The baseline is
measured first, in the same run, on the empty store. Then, for each size, one task of that many
subtasks is added (stored, and all of them waiting in the task's ready list in the broker, as a
campaign waiting for job slots is), plus `--tasks` small finished tasks in all; after each step
`--scrapes` GETs of /metrics are timed. The target: every step's p99 under 50 ms with 50,000
subtasks, and no growth with the number of subtasks (a scrape reads counts, never scans).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stores  # noqa: E402
from bench.pipeline import daemon  # noqa: E402
from nietest_daemon.coordination.connection import redis_client  # noqa: E402
from nietest_daemon.coordination.scheduler import Scheduler  # noqa: E402
from nietest_daemon.domain.subtask import Lane  # noqa: E402
from nietest_daemon.store import open_store_for  # noqa: E402
from nietest_daemon.testing.waiting import wait_for  # noqa: E402

TARGET_MS = 50.0


def scrape_times(url: str, scrapes: int) -> tuple[list[float], int]:
    """Milliseconds per scrape, and the size of the last answer."""
    times, size = [], 0
    for _ in range(scrapes):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as response:
            size = len(response.read())
        times.append((time.perf_counter() - started) * 1000)
    return times, size


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5000,50000,500000", help="subtasks of the task added at each step")
    parser.add_argument("--tasks", type=int, default=2000, help="small tasks stored in all (spread over the steps)")
    parser.add_argument("--scrapes", type=int, default=200)
    stores.add_store_option(parser)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]

    print(f"store: {args.store}", flush=True)
    with daemon(args.store) as (settings, _env):
        addr_file = settings.metrics_addr_file
        addr = wait_for(lambda: addr_file.exists() and addr_file.read_text().strip(), 30, "metrics address")
        url = f"http://{addr}/metrics"
        store = open_store_for(settings)
        client = redis_client(settings)
        ready = Scheduler(client, Lane.STANDARD, settings.max_jobs, lease_seconds=120)
        rows = [("baseline (empty store)", 0, 0, *scrape_times(url, args.scrapes))]
        total_subtasks = total_tasks = 0
        for step, size in enumerate(sizes):
            filled = time.monotonic()
            task_id = f"bench-metrics-{step}"
            store.create_task({"id": task_id, "name": f"bench {size}", "total_images": size, "priority": 1})
            ids = [f"{task_id}:{i}" for i in range(size)]
            for start in range(0, size, 5000):
                store.insert_subtasks(task_id, ({"id": i, "variable_indices": [0]} for i in ids[start : start + 5000]))
            ready.replace(task_id, ids, 1)  # waiting for a slot: nobody admits them (no master message)
            for i in range(args.tasks // len(sizes)):
                store.create_task({"id": f"{task_id}-small-{i}", "name": "small", "total_images": 1})
            total_subtasks += size
            total_tasks += 1 + args.tasks // len(sizes)
            print(f"step {step}: stored {size:,} subtasks in {time.monotonic() - filled:.1f} s", flush=True)
            rows.append((f"+{size:,} subtasks", total_subtasks, total_tasks, *scrape_times(url, args.scrapes)))
        store.close()
        client.close()

    print()
    print(f"{'store':<24} {'subtasks':>9} {'tasks':>6} {'median ms':>10} {'p99 ms':>8} {'max ms':>8} {'bytes':>7}")
    for name, subtasks, tasks, times, size in rows:
        print(
            f"{name:<24} {subtasks:>9,} {tasks:>6,} {statistics.median(times):>10.2f} "
            f"{percentile(times, 0.99):>8.2f} {max(times):>8.2f} {size:>7,}"
        )
    baseline = statistics.median(rows[0][3])
    worst = max(percentile(times, 0.99) for *_, times, _ in rows)
    largest = statistics.median(rows[-1][3])
    print(
        f"\nmedian at the largest size / baseline median: {largest / baseline:.2f}x; "
        f"worst p99 {worst:.2f} ms (target < {TARGET_MS:g} ms): {'met' if worst < TARGET_MS else 'NOT met'}"
    )
    return 0 if worst < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
