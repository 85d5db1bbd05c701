"""The seed's entry point, `python -m nietest_daemon.start_dramatiq {master|subtask|subtask_ops|all}`
(and scripts/start_dramatiq_workers.sh, which runs it): the daemon for the named queues only.

Runs `nietest daemon` with the given counts for the named queues; the other queues get no
processes. `all` runs master, subtask and subtask_ops (master_ops keeps its configured count).
"""

from __future__ import annotations

import argparse
import os

CHOICES = {
    "master": ["master"],
    "subtask": ["subtask"],
    "subtask_ops": ["subtask_ops"],
    "all": ["master", "subtask", "subtask_ops"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nietest_daemon.start_dramatiq",
        description="Run the nietest daemon for these queues only (seed-compatible entry point).",
    )
    parser.add_argument("queue", choices=sorted(CHOICES), help="which queue's workers to run")
    parser.add_argument("--processes", "-p", type=int, metavar="N", help="worker processes per queue")
    parser.add_argument("--threads", "-t", type=int, metavar="M", help="threads per worker process")
    args = parser.parse_args(argv)

    for key in ("master", "subtask", "subtask_ops"):
        upper = key.upper()
        if key not in CHOICES[args.queue]:
            os.environ[f"NIETEST_{upper}_PROCESSES"] = "0"
            continue
        if args.processes is not None:
            os.environ[f"NIETEST_{upper}_PROCESSES"] = str(args.processes)
        if args.threads is not None:
            os.environ[f"NIETEST_{upper}_THREADS"] = str(args.threads)
    # Imported after the environment is set: the CLI reads the settings from it.
    from nietest_daemon.programs.cli import run

    return run(["daemon"])
