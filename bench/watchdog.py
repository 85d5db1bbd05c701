"""What kill -9 of a polling subtask worker adds to a task's wall time.

    .venv/bin/python -m bench.watchdog [--subtasks 40] [--generation 3] [--rounds 3]

A real `nietest daemon` (embedded valkey, SQLite store; default heartbeat timeout, 60 s;
2 subtask processes x 5 threads) against the fake Nieta API in its own process. Each round runs
the same task twice: once untouched, once with `kill -9` of one subtask worker as soon as every
subtask's job is being polled (the worker then holds some of the subtasks' poll messages). The
figure is the difference of the two wall times; the target is at most 3 s. A last round does the
same with the watchdog program stopped: the killed worker's polls then come back only after the
heartbeat timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
from pathlib import Path

from bench.pipeline import FakeAPI, daemon, submit, task_file
from nietest_daemon.core.settings import Settings
from nietest_daemon.domain.lifecycle import TERMINAL, Status
from nietest_daemon.programs.daemon import control_proxy
from nietest_daemon.store import open_store_for
from nietest_daemon.testing.waiting import wait_for

TARGET_SECONDS = 3.0


def run_once(
    settings: Settings, env: dict[str, str], path: Path, *, kill: bool, watchdog: bool = True
) -> tuple[float, int]:
    """The task's wall time (stored submission to end), and how many messages the kill handed back."""
    store = open_store_for(settings)
    task_id = submit(env, path)
    handed = 0
    if kill:

        def all_polling() -> bool:
            subs = store.list_subtasks(task_id)
            return bool(subs) and all(s.get("job_uuid") and (s.get("poll_count") or 0) >= 1 for s in subs)

        wait_for(all_polling, 60, "every subtask polling", interval=0.05)
        proxy = control_proxy(settings)
        pid = proxy.supervisor.getProcessInfo("subtask:subtask_00")["pid"]
        log = settings.log_dir / "watchdog.log"
        seen = log.read_text().count("handed back") if log.exists() else 0
        os.kill(pid, signal.SIGKILL)
        if watchdog:
            wait_for(lambda: log.read_text().count("handed back") > seen, 10, "the watchdog's hand-back")
            handed = [json.loads(line) for line in log.read_text().splitlines() if "handed back" in line][-1][
                "messages"
            ]
    task = wait_for(
        lambda: (t := store.get_task(task_id)) and t["status"] in TERMINAL and t, 300, "the task to end", interval=0.2
    )
    store.close()
    assert task["status"] == Status.COMPLETED, task
    return (task["completed_at"] - task["created_at"]).total_seconds(), handed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subtasks", type=int, default=40)
    parser.add_argument("--generation", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--skip-baseline", action="store_true", help="skip the last round, with the watchdog stopped (about 70 s)"
    )
    args = parser.parse_args()
    api = FakeAPI()
    work = Path(tempfile.mkdtemp(prefix="ntw-bench-"))
    added: list[float] = []
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}")
    try:
        api.configure(generation_time=args.generation)
        with daemon(**api.env(), IMAGE_POLLING_INTERVAL="0.5") as (settings, env):
            print(
                f"{args.subtasks} subtasks, generation {args.generation:g} s, polls 0.5 s apart, heartbeat timeout "
                f"{settings.broker_heartbeat_timeout:g} s, 2 subtask workers x 5 threads"
            )
            for n in range(args.rounds):
                clean, _ = run_once(settings, env, task_file(work, args.subtasks), kill=False)
                killed, handed = run_once(settings, env, task_file(work, args.subtasks), kill=True)
                added.append(killed - clean)
                print(
                    f"  round {n + 1}: untouched {clean:5.2f} s; kill -9 of subtask_00 while polling {killed:5.2f} s "
                    f"({killed - clean:+.2f} s; the watchdog handed back {handed} messages)",
                    flush=True,
                )
            if not args.skip_baseline:
                control_proxy(settings).supervisor.stopProcess("watchdog:watchdog")
                clean, _ = run_once(settings, env, task_file(work, args.subtasks), kill=False)
                killed, _ = run_once(settings, env, task_file(work, args.subtasks), kill=True, watchdog=False)
                print(
                    f"  baseline, the watchdog program stopped: untouched {clean:5.2f} s; kill -9 {killed:5.2f} s "
                    f"({killed - clean:+.2f} s: the heartbeat timeout)",
                    flush=True,
                )
    finally:
        api.close()
    worst = max(added)
    ok = worst <= TARGET_SECONDS
    print(
        f"added wall time: median {statistics.median(added):.2f} s, max {worst:.2f} s "
        f"(target <= {TARGET_SECONDS:g} s): {'met' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
