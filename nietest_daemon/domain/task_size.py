"""The size limit of a stored task: what keeps a valid task storable in every store.

A task's stored document (`Task.to_document()`) may be at most `MAX_TASK_BYTES` as compact UTF-8
JSON. Why 8 MiB: MongoDB refuses a document over 16 MiB of BSON, and the limit must hold in every
store, so that a task SQLite takes MongoDB takes too. BSON and compact JSON keep text as the same
UTF-8 bytes (CJK text is 3 bytes a character in both: the limit counts bytes, not characters); BSON
spends a few more bytes than JSON on each value (a type, the key, a length), but a task holds at
most a few thousand values (1,000 a variable, 200 prompts, a product of at most 50,000), so tens of
KB more at worst; and the store adds its own fields (status, counters, times, an error of at most
2,000 characters). Half of MongoDB's limit covers all of that many times over, and is far above a
real campaign's task (KBs; the largest the task format allows in plain text would be some 20 MB).

The fields nietest does not use (`Task.extra`) escape that reasoning: they may hold millions of
small values, and BSON spends up to 15 bytes on a `0` that JSON writes in 2 (a type, its index as
a key, 4 bytes of int32). So the limit counts `extra` at its BSON size (`bson_bytes`) where that is
the bigger: what the limit counts is then at least what each store keeps, give or take the tens of
KB above.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from nietest_daemon.domain.task_fields import TaskValidationError, field_path

if TYPE_CHECKING:
    from nietest_daemon.domain.taskspec import Task

#: The largest stored task document, as compact UTF-8 JSON.
MAX_TASK_BYTES = 8 * 1024 * 1024


def json_bytes(value: Any) -> int:
    """The size of `value` as compact UTF-8 JSON (how the SQLite store writes documents)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def bson_bytes(value: Any) -> int:
    """The size of `value` as BSON: a JSON value's (`None`, bool, int within 64 bits, float, str,
    list, mapping with str keys), a mapping's or list's as a BSON document or array."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return 4 if -(2**31) <= value < 2**31 else 8
    if isinstance(value, float):
        return 8
    if isinstance(value, str):
        return 4 + len(value.encode("utf-8")) + 1  # length, bytes, NUL
    if isinstance(value, Mapping):
        return _bson_document(value.items())
    return _bson_document((str(i), v) for i, v in enumerate(value))


def _bson_document(items: Iterable[tuple[str, Any]]) -> int:
    # length, then per element a type byte, the key and its NUL, the value; then a NUL
    return 4 + sum(1 + len(key.encode("utf-8")) + 1 + bson_bytes(value) for key, value in items) + 1


def _extra_bytes(value: Any) -> int:
    """What the limit counts of an unknown field's value: the bigger of its JSON and BSON sizes."""
    return max(json_bytes(value), bson_bytes(value))


def stored_bytes(task: Task) -> int:
    """What the limit counts: the stored document's compact UTF-8 JSON, its `extra` at its BSON
    size when that is the bigger."""
    size = json_bytes(task.to_document())
    if task.extra:
        size += max(0, bson_bytes(task.extra) - json_bytes(task.extra))
    return size


def _parts(task: Task) -> Iterator[tuple[str, int]]:
    """The fields of a task's input that its stored document holds, by their path in the task
    file, with their size: each variable's values (stored once, in `variables_map`), each fixed
    prompt and parameter, each field nietest does not use."""
    yield "name", json_bytes(task.name)
    for i, prompt in enumerate(task.prompts):
        if prompt.get("is_variable"):
            yield f"prompts[{i}].variable_values", json_bytes(prompt["variable_values"])
        else:
            yield f"prompts[{i}]", json_bytes(prompt)
    for param in task.parameters:
        if param.is_variable:
            yield f"{param.name}.variable_values", json_bytes(list(param.values))
        else:
            yield param.name, json_bytes(param.value)
    for key, value in task.extra.items():
        yield field_path("", key), _extra_bytes(value)


def _mib(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MiB"


def check_stored_size(task: Task, max_bytes: int = MAX_TASK_BYTES) -> None:
    """TaskValidationError, naming the task's biggest field, when its stored document would be over
    `max_bytes` (`MAX_TASK_BYTES`; `stored_bytes`)."""
    size = stored_bytes(task)
    if size <= max_bytes:
        return
    field, part = max(_parts(task), key=lambda item: item[1])
    counted = (
        "UTF-8 JSON"
        if size == json_bytes(task.to_document())
        else "UTF-8 JSON, the fields nietest does not use counted as BSON"
    )
    raise TaskValidationError(
        field,
        f"the task would be stored as {_mib(size)} ({size} bytes of {counted}), over the limit of"
        f" {_mib(max_bytes)}; this field is the biggest part of it, {_mib(part)}",
    )
