"""The pipeline's messages: actor names, enqueueing by name, and what a message is about.

The CLI and the pipeline enqueue by actor name, without importing the actors (pipeline/actors.py
registers them in worker processes only).
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

import dramatiq
from dramatiq.middleware import CurrentMessage

from nietest_daemon.coordination import markers
from nietest_daemon.domain.subtask import Lane

if TYPE_CHECKING:
    from nietest_daemon.pipeline.context import Context

#: Actor names, by lane where there is one of each.
PROCESS_TASK = "process_task"
SEND_NOTICE = "send_notice"
#: The seed's master actor, which producers written for the seed enqueue by name (pipeline/producer.py).
SEED_SUBMIT = "test_submit_master"
RUN_SUBTASK = {Lane.STANDARD: "run_subtask", Lane.LUMINA: "run_lumina_subtask"}
POLL_SUBTASK = {Lane.STANDARD: "poll_subtask", Lane.LUMINA: "poll_lumina_subtask"}

#: actor name -> the keyword its first argument is logged as.
ID_ARGUMENT = {
    PROCESS_TASK: "task_id",
    SEND_NOTICE: "task_id",
    SEED_SUBMIT: "task_id",
    **{name: "subtask_id" for name in (*RUN_SUBTASK.values(), *POLL_SUBTASK.values())},
}


def ids_of(message: Any) -> dict[str, str]:
    """The task or subtask id a message is about, keyed as log lines name it (may be empty)."""
    key = ID_ARGUMENT.get(message.actor_name)
    if not key:
        return {}
    value = message.args[0] if message.args else (message.kwargs or {}).get(key)
    return {key: value[:200]} if isinstance(value, str) else {}


def enqueue(
    actor_name: str,
    queue_name: str,
    *args: Any,
    delay: float = 0.0,
    broker: dramatiq.Broker | None = None,
    **kwargs: Any,
) -> dramatiq.Message[Any]:
    """Enqueue a message for an actor by name (on `broker`, by default Dramatiq's global one)."""
    broker = broker or dramatiq.get_broker()
    delay_ms = int(delay * 1000) if delay > 0 else 0
    # due_ms: when the message is meant to run, so TaskTracker's queue latency excludes a deliberate delay.
    options = {"due_ms": int(time.time() * 1000) + delay_ms}
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=queue_name, actor_name=actor_name, args=args, kwargs=kwargs, options=options
    )
    return broker.enqueue(message, delay=delay_ms or None)


def send_run(ctx: Context, subtask_id: str, lane: Lane, *, delay: float = 0.0, **kwargs: Any) -> None:
    enqueue(RUN_SUBTASK[lane], ctx.queue_of(lane), subtask_id, delay=delay, **kwargs)


def enqueue_poll(ctx: Context, subtask_id: str, lane: Lane, *, delay: float, **kwargs: Any) -> str:
    """Enqueue a poll of the subtask; its message id, which the caller must make the current poll
    (`markers.set_current_poll`, or `markers.end_create(poll=...)`) or it will not act."""
    return enqueue(POLL_SUBTASK[lane], ctx.queue_of(lane), subtask_id, delay=delay, **kwargs).message_id


def schedule_poll(
    ctx: Context, subtask_id: str, lane: Lane, *, delay: float, renew: bool = False, **kwargs: Any
) -> None:
    """Enqueue the subtask's next poll and make it the only poll message that may act; `renew`:
    also extend the lease of its job slot (a job still running), in the same round trip."""
    message_id = enqueue_poll(ctx, subtask_id, lane, delay=delay, **kwargs)
    # Set after the enqueue: a crash in between leaves the older message current, never none.
    with ctx.redis.pipeline(transaction=False) as pipe:
        markers.set_current_poll(pipe, subtask_id, message_id)
        if renew:
            ctx.schedulers[lane].renew(subtask_id, client=pipe)
        pipe.execute()


def current_message_id() -> str | None:
    message = CurrentMessage.get_current_message()
    return message.message_id if message is not None else None


def owner_of_current_message() -> str:
    """The running message's id: the owner of a lock or marker it takes (a random one outside a message)."""
    return current_message_id() or f"local-{random.getrandbits(64):x}"
