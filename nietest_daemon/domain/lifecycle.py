"""The status rules of tasks and subtasks, shared by every layer.

Subtask statuses: pending, processing, completed, failed, cancelled (the last three terminal).
A subtask leaves a non-terminal state exactly once; only that move counts it on its task.

Tasks use the same five statuses, no extra one (the front end knows only these). A task is
`pending` until its master expands it, then `processing`; when every subtask is terminal it
becomes, in this order of precedence:

- `completed` when every subtask completed;
- `cancelled` when a cancel was requested (or any subtask was cancelled);
- `failed` when no subtask completed;
- otherwise `completed` with `error` = "partially completed: N of M images failed": a
  *partial* completion (`is_partial`), which gets the "partially completed" notice.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """A task's or a subtask's status; the stored text is the value.

    One enum for both: they share the five statuses and their rules (`TERMINAL`, `ACTIVE`), and
    the front end reads both with the same names. A member is a `str` equal to its value, so
    documents, SQL parameters and JSON carry the same text as before; a document read back from a
    store holds the plain string, which compares equal to its member.
    """

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


STATUSES: tuple[Status, ...] = tuple(Status)
ACTIVE: tuple[Status, ...] = (Status.PENDING, Status.PROCESSING)
TERMINAL: frozenset[Status] = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})

#: The counter each terminal subtask status increments on its task.
COUNTER_OF: dict[Status, str] = {
    Status.COMPLETED: "completed_images",
    Status.FAILED: "failed_images",
    Status.CANCELLED: "cancelled_images",
}
COUNTERS: tuple[str, ...] = ("processed_images", "completed_images", "failed_images", "cancelled_images")


def progress_of(processed: int, total: int) -> float:
    """processed / total * 100, rounded to 2 places; 0.0 for an empty task."""
    return round(processed * 100.0 / total, 2) if total > 0 else 0.0


def done_count(task: Mapping[str, Any]) -> int:
    """completed + failed + cancelled images of a task."""
    return sum(int(task.get(k) or 0) for k in ("completed_images", "failed_images", "cancelled_images"))


def is_done(task: Mapping[str, Any]) -> bool:
    """Every image of the task is accounted for (and there is at least one)."""
    total = int(task.get("total_images") or 0)
    return total > 0 and done_count(task) >= total


def final_task_status(task: Mapping[str, Any]) -> tuple[Status, str | None]:
    """The status (and error note) a task whose subtasks are all terminal ends in; see the module doc."""
    total = int(task.get("total_images") or 0)
    completed = int(task.get("completed_images") or 0)
    failed = int(task.get("failed_images") or 0)
    if total > 0 and completed >= total:
        return Status.COMPLETED, None
    if task.get("cancel_requested") or int(task.get("cancelled_images") or 0) > 0:
        return Status.CANCELLED, task.get("error")
    if completed == 0:
        return Status.FAILED, task.get("error") or f"all {failed} images failed"
    return Status.COMPLETED, f"partially completed: {failed} of {total} images failed"


def is_partial(task: Mapping[str, Any]) -> bool:
    """A finished task that completed some but not all of its images (and was not cancelled)."""
    return task.get("status") == Status.COMPLETED and int(task.get("completed_images") or 0) < int(
        task.get("total_images") or 0
    )
