"""Producers written for the seed: the `test_submit_master(task_id, task_data)` actor.

The seed's web back end hands a campaign over by enqueueing one message by actor name on the
master queue, with an id it made and the front end's task JSON; it has told its user "accepted"
before any worker saw the message. So the actor cannot refuse at the door:

- a valid payload is stored under the given id (with its owner, `task_data.owner` or `user_id`,
  and the fields nietest does not use, in `extra`), then run exactly as `nietest submit` runs a
  task: one `process_task` message;
- an invalid payload becomes a stored task in status `failed`, its error naming the offending
  field, with a `failed` notice: the front end and the Feishu group both see why;
- it is idempotent: the stored task keeps the digest of its payload (`payload_sha256`). A
  redelivered message, or a second one with the same id and payload, finds it and carries on from
  where the first stopped (a `process_task` message again, which creates nothing twice); a
  different payload under an existing id is refused with an error log line, and the stored task is
  left alone.

Only a message whose `task_id` cannot name a task (not a short string of letters, digits, `-`,
`_`, `.`) has nowhere to be stored: it is logged as an error and dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nietest_daemon.core.logs import get_logger
from nietest_daemon.domain import owners, taskspec
from nietest_daemon.domain.lifecycle import TERMINAL
from nietest_daemon.domain.task_fields import MAX_NAME_CHARS, TaskValidationError, check_string, kind_of
from nietest_daemon.pipeline import notices
from nietest_daemon.pipeline.context import Context, context
from nietest_daemon.pipeline.messages import PROCESS_TASK, enqueue
from nietest_daemon.store import DuplicateTaskError

log = get_logger(__name__)

#: What a producer's task id may be: a uuid4 (with or without dashes) and the like. Never `:`,
#: which separates a subtask's id from its task's (domain/expansion.py).
TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: The name of a stored task whose payload has none that can be shown.
INVALID_NAME = "(invalid task)"


@dataclass(frozen=True)
class Payload:
    """What a producer's `task_data` makes: the task's stored fields, and why it is invalid (or None)."""

    document: dict[str, Any]
    problem: str | None


def payload_digest(task_data: Any) -> str:
    """The sha256 of a payload's canonical JSON: the same payload always has the same digest."""
    text = json.dumps(task_data, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def read_payload(task_data: Any) -> Payload:
    """Validate `task_data` with `nietest submit`'s rules; an invalid one still makes a document to store."""
    if not isinstance(task_data, Mapping):
        problem = f"task_data: must be a JSON object, got {kind_of(task_data)}"
        return Payload({"name": INVALID_NAME, "owner": None}, problem)
    try:
        owner = owners.owner_in(task_data)
    except TaskValidationError as exc:
        return Payload({"name": _shown_name(task_data), "owner": None}, str(exc))
    try:
        task = taskspec.validate_task(task_data)
    except TaskValidationError as exc:
        return Payload({"name": _shown_name(task_data), "owner": owner}, str(exc))
    return Payload({**task.to_document(), "owner": owner}, None)


def _shown_name(task_data: Mapping[str, Any]) -> str:
    """An invalid payload's name if it is a valid name, else a placeholder."""
    try:
        name = check_string(task_data.get("name"), "name", max_chars=MAX_NAME_CHARS, required=True)
    except TaskValidationError:
        return INVALID_NAME
    return name.strip() or INVALID_NAME


def submit_from_producer(task_id: Any, task_data: Any = None) -> None:
    """The body of `test_submit_master`: store the producer's task under its id, then run it."""
    if not isinstance(task_id, str) or not TASK_ID.fullmatch(task_id):
        shown = task_id[:200] if isinstance(task_id, str) else kind_of(task_id)
        log.error("producer message dropped: its task_id cannot name a task", task_id_given=shown)
        return
    ctx = context()
    digest = payload_digest(task_data)
    payload = read_payload(task_data)
    if not _store(ctx, task_id, payload, digest):
        return
    if payload.problem is not None:
        _fail(ctx, task_id, payload.problem)
        return
    task = ctx.store.get_task(task_id)
    if task is None or task["status"] in TERMINAL:
        return
    enqueue(PROCESS_TASK, ctx.settings.queue("master").name, task_id)
    log.info("producer task accepted", task_id=task_id, owner=task.get("owner"), images=task.get("total_images"))


def _store(ctx: Context, task_id: str, payload: Payload, digest: str) -> bool:
    """Store the task; True when the stored task is this payload's (new, or stored by an earlier delivery)."""
    try:
        ctx.store.create_task({"id": task_id, **payload.document, "payload_sha256": digest})
        return True
    except DuplicateTaskError:
        stored = ctx.store.get_task(task_id)
    if stored is not None and stored.get("payload_sha256") == digest:
        log.info("producer message for a task already stored; carrying on", task_id=task_id)
        return True
    log.error(
        "producer message refused: its task_id names another task; the stored task is left alone",
        task_id=task_id,
        stored_name=(stored or {}).get("name"),
        given_name=payload.document.get("name"),
    )
    return False


def _fail(ctx: Context, task_id: str, problem: str) -> None:
    """An invalid payload's task ends `failed`, once, with its notice."""
    error = f"invalid task: {problem}"
    if ctx.store.fail_task(task_id, error):
        task = ctx.store.get_task(task_id)
        if task is not None:
            notices.task_finished(ctx, task)
    log.warning("invalid task from a producer stored as failed", task_id=task_id, error=error)
