"""`nietest submit`, `nietest status TASK_ID`, `nietest cancel`, `nietest tasks` and `nietest retry`:
tasks from the command line."""

from __future__ import annotations

import getpass
import json
import sys
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from nietest_daemon.core.settings import Settings
from nietest_daemon.domain import owners, taskspec
from nietest_daemon.domain.lifecycle import TERMINAL, Status, is_partial
from nietest_daemon.store.base import round_of

MAX_TASK_FILE_BYTES = 20 * 1024 * 1024


def _error(message: str) -> int:
    print(f"nietest: {message}", file=sys.stderr)
    return 2


def _broker(settings: Settings) -> Any:
    # The pipeline (Dramatiq, the clients) is imported in the functions that use it: about 1 s of
    # start-up that `nietest status TASK_ID` and a refused `nietest submit` do not pay.
    from nietest_daemon.pipeline.broker import build_broker

    return build_broker(settings)


def invoking_user() -> str:
    """Who runs the command (`getpass.getuser`: $LOGNAME, $USER, ... or the password database), as
    an owner; "unknown" when it cannot be told or is no valid owner."""
    try:
        return owners.check_owner(getpass.getuser(), "user")
    except Exception:  # getuser: KeyError or OSError with no user to name; an odd name: TaskValidationError
        return "unknown"


def submit(settings: Settings, path: str, *, wait: bool, owner: str | None = None) -> int:
    """Validate, store (pending, with its owner), enqueue the master message, print the task id.

    The owner is `owner` (--owner), else the file's `owner` or `user_id`, else the invoking user."""
    if owner is not None:
        try:
            owner = owners.check_owner(owner, "--owner")
        except taskspec.TaskValidationError as exc:
            return _error(str(exc))
    file = Path(path)
    too_large = f"{path}: invalid task: task: larger than {MAX_TASK_FILE_BYTES // 1024 // 1024} MB"
    try:
        if file.stat().st_size > MAX_TASK_FILE_BYTES:
            return _error(too_large)
        with file.open("rb") as fh:  # bounded: a device or pipe reports no size (/dev/zero)
            text = fh.read(MAX_TASK_FILE_BYTES + 1)
    except OSError as exc:
        return _error(f"{path}: {exc.strerror or exc}")
    if len(text) > MAX_TASK_FILE_BYTES:
        return _error(too_large)
    try:
        task = taskspec.parse_task(text)
        owner = owner or owners.owner_in(task.extra) or invoking_user()
    except taskspec.TaskValidationError as exc:
        return _error(f"{path}: invalid task: {exc}")
    if not settings.nieta_xtoken:
        return _error("NIETA_XTOKEN: required to submit a task (the workers need it to call the Nieta API)")

    from nietest_daemon.pipeline.messages import PROCESS_TASK, enqueue
    from nietest_daemon.store import open_store_for

    task_id = uuid.uuid4().hex
    store = open_store_for(settings)
    broker = _broker(settings)
    try:
        broker.client.ping()
    except Exception as exc:
        return _error(f"broker {settings.broker_description} unreachable: {exc}")
    store.create_task({"id": task_id, **task.to_document(), "owner": owner})
    try:
        enqueue(PROCESS_TASK, settings.queue("master").name, task_id)
    except Exception as exc:
        store.fail_task(task_id, f"could not enqueue the task: {exc}")
        return _error(f"could not enqueue task {task_id}: {exc}")
    print(task_id, flush=True)
    if not wait:
        return 0
    return _wait(store, task_id)


def _bar(task: dict[str, Any], width: int = 30) -> str:
    total = int(task.get("total_images") or 0)
    done = int(task.get("processed_images") or 0)
    filled = int(width * done / total) if total else 0
    return (
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
        f"completed {task.get('completed_images', 0)} failed {task.get('failed_images', 0)} "
        f"cancelled {task.get('cancelled_images', 0)}  {task.get('status')}   "
    )


def _wait(store: Any, task_id: str) -> int:
    """Show a progress bar (stderr) until the task ends; exit 0 only if every image completed."""
    while True:
        task = store.get_task(task_id)
        if task is None:
            return _error(f"task {task_id} vanished from the store")
        print(_bar(task), end="", file=sys.stderr, flush=True)
        if task["status"] in TERMINAL:
            print(file=sys.stderr)
            return 0 if task["status"] == Status.COMPLETED and not is_partial(task) else 1
        time.sleep(0.5)


def task_report(settings: Settings, task_id: str) -> dict[str, Any] | None:
    from nietest_daemon.store import open_store_for

    store = open_store_for(settings)
    task = store.get_task(task_id)
    if task is None:
        return None
    failed = store.list_subtasks(task_id, status=Status.FAILED)
    errors = Counter((sub.get("error") or "unknown error")[:200] for sub in failed)
    return {
        "id": task_id,
        "name": task.get("name"),
        "owner": task.get("owner"),
        "status": task.get("status"),
        "partially_completed": is_partial(task),
        "total_images": task.get("total_images"),
        "processed_images": task.get("processed_images"),
        "completed_images": task.get("completed_images"),
        "failed_images": task.get("failed_images"),
        "cancelled_images": task.get("cancelled_images"),
        "progress": task.get("progress"),
        "cancel_requested": bool(task.get("cancel_requested")),
        "by_status": store.count_subtasks(task_id),
        "errors": [{"error": text, "count": n} for text, n in errors.most_common(10)],
        "created_at": task.get("created_at"),
        "started_at": task.get("started_at"),
        "completed_at": task.get("completed_at"),
        "error": task.get("error"),
    }


