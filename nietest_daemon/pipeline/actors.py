"""The actors (on three of the four queues), registered on the broker when a worker imports this module.

master:      process_task (expand + dispatch), send_notice (task notices),
             test_submit_master (the seed's producers: store a task under their id, then run it)
subtask:     run_subtask, poll_subtask                 (the standard lane)
subtask_ops: run_lumina_subtask, poll_lumina_subtask   (the Lumina lane)
master_ops:  reserved; no actor. A message for an unknown actor is dead-lettered with a log line.

The bodies live in pipeline/task_steps.py, pipeline/subtasks.py, pipeline/notices.py and
pipeline/producer.py;
NIETEST_ACTOR_MODULES adds more actor modules.
"""

from __future__ import annotations

from typing import Any

import dramatiq

from nietest_daemon.core import settings as settings_module
from nietest_daemon.domain.subtask import Lane
from nietest_daemon.pipeline import notices, producer, subtasks, task_steps
from nietest_daemon.pipeline.context import context
from nietest_daemon.pipeline.messages import POLL_SUBTASK, PROCESS_TASK, RUN_SUBTASK, SEED_SUBMIT, SEND_NOTICE

_settings = settings_module.load()
_MINUTE = 60_000


def send_notice(task_id: str, event: str, round: int = 1, snapshot: dict[str, Any] | None = None) -> None:
    """`snapshot`: what a final notice's card shows of its round (`notices.snapshot_of`); messages
    enqueued without it show the task as read."""
    notices.deliver(context(), task_id, event, round, snapshot)


_master = _settings.queue("master").name
# dramatiq.actor(**options) returns the decorator, applied here without `@` (its typed form).
dramatiq.actor(
    actor_name=PROCESS_TASK,
    queue_name=_master,
    max_retries=_settings.max_retries,
    time_limit=30 * _MINUTE,
)(task_steps.process_task)
dramatiq.actor(actor_name=SEND_NOTICE, queue_name=_master, max_retries=0, time_limit=2 * _MINUTE)(send_notice)
dramatiq.actor(
    actor_name=SEED_SUBMIT,
    queue_name=_master,
    max_retries=_settings.max_retries,
    time_limit=5 * _MINUTE,
)(producer.submit_from_producer)
for _lane in Lane:
    _queue = _settings.queue(_lane.queue_key).name
    dramatiq.actor(
        actor_name=RUN_SUBTASK[_lane],
        queue_name=_queue,
        max_retries=_settings.max_retries,
        time_limit=5 * _MINUTE,
    )(subtasks.run_subtask)
    dramatiq.actor(
        actor_name=POLL_SUBTASK[_lane],
        queue_name=_queue,
        max_retries=_settings.max_retries,
        time_limit=5 * _MINUTE,
    )(subtasks.poll_subtask)
