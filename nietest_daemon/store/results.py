"""What `nietest report` and `nietest export` share: a stored task read as a grid of variables.

A task's dimensions come from its stored document through `taskspec.Task.from_document` (this
version's documents, each variable's values in `variables_map`, and earlier ones, which kept them
twice); a subtask's place is its `variable_indices`, one index per dimension. Subtasks are read
with `Store.iter_subtasks`, a page at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nietest_daemon.domain import taskspec
from nietest_daemon.domain.taskspec import Dimension, Task
from nietest_daemon.store import Store, as_utc
from nietest_daemon.store.base import iso_text


class ResultsError(Exception):
    """The task cannot be shown as asked; str() is the message for the command line."""


@dataclass(frozen=True)
class TaskView:
    """A stored task and its validated form."""

    doc: dict[str, Any]
    task: Task

    @property
    def id(self) -> str:
        return str(self.doc["id"])

    @property
    def dimensions(self) -> tuple[Dimension, ...]:
        return self.task.dimensions


def load_task(store: Store, task_id: str) -> TaskView:
    doc = store.get_task(task_id)
    if doc is None:
        raise ResultsError(f"no task {task_id}")
    try:
        task = taskspec.Task.from_document(doc)
    except taskspec.TaskValidationError as exc:
        raise ResultsError(f"task {task_id}: its stored document is not a valid task ({exc})") from None
    return TaskView(doc, task)


def describe(dim: Dimension) -> str:
    return f"{dim.variable_name!r} (id {dim.variable_id}, {dim.variable_type}, {dim.size} values)"


def find_dimension(dimensions: Sequence[Dimension], name: str, option: str) -> Dimension:
    """The dimension `name` designates: its variable name, its variable id, or its index."""
    rules: tuple[Callable[[Dimension], bool], ...] = (
        lambda d: d.variable_name == name,
        lambda d: d.variable_id == name,
        lambda d: name.isdigit() and d.index == int(name),
    )
    for matches in rules:
        found = [d for d in dimensions if matches(d)]
        if len(found) == 1:
            return found[0]
    if not dimensions:
        raise ResultsError(f"{option} {name!r}: this task has no variables")
    valid = "; ".join(describe(d) for d in dimensions)
    raise ResultsError(f"{option}: unknown variable {name!r}; this task's variables are: {valid}")


def column_names(dimensions: Sequence[Dimension], fixed: Sequence[str]) -> list[str]:
    """One column per dimension, named after its variable; a name met twice (or one of `fixed`)
    gets its variable id added."""
    taken = set(fixed)
    names = []
    for dim in dimensions:
        name = dim.variable_name
        if name in taken or sum(d.variable_name == name for d in dimensions) > 1:
            name = f"{name} ({dim.variable_id})"
        taken.add(name)
        names.append(name)
    return names


def labels(dim: Dimension) -> list[str]:
    """The dimension's values as people read them."""
    return [taskspec.value_label(v) for v in dim.values]


def iso(value: Any) -> str | None:
    return iso_text(value) if isinstance(value, datetime) else None


def seconds_between(start: Any, end: Any) -> float | None:
    if isinstance(start, datetime) and isinstance(end, datetime):
        return round((as_utc(end) - as_utc(start)).total_seconds(), 3)
    return None


def history(sub: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The subtask's earlier attempts (oldest first): what each retry left of the one before."""
    found = sub.get("error_history")
    return [h for h in found if isinstance(h, Mapping)] if isinstance(found, list) else []


def indices_of(sub: Mapping[str, Any], dimensions: Sequence[Dimension]) -> tuple[int, ...] | None:
    """The subtask's coordinate, or None when it does not fit the task's dimensions."""
    raw = sub.get("variable_indices") or []
    if len(raw) != len(dimensions):
        return None
    try:
        coordinate = tuple(int(i) for i in raw)
    except (TypeError, ValueError):
        return None
    if any(not 0 <= i < d.size for i, d in zip(coordinate, dimensions, strict=True)):
        return None
    return coordinate