def status(settings: Settings, task_id: str, *, as_json: bool) -> int:
    report = task_report(settings, task_id)
    if report is None:
        return _error(f"no task {task_id}")
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"task     {report['id']}  {report['name']}")
    print(f"owner    {owners.shown_owner(report['owner'])}")
    print(f"status   {report['status']}" + ("  (partially completed)" if report["partially_completed"] else ""))
    print(
        f"progress {report['progress']}%  {report['processed_images']}/{report['total_images']}  "
        f"completed {report['completed_images']}  failed {report['failed_images']}  "
        f"cancelled {report['cancelled_images']}"
    )
    print("subtasks " + "  ".join(f"{k} {v}" for k, v in report["by_status"].items()))
    if report["error"]:
        print(f"note     {report['error']}")
    for item in report["errors"]:
        print(f"  {item['count']:>5} x {item['error']}")
    return 0


def cancel(settings: Settings, task_id: str) -> int:
    from nietest_daemon.pipeline.context import context
    from nietest_daemon.pipeline.task_steps import cancel_task

    _broker(settings)
    ctx = context(settings)
    outcome = cancel_task(ctx, task_id)
    if not outcome.found:
        return _error(f"no task {task_id}")
    print(
        f"task {task_id}: cancel requested; {outcome.cancelled} pending subtasks cancelled; "
        f"running jobs are not polled further"
    )
    return 0


# --- nietest tasks / nietest retry --------------------------------------------------------------------


def _clipped(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"


def task_line(task: dict[str, Any], now: datetime) -> dict[str, Any]:
    """What `nietest tasks` shows of one task."""
    created = task.get("created_at")
    age = (now - created).total_seconds() if isinstance(created, datetime) else None
    return {
        "id": task["id"],
        "name": task.get("name"),
        "owner": task.get("owner"),
        "status": task.get("status"),
        "partially_completed": is_partial(task),
        "progress": task.get("progress"),
        "total_images": task.get("total_images"),
        "processed_images": task.get("processed_images"),
        "completed_images": task.get("completed_images"),
        "failed_images": task.get("failed_images"),
        "cancelled_images": task.get("cancelled_images"),
        "priority": task.get("priority"),
        "round": round_of(task),
        "created_at": created,
        "age_seconds": None if age is None else round(age, 1),
    }


def tasks(settings: Settings, *, status: str | None, limit: int, as_json: bool, owner: str | None = None) -> int:
    """The most recent tasks, newest first, of one status and / or one owner (`Store.list_tasks`:
    along the (owner, status, created_at) indexes)."""
    from nietest_daemon.store import open_store_for, utcnow

    if owner is not None:
        try:
            owner = owners.check_owner(owner, "--owner")
        except taskspec.TaskValidationError as exc:
            return _error(str(exc))
    store = open_store_for(settings)
    try:
        found = store.list_tasks(limit=limit, status=status, owner=owner)
    finally:
        store.close()
    now = utcnow()
    lines = [task_line(t, now) for t in found]
    if as_json:
        print(json.dumps(lines, indent=2, default=str, ensure_ascii=False))
        return 0
    if not lines:
        print("no tasks" + (f" {status}" if status else "") + (f" of {owner}" if owner else ""))
        return 0
    print(
        f"{'ID':32}  {'STATUS':10}  {'PROGRESS':>8}  {'DONE/TOTAL':>11}  {'FAILED':>6}  {'CANCEL':>6}  PRIO  "
        f"{'AGE':>4}  {'OWNER':16}  NAME"
    )
    for t in lines:
        name = _clipped(str(t["name"] or ""), 40)
        who = _clipped(owners.shown_owner(t["owner"]), 16)
        status_text = str(t["status"]) + ("*" if t["partially_completed"] else "")
        done = f"{t['completed_images'] or 0}/{t['total_images'] or 0}"
        age = _age(t["age_seconds"]) if t["age_seconds"] is not None else "?"
        print(
            f"{t['id']:32}  {status_text:10}  {float(t['progress'] or 0):7.1f}%  {done:>11}  "
            f"{t['failed_images'] or 0:>6}  {t['cancelled_images'] or 0:>6}  {t['priority'] or 0:>4}  {age:>4}  "
            f"{who:16}  {name}"
        )
    if any(t["partially_completed"] for t in lines):
        print("* partially completed: some images failed (`nietest retry TASK_ID` runs them again)")
    return 0


def retry(settings: Settings, task_id: str, *, failed: bool, cancelled: bool) -> int:
    """Run the failed (and/or cancelled) subtasks of a finished task again (pipeline/retry.py)."""
    from nietest_daemon.pipeline.context import context
    from nietest_daemon.pipeline.retry import RetryRefused, retry_task

    statuses = [s for s, wanted in ((Status.FAILED, failed), (Status.CANCELLED, cancelled)) if wanted] or [
        Status.FAILED
    ]
    broker = _broker(settings)
    try:
        broker.client.ping()  # before anything changes: the retried subtasks need the broker to run
    except Exception as exc:
        return _error(f"broker {settings.broker_description} unreachable: {exc}")
    ctx = context(settings)
    try:
        result = retry_task(ctx, task_id, statuses)
    except RetryRefused as exc:
        return _error(str(exc))
    task = result.outcome.task or {}
    left = int(task.get("total_images") or 0) - int(task.get("processed_images") or 0)
    print(
        f"task {task_id}: round {result.outcome.round}: {result.outcome.reset} {' and '.join(statuses)} "
        f"subtasks run again as new image jobs ({left} to do); `nietest status {task_id}` follows it"
    )
    return 0
