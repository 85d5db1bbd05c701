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
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from nietest_daemon.domain.task_fields import TaskValidationError

if TYPE_CHECKING:
    from nietest_daemon.domain.taskspec import Task

#: The largest stored task document, as compact UTF-8 JSON.
MAX_TASK_BYTES = 8 * 1024 * 1024


def json_bytes(value: Any) -> int:
    """The size of `value` as compact UTF-8 JSON (how the SQLite store writes documents)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def _parts(task: Task) -> Iterator[tuple[str, Any]]:
    """The fields of a task's input that its stored document holds, by their path in the task
    file: each variable's values (stored once, in `variables_map`), each fixed prompt and parameter."""
    yield "name", task.name
    for i, prompt in enumerate(task.prompts):
        if prompt.get("is_variable"):
            yield f"prompts[{i}].variable_values", prompt["variable_values"]
        else:
            yield f"prompts[{i}]", prompt
    for param in task.parameters:
        if param.is_variable:
            yield f"{param.name}.variable_values", list(param.values)
        else:
            yield param.name, param.value


def _mib(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MiB"


def check_stored_size(task: Task, max_bytes: int = MAX_TASK_BYTES) -> None:
    """TaskValidationError, naming the task's biggest field, when its stored document would be over
    `max_bytes` (`MAX_TASK_BYTES`)."""
    size = json_bytes(task.to_document())
    if size <= max_bytes:
        return
    field, part = max(((path, json_bytes(value)) for path, value in _parts(task)), key=lambda item: item[1])
    raise TaskValidationError(
        field,
        f"the task would be stored as {_mib(size)} ({size} bytes of UTF-8 JSON), over the limit of"
        f" {_mib(max_bytes)}; this field is the biggest part of it, {_mib(part)}",
    )
