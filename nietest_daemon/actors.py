"""The actors of the four queues, registered on the broker when a worker imports this module.

master:      process_task (expand + dispatch), send_notice (task notices)
subtask:     run_subtask, poll_subtask             (standard jobs)
subtask_ops: run_lumina_subtask, poll_lumina_subtask (Lumina jobs)
master_ops:  reserved; no actor. A message for an unknown actor is dead-lettered with a log line.

The bodies live in `pipeline` and `notices`; NIETEST_ACTOR_MODULES adds more actor modules.
"""

from __future__ import annotations

import dramatiq

from nietest_daemon import notices, pipeline
from nietest_daemon import settings as settings_module

_settings = settings_module.load()
_MINUTE = 60_000


def send_notice(task_id: str, event: str) -> None:
    notices.deliver(pipeline.context(), task_id, event)


_master = _settings.queue("master").name
dramatiq.actor(
    pipeline.process_task,
    actor_name=pipeline.PROCESS_TASK,
    queue_name=_master,
    max_retries=_settings.max_retries,
    time_limit=30 * _MINUTE,
)
dramatiq.actor(send_notice, actor_name=notices.SEND_NOTICE, queue_name=_master, max_retries=0, time_limit=2 * _MINUTE)
for _lumina in (False, True):
    _queue = _settings.queue("subtask_ops" if _lumina else "subtask").name
    dramatiq.actor(
        pipeline.run_subtask,
        actor_name=pipeline.RUN_SUBTASK[_lumina],
        queue_name=_queue,
        max_retries=_settings.max_retries,
        time_limit=5 * _MINUTE,
    )
    dramatiq.actor(
        pipeline.poll_subtask,
        actor_name=pipeline.POLL_SUBTASK[_lumina],
        queue_name=_queue,
        max_retries=_settings.max_retries,
        time_limit=5 * _MINUTE,
    )
