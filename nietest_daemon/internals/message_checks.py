"""What makes a fetched message body unfit to run, checked before Dramatiq decodes it.

Dramatiq 2.x trusts every body it fetches. Garbage placed on a queue by hand (or by a buggy
producer) breaks its consumer in ways that never end (see the list below). The consumer of
internals/dramatiq_redis.py calls `envelope_problem` and `arguments_problem` on each body and
dead-letters what cannot run, with one log line naming the message and what is wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from typing import Any

import dramatiq

# --- messages that cannot run ----------------------------------------------------------------------
#
# Dramatiq 2.x trusts every body it fetches. Garbage placed on a queue by hand (or by a buggy
# producer) breaks its consumer in ways that never end:
# - a body that does not decode (not UTF-8, not JSON, not an object, missing or unknown fields)
#   raises DecodeError out of the consumer; the consumer thread restarts, the message stays in the
#   old broker id's ack set, and maintenance puts it back on the queue: a redelivery loop, forever;
# - `options` that is not an object, or a `message_id` that is not a string, crash it the same way;
# - a `queue_name` other than the consumed queue kills the worker thread that runs it (Dramatiq
#   looks up the consumer by that name), so a process can go on RUNNING with no worker thread left;
# - no `options.redis_message_id`: the ack fails, and the message stays held until its worker exits,
#   then runs again;
# - option types the middleware does arithmetic on (`retries`, `max_retries`, ...) break Retries,
#   a null `max_retries` retries forever, and a `throws` option (in Python, an exception class)
#   kills the worker thread as soon as the actor raises.
# Arguments that do not fit the actor (missing, extra, or of the wrong JSON type) can never
# succeed, so retrying them (MAX_RETRIES, with backoff) only delays the inevitable.
#
# NietestRedisConsumer checks each body before Dramatiq sees it, and dead-letters the ones that
# cannot run (the queue's `.XQ` set, where `nietest status` counts them) with one log line naming
# the message and what is wrong. The worker goes on with the next message.

#: The fields of a message (dramatiq.Message) and the JSON types they must have.
_MESSAGE_FIELDS = frozenset(f.name for f in dataclasses.fields(dramatiq.Message))
_FIELDS: dict[str, tuple[type, ...]] = {
    "queue_name": (str,),
    "actor_name": (str,),
    "args": (list,),
    "kwargs": (dict,),
    "options": (dict,),
    "message_id": (str,),
    "message_timestamp": (int, float),
}
_OPTIONAL_FIELDS = {"message_id", "message_timestamp"}
#: Options that Dramatiq's middleware computes with: a number (or absent; `eta` may be null).
_NUMERIC_OPTIONS = (
    "eta",
    "retries",
    "max_retries",
    "min_backoff",
    "max_backoff",
    "time_limit",
    "max_age",
    "due_ms",
    "broker_error_retries",
)
#: Options that only a Python caller can set (an exception class): never valid in a JSON body.
_CODE_OPTIONS = ("throws",)
#: Argument annotations that are checked against the decoded JSON value; any other is not checked.
_JSON_TYPES: dict[Any, tuple[type, ...]] = {
    str: (str,),
    int: (int,),
    float: (int, float),
    bool: (bool,),
    list: (list,),
    tuple: (list,),
    dict: (dict,),
    type(None): (type(None),),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def envelope_problem(fields: Any, queue_name: str) -> str | None:
    """What makes a decoded body unfit to be a message of `queue_name`, or None."""
    if not isinstance(fields, dict):
        return f"not a JSON object (a JSON {type(fields).__name__})"
    for name, kinds in _FIELDS.items():
        if name not in fields:
            if name not in _OPTIONAL_FIELDS:
                return f"missing field {name!r}"
        elif not isinstance(fields[name], kinds) or isinstance(fields[name], bool):
            return f"field {name!r} must be {' or '.join(k.__name__ for k in kinds)}, not {type(fields[name]).__name__}"
    unknown = sorted(set(fields) - _MESSAGE_FIELDS)
    if unknown:
        return f"unknown fields {unknown}"[:200]
    if fields["queue_name"] != queue_name:
        return f"its queue_name {fields['queue_name'][:100]!r} is not this queue"
    options = fields["options"]
    if not isinstance(options.get("redis_message_id"), str):
        return "options.redis_message_id is missing or not a string"
    for name in _NUMERIC_OPTIONS:
        if options.get(name) is not None and not _is_number(options[name]):
            return f"option {name!r} must be a number, not {type(options[name]).__name__}"
    if "max_retries" in options and options["max_retries"] is None:
        return "option 'max_retries' is null (retry forever)"
    for name in _CODE_OPTIONS:
        if name in options:
            return f"option {name!r} cannot come from a message"
    return None


def _json_kinds(hint: Any) -> tuple[type, ...] | None:
    """The JSON value types an annotation admits; None when it is not one we check."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        parts = [_json_kinds(arg) for arg in typing.get_args(hint)]
        return None if any(p is None for p in parts) else tuple(k for p in parts for k in p or ())
    return _JSON_TYPES.get(origin or hint)


@functools.cache
def _signature(fn: Any) -> tuple[inspect.Signature, dict[str, tuple[tuple[type, ...], str]]]:
    """An actor function's signature and, per parameter, the JSON types its annotation admits."""
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: check the arity only
        hints = {}
    checks = {}
    for name, param in signature.parameters.items():
        kinds = _json_kinds(hints.get(name, Any))
        if kinds is not None and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            checks[name] = (kinds, getattr(hints[name], "__name__", None) or str(hints[name]))
    # Shown in log lines with resolved annotations (`task_id: str`, not `task_id: 'str'`).
    shown = signature.replace(
        parameters=[p.replace(annotation=hints.get(n, p.annotation)) for n, p in signature.parameters.items()],
        return_annotation=inspect.Signature.empty,
    )
    return shown, checks


def arguments_problem(actor: dramatiq.Actor, args: list[Any], kwargs: dict[str, Any]) -> str | None:
    """Why `actor(*args, **kwargs)` cannot work, or None."""
    try:
        signature, checks = _signature(actor.fn)
    except (TypeError, ValueError):  # a callable without a readable signature: leave it to the actor
        return None
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        return f"arguments do not fit {actor.actor_name}{signature}: {exc}"
    for name, value in bound.arguments.items():
        if name in checks and not isinstance(value, checks[name][0]):
            return f"argument {name!r} of {actor.actor_name} must be {checks[name][1]}, not {type(value).__name__}"
    return None
