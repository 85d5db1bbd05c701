"""The task format (README.md, "Tasks"; docs/tasks.md): validation, normalisation, the stored form
and expansion into subtasks.

Pure Python, no I/O. `validate_task()` turns the front end's task JSON into a `Task` or raises
`TaskValidationError` naming the first offending field (`prompts[2].variable_values[0].value`);
the checks of single fields are in domain/task_fields.py, the size limit of the stored task in
domain/task_size.py. `Task.to_document()` is what a store keeps (each variable's values once, in
`variables_map`), `Task.from_document()` reads it back. `expand()` (domain/expansion.py) lazily
yields one `SubtaskSpec` per combination of variable values, last dimension fastest; `subtask_id()`
derives a subtask's id from the task id and its coordinate. The names of those modules are
importable from here.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from nietest_daemon.domain.expansion import SubtaskSpec, expand, subtask_at, subtask_id
from nietest_daemon.domain.task_fields import (
    DEFAULT_MAX_SUBTASKS,
    INPUT_FIELDS,
    MAX_EXTRA_DEPTH,
    MAX_LUMINA_CFG,
    MAX_LUMINA_STEP,
    MAX_NAME_CHARS,
    MAX_PRIORITY,
    MAX_PROMPTS,
    MAX_RATIO_PART,
    MAX_TAG_CHARS,
    MAX_TEXT_CHARS,
    MAX_URL_CHARS,
    MAX_VARIABLE_VALUES,
    MAX_WEIGHT,
    PARAMETER_DEFAULTS,
    PARAMETER_FORMATS,
    PARAMETERS,
    PROMPT_TYPES,
    Parameter,
    TaskValidationError,
    check_extra,
    check_integer,
    check_parameter,
    check_prompts,
    check_string,
    copy_prompt,
    kind_of,
)
from nietest_daemon.domain.task_size import MAX_TASK_BYTES, check_stored_size

__all__ = [
    "DEFAULT_MAX_SUBTASKS",
    "INPUT_FIELDS",
    "MAX_EXTRA_DEPTH",
    "MAX_LUMINA_CFG",
    "MAX_LUMINA_STEP",
    "MAX_NAME_CHARS",
    "MAX_PRIORITY",
    "MAX_PROMPTS",
    "MAX_RATIO_PART",
    "MAX_TAG_CHARS",
    "MAX_TASK_BYTES",
    "MAX_TEXT_CHARS",
    "MAX_URL_CHARS",
    "MAX_VARIABLE_VALUES",
    "MAX_WEIGHT",
    "PARAMETERS",
    "PARAMETER_DEFAULTS",
    "PARAMETER_FORMATS",
    "PROMPT_TYPES",
    "Dimension",
    "Parameter",
    "SubtaskSpec",
    "Task",
    "TaskValidationError",
    "expand",
    "number_label",
    "parse_task",
    "subtask_at",
    "subtask_id",
    "validate_task",
    "value_label",
]


# --- normalised task ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One variable of the task: an axis of the Cartesian product."""

    index: int
    variable_id: str
    variable_name: str
    variable_type: str  # "prompt" or the parameter's name
    values: tuple[Any, ...]  # prompt dicts for a prompt variable, plain values for a parameter
    field: str  # where it is in the task: "prompts[1]" or "ratio"
    prompt_index: int | None = None

    @property
    def size(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class Task:
    """A validated, normalised task. Build it with `validate_task()`."""

    name: str
    priority: int
    prompts: tuple[dict[str, Any], ...]
    parameters: tuple[Parameter, ...]  # in PARAMETERS order
    dimensions: tuple[Dimension, ...]
    #: The top-level fields of the task's JSON that nietest does not use (`user_id`, whatever the
    #: front end adds), kept with the task as they were given (task_fields.check_extra).
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of values of each dimension."""
        return tuple(d.size for d in self.dimensions)

    @property
    def total_subtasks(self) -> int:
        """Product of the dimension sizes; 1 when the task has no variables."""
        return math.prod(self.sizes)

    def parameter(self, name: str) -> Parameter:
        """The named parameter (KeyError for an unknown name)."""
        return self._parameters_by_name[name]

    def variables(self) -> list[dict[str, Any]]:
        """One entry per dimension, without the values: `{dimension, variable_id, variable_name, ...}`."""
        return [
            {
                "dimension": d.index,
                "variable_id": d.variable_id,
                "variable_name": d.variable_name,
                "variable_type": d.variable_type,
                "size": d.size,
            }
            for d in self.dimensions
        ]

    def variables_map(self) -> dict[str, dict[str, Any]]:
        """`{"0": {variable_id, variable_name, variable_type, values}, ...}` keyed by dimension."""
        return {
            str(d.index): {
                "variable_id": d.variable_id,
                "variable_name": d.variable_name,
                "variable_type": d.variable_type,
                "values": [dict(v) if isinstance(v, dict) else v for v in d.values],
            }
            for d in self.dimensions
        }

    def to_document(self) -> dict[str, Any]:
        """The stored task fields that come from the input; JSON-ready, fresh copies.

        Each variable's values are stored once, in `variables_map`: a variable prompt or parameter
        keeps its `variable_id` and `variable_name`, not its `variable_values`. `Task.from_document`
        reads the document back into this task.
        """
        doc: dict[str, Any] = {
            "name": self.name,
            "priority": self.priority,
            "prompts": [_stored_prompt(p) for p in self.prompts],
        }
        for param in self.parameters:
            doc[param.name] = param.to_document(values=False)
        doc["variables"] = self.variables()
        doc["variables_map"] = self.variables_map()
        doc["total_images"] = self.total_subtasks
        doc["extra"] = copy.deepcopy(dict(self.extra))
        return doc

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Task:
        """The task a stored document holds: `to_document`'s, or an earlier version's, which kept
        each variable's values twice (in the variable and in `variables_map`). TaskValidationError
        when it is no valid task. A stored task was accepted once: its size is not judged again, and
        its `extra` is the stored one (none before owners existed), not the document's other fields."""
        stored = doc.get("extra")
        extra = copy.deepcopy(dict(stored)) if isinstance(stored, Mapping) else {}
        return _validate(_with_values(doc), DEFAULT_MAX_SUBTASKS, None, extra)

    @cached_property
    def _parameters_by_name(self) -> dict[str, Parameter]:
        return {p.name: p for p in self.parameters}

    @cached_property
    def prompt_dimensions(self) -> dict[int, Dimension]:
        """The dimension of each variable prompt, by the prompt's index."""
        return {d.prompt_index: d for d in self.dimensions if d.prompt_index is not None}

    @cached_property
    def parameter_dimensions(self) -> tuple[Dimension, ...]:
        """The dimensions of the variable parameters, in dimension order."""
        return tuple(d for d in self.dimensions if d.prompt_index is None)


def _stored_prompt(prompt: Mapping[str, Any]) -> dict[str, Any]:
    """A prompt as the stored task keeps it: a variable prompt without its values."""
    if prompt.get("is_variable"):
        return {key: value for key, value in prompt.items() if key != "variable_values"}
    return copy_prompt(prompt)


def _with_values(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """A stored task document with each variable's `variable_values` back in place, taken from
    `variables_map` by the variable's id and type (a document that has them keeps its own)."""
    vmap = doc.get("variables_map")
    if not isinstance(vmap, Mapping):
        return doc
    entries = {(e.get("variable_id"), e.get("variable_type")): e for e in vmap.values() if isinstance(e, Mapping)}

    def filled(raw: Any, variable_type: str) -> Any:
        if not isinstance(raw, Mapping) or not raw.get("is_variable") or "variable_values" in raw:
            return raw
        entry = entries.get((raw.get("variable_id"), variable_type))
        return raw if entry is None or "values" not in entry else {**raw, "variable_values": entry["values"]}

    out = dict(doc)
    if isinstance(doc.get("prompts"), list):
        out["prompts"] = [filled(p, "prompt") for p in doc["prompts"]]
    for name in PARAMETERS:
        if name in doc:
            out[name] = filled(doc[name], name)
    return out


def validate_task(
    doc: object, *, max_subtasks: int = DEFAULT_MAX_SUBTASKS, max_bytes: int | None = MAX_TASK_BYTES
) -> Task:
    """Validate and normalise a task document; raise TaskValidationError naming the bad field.

    The task may expand to at most `max_subtasks` subtasks, and its stored document may be at most
    `max_bytes` (domain/task_size.py; None: not checked). The fields other than `INPUT_FIELDS` are
    kept as `Task.extra` (task_fields.check_extra)."""
    return _validate(doc, max_subtasks, max_bytes, None)


def _validate(doc: object, max_subtasks: int, max_bytes: int | None, extra: Mapping[str, Any] | None) -> Task:
    """`validate_task`, with the task's `extra` given (a stored task's), or None: the document's
    fields other than `INPUT_FIELDS`."""
    if isinstance(max_subtasks, bool) or not isinstance(max_subtasks, int) or max_subtasks < 1:
        raise ValueError(f"max_subtasks must be a positive integer, got {max_subtasks!r}")
    if not isinstance(doc, Mapping):
        raise TaskValidationError("task", f"must be a JSON object, got {kind_of(doc)}")
    if "name" not in doc or doc["name"] is None:
        raise TaskValidationError("name", "is required")
    name = check_string(doc["name"], "name", max_chars=MAX_NAME_CHARS, required=True).strip()
    priority = doc.get("priority")
    priority = 1 if priority is None else check_integer(priority, "priority", 0, MAX_PRIORITY)

    prompts = check_prompts(doc)
    parameters = tuple(check_parameter(doc, name) for name in PARAMETERS)

    dimensions: list[Dimension] = []
    seen: dict[str, str] = {}

    def add(field: str, vid: str, vname: str, vtype: str, values: Sequence[Any], prompt_index: int | None) -> None:
        if vid in seen:
            raise TaskValidationError(f"{field}.variable_id", f"{vid!r} is already the variable_id of {seen[vid]}")
        seen[vid] = field
        dimensions.append(Dimension(len(dimensions), vid, vname, vtype, tuple(values), field, prompt_index))

    for i, p in enumerate(prompts):
        if p.get("is_variable"):
            add(f"prompts[{i}]", p["variable_id"], p["variable_name"], "prompt", p["variable_values"], i)
    for param in parameters:
        if param.is_variable:
            assert param.variable_id is not None and param.variable_name is not None
            add(param.name, param.variable_id, param.variable_name, param.name, param.values, None)

    total = 1
    for dim in dimensions:
        total *= dim.size
        if total > max_subtasks:
            sizes = " x ".join(str(d.size) for d in dimensions)
            everything = math.prod(d.size for d in dimensions)
            raise TaskValidationError(
                f"{dim.field}.variable_values",
                f"the task would expand to {everything} subtasks ({sizes}), over the cap of {max_subtasks}",
            )
    task = Task(name, priority, prompts, parameters, tuple(dimensions), check_extra(doc) if extra is None else extra)
    if max_bytes is not None:
        check_stored_size(task, max_bytes)
    return task


def parse_task(text: str | bytes, *, max_subtasks: int = DEFAULT_MAX_SUBTASKS) -> Task:
    """Parse task JSON and validate it; every failure is a TaskValidationError.

    NaN/Infinity literals parse to floats and are then refused by the field that holds them.
    Bytes must be UTF-8 (RFC 8259; a leading BOM is allowed): `json.loads` alone would also take
    UTF-16/32 and let UTF-8-encoded surrogates through.
    """
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise TaskValidationError(
                "task", f"is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start} ({exc.reason})"
            ) from None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TaskValidationError("task", f"is not valid JSON: {exc}") from None
    return validate_task(doc, max_subtasks=max_subtasks)


# --- showing values ------------------------------------------------------------------------------


def number_label(value: int | float) -> str:
    """A number in full: an int as it is, a float as the shortest text that reads back as the same
    float (`repr`), so that two different values never share a label; a whole float without its
    `.0` (7.0 reads `7`, as the int 7 it equals)."""
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def value_label(value: Any) -> str:
    """A variable's value (or a fixed parameter's, or a prompt) as people read it: a prompt's text,
    a character's or element's name, `true` / `false`, empty for none, a number in full
    (`number_label`). Not escaped."""
    if isinstance(value, Mapping):
        text = value.get("value") if value.get("type", "freetext") == "freetext" else value.get("name")
        label = str(text or value.get("value") or "")
        weight = value.get("weight")
        if isinstance(weight, int | float) and not isinstance(weight, bool) and weight != 1:
            label = f"{label} (weight {number_label(weight)})"
        return label
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, float):
        return number_label(value)
    return str(value)
