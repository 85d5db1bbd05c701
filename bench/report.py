"""Bench: `nietest report`, `nietest export` and the store side of `nietest retry` on a 50 000-image task.

    .venv/bin/python -m bench.report [--keep DIR] [--store sqlite|postgresql]

Builds, in a SQLite store in a temporary directory (or with `--store postgresql` a fresh
PostgreSQL database, migrated as a daemon's start does: bench/stores.py), one task of 100 styles
x 20 ratios x 25 seeds
= 50 000 subtasks as submit and the workers would leave it (90 % completed with an image URL,
8 % failed, 2 % cancelled; each through `Store.finish_subtask`), then times and prints:

- the report with the default axes (style down, ratio across: 25 grids of 100 x 20, one per
  seed) and with `--rows seed --cols style` (20 grids of 25 x 100, one per ratio), the file sizes
  and the peak memory;
- the CSV and JSON-lines exports (to /dev/null);
- `Store.retry_subtasks` of the 4 000 failed subtasks (one transaction), then the task list;
- when Debian's chromium is there, how long headless Chromium takes to load the report and dump
  its DOM (the page with its 50 blocks folded).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import stores
from nietest_daemon.domain import taskspec
from nietest_daemon.domain.lifecycle import Status
from nietest_daemon.programs import export, report
from nietest_daemon.store import Store
from nietest_daemon.testing import task_documents as taskdocs

STYLES, RATIOS, SEEDS = 100, 20, 25


def task_document() -> dict[str, Any]:
    """The task: STYLES styles (a variable prompt) x RATIOS ratios x SEEDS seeds."""
    ratios = [f"{w}:{h}" for w in (1, 2, 3, 4, 5) for h in (1, 3, 5, 7)]
    styles = [f'style {i}: watercolor, soft pastel, "quoted"' for i in range(STYLES)]
    return taskdocs.task_document(
        "bench: 50 000 images",
        [taskdocs.fixed_prompt("1girl, portrait, cherry blossoms"), taskdocs.variable_prompt("style", styles)],
        ratio=taskdocs.variable_param("ratio", ratios[:RATIOS]),
        seed=taskdocs.variable_param("seed", list(range(1, SEEDS + 1))),
    )


def timed(label: str, fn: Any) -> Any:
    started = time.perf_counter()
    result = fn()
    print(f"{label:58} {time.perf_counter() - started:7.2f} s")
    return result


def build(store: Store, task_id: str) -> None:
    task = taskspec.validate_task(task_document())
    assert task.total_subtasks == 50_000
    store.create_task({"id": task_id, **task.to_document()})
    store.mark_task_running(task_id)
    store.insert_subtasks(task_id, ({"id": s.subtask_id(task_id), **s.as_dict()} for s in taskspec.expand(task)))
    for i, sub in enumerate(store.iter_subtasks(task_id)):
        kind = i % 50
        sid = sub["id"]
        if kind < 45:
            store.start_subtask(sid)
            store.record_job(sid, f"{i:08x}-0000-4000-8000-000000000000", sub["seed"])
            store.finish_subtask(sid, Status.COMPLETED, result=f"https://oss.example.com/picture/{i:08x}.webp")
        elif kind < 49:
            store.start_subtask(sid)
            store.finish_subtask(sid, Status.FAILED, error=f"refused by moderation (ILLEGAL_IMAGE): score 0.9{i % 10}")
        else:
            store.finish_subtask(sid, Status.CANCELLED, error="task cancelled")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--keep", metavar="DIR", help="build in DIR and keep it (default: a temporary directory; SQLite only)"
    )
    stores.add_store_option(parser)
    args = parser.parse_args(argv)
    if args.keep and args.store != "sqlite":
        parser.error("--keep keeps a SQLite store: a PostgreSQL bench database is always dropped")
    directory = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="nt-bench-report-"))
    directory.mkdir(parents=True, exist_ok=True)
    print(f"store: {args.store}")
    try:
        with stores.bench_store(args.store, directory / "data") as store:
            run(store, directory)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


def run(store: Store, directory: Path) -> None:
    """Build the task (unless a kept directory has it), then time each step."""
    task_id = "bench50k"
    if store.get_task(task_id) is None:
        timed("build: 50 000 subtasks, each finished through the store", lambda: build(store, task_id))
    task = store.get_task(task_id)
    assert task is not None
    print(
        f"task: {task['status']}, {task['completed_images']} completed, {task['failed_images']} failed, "
        f"{task['cancelled_images']} cancelled of {task['total_images']}"
    )
    default = directory / "report-default.html"
    cells = timed(
        "report, default axes (style x ratio, a grid per seed)",
        lambda: report.write_report(store, task_id, default),
    )
    other = directory / "report-seed-by-style.html"
    timed(
        "report, --rows seed --cols style (a grid per ratio)",
        lambda: report.write_report(store, task_id, other, rows="seed", cols="style"),
    )
    print(f"  {cells} cells; {default.stat().st_size / 1e6:.1f} MB and {other.stat().st_size / 1e6:.1f} MB")
    with open(os.devnull, "w") as null:
        rows = timed("export --format csv (to /dev/null)", lambda: export.export(store, task_id, "csv", null))
        timed("export --format jsonl (to /dev/null)", lambda: export.export(store, task_id, "jsonl", null))
    print(f"  {rows} rows each")
    chromium = shutil.which("chromium")
    if chromium:
        profile = directory / "chromium-profile"
        # Headless Chromium does not lazy-load: it fetches all 45 000 images (here from a host
        # that does not resolve), which a browser showing the page does not. Images off, it
        # measures what the page itself costs to load and lay out.
        timed(
            "chromium --headless --screenshot, images off",
            lambda: subprocess.run(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    f"--user-data-dir={profile}",
                    "--blink-settings=imagesEnabled=false",
                    f"--screenshot={directory / 'report.png'}",
                    "--window-size=1280,2000",
                    default.as_uri(),
                ],
                capture_output=True,
                check=True,
                timeout=300,
            ),
        )
    if task["status"] != Status.PROCESSING:
        outcome = timed(
            "Store.retry_subtasks of the 4 000 failed (one transaction)", lambda: store.retry_subtasks(task_id)
        )
        print(f"  reset {outcome.reset}, task {outcome.task['status']} round {outcome.round}")
    timed("Store.list_tasks(limit=20)", lambda: store.list_tasks(limit=20))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process: {peak:.0f} MiB")


if __name__ == "__main__":
    raise SystemExit(main())
