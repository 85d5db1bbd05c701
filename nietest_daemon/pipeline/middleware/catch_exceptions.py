"""`CatchExceptions`: when an actor fails for good (after Dramatiq's own retries, MAX_RETRIES),
the subtask or task it worked on is marked failed with the error text, so nothing stays
`processing`; the traceback is logged as a structured field by the worker thread, and the worker
keeps running. A failure that was only an outage (the broker or the store unreachable) fails
nothing: the subtask stays processing, for the sweep.
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from nietest_daemon.coordination.connection import unreachable_service
from nietest_daemon.core.logs import get_logger
from nietest_daemon.domain.lifecycle import Status
from nietest_daemon.domain.subtask import Subtask
from nietest_daemon.pipeline import notices
from nietest_daemon.pipeline.context import context
from nietest_daemon.pipeline.messages import PROCESS_TASK, ids_of
from nietest_daemon.pipeline.subtasks import finish

log = get_logger(__name__)


class CatchExceptions(Middleware):
    def after_process_message(self, broker: dramatiq.Broker, message: Any, *, result=None, exception=None) -> None:
        if exception is None or not message.failed:
            return
        ids = ids_of(message)
        service = unreachable_service(exception)
        if service is not None:
            # The broker or the store blinked: not the subtask's fault. It stays processing and the
            # sweep resumes it.
            log.warning(f"{service} unreachable during the message; left for the sweep", error=str(exception), **ids)
            return
        error = f"{type(exception).__name__}: {exception}"[:2000]
        try:
            ctx = context()
            if "subtask_id" in ids:
                doc = ctx.store.get_subtask(ids["subtask_id"])
                if doc is not None:
                    finish(ctx, Subtask.from_doc(doc), Status.FAILED, error=f"unexpected error: {error}")
            elif "task_id" in ids and message.actor_name == PROCESS_TASK:
                task_id = ids["task_id"]
                if ctx.store.fail_task(task_id, f"unexpected error: {error}"):
                    ctx.store.cancel_task(task_id)  # its subtasks must not run on
                    task = ctx.store.get_task(task_id)
                    if task is not None:
                        notices.task_finished(ctx, task)
            else:
                return
            log.error("marked failed after an unexpected error", error=error, **ids)
        except Exception:
            log.exception("could not mark the failure", **ids)
