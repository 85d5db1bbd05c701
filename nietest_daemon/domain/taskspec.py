"""The task format (README.md, "Tasks"): validation, normalisation and expansion into subtasks.

Pure Python, no I/O. `validate_task()` turns the front end's task JSON into a `Task` or raises
`TaskValidationError` naming the first offending field (`prompts[2].variable_values[0].value`).
`expand()` lazily yields one `SubtaskSpec` per combination of variable values, last dimension
fastest; `subtask_id()` derives a subtask's id from the task id and its coordinate.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from nietest_daemon.domain.images import MAX_TASK_SEED, ratio_to_size

__all__ = [
    "DEFAULT_MAX_SUBTASKS",
    "PARAMETERS",
    "PROMPT_TYPES",
    "Dimension",
    "Parameter",
    "SubtaskSpec",
    "Task",
    "TaskValidationError",
    "expand",
    "parse_task",
    "subtask_at",
    "subtask_id",
    "validate_task",
    "value_label",
]

#: Prompt types a (non-variable) prompt may have.
PROMPT_TYPES = ("freetext", "oc_vtoken_adaptor", "elementum")
#: The seven parameters, in dimension order.
PARAMETERS = ("ratio", "seed", "use_polish", "is_lumina", "lumina_model_name", "lumina_cfg", "lumina_step")
#: Value of a parameter the task omits (or gives as null).
PARAMETER_DEFAULTS: dict[str, Any] = {
    "ratio": "1:1",
    "seed": None,
    "use_polish": False,
    "is_lumina": False,
    "lumina_model_name": None,
    "lumina_cfg": None,
    "lumina_step": None,
}
#: `format` written into the normalised parameter when the task gives none.
PARAMETER_FORMATS = {
    "ratio": "string",
    "seed": "int",
    "use_polish": "bool",
    "is_lumina": "bool",
    "lumina_model_name": "string",
    "lumina_cfg": "float",
    "lumina_step": "int",
}
_NULLABLE = frozenset({"seed", "lumina_model_name", "lumina_cfg", "lumina_step"})

DEFAULT_MAX_SUBTASKS = 50_000
MAX_VARIABLE_VALUES = 1000
MAX_PROMPTS = 200
MAX_NAME_CHARS = 200  # task name, variable names and ids, character names, model names
MAX_TEXT_CHARS = 10_000  # freetext prompt value
MAX_URL_CHARS = 2048
MAX_TAG_CHARS = 64  # a parameter's `type` and `format`
MAX_PRIORITY = 100
MAX_RATIO_PART = 100
MAX_LUMINA_CFG = 100.0
MAX_LUMINA_STEP = 1000
MAX_WEIGHT = 100.0

_RATIO_STRICT = re.compile(r"[1-9][0-9]{0,2}:[1-9][0-9]{0,2}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_MISSING: Any = object()
#: Never in any string: lone surrogates, C0 controls but tab/LF/CR, DEL and the C1 controls.
_NOT_TEXT = re.compile("[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
#: Not in one-line fields either: tab, line breaks and the bidirectional formatting characters.
_LINE_BREAKS = frozenset("\t\n\r\u2028\u2029")
_NOT_LINE = re.compile("[\t\n\r\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


class TaskValidationError(ValueError):
    """A task is malformed; `field` is the path of the offending field, str() is `"<field>: <problem>"`."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


# --- normalised task ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameter:
    """One of the seven parameters, normalised: a fixed `value`, or a variable with `values`."""

    name: str
    value: Any = None
    is_variable: bool = False
    variable_id: str | None = None
    variable_name: str | None = None
    values: tuple[Any, ...] = ()
    format: str = ""  # informational, as the task gave it (or the parameter's usual one)

    def to_document(self) -> dict[str, Any]:
        """The parameter in the front end's shape (re-validates to the same parameter)."""
        fmt = self.format or PARAMETER_FORMATS[self.name]
        if not self.is_variable:
            return {"type": self.name, "value": self.value, "is_variable": False, "format": fmt}
        return {
            "type": self.name,
            "is_variable": True,
            "variable_id": self.variable_id,
            "variable_name": self.variable_name,
            "variable_values": list(self.values),
            "format": fmt,
        }


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

        The document is itself a valid task: `validate_task(task.to_document())` gives this task back.
        """
        doc: dict[str, Any] = {
            "name": self.name,
            "priority": self.priority,
            "prompts": [_copy_prompt(p) for p in self.prompts],
        }
        for param in self.parameters:
            doc[param.name] = param.to_document()
        doc["variables"] = self.variables()
        doc["variables_map"] = self.variables_map()
        doc["total_images"] = self.total_subtasks
        return doc

    @cached_property
    def _parameters_by_name(self) -> dict[str, Parameter]:
        return {p.name: p for p in self.parameters}

    @cached_property
    def _prompt_dimension(self) -> dict[int, Dimension]:
        return {d.prompt_index: d for d in self.dimensions if d.prompt_index is not None}

    @cached_property
    def _parameter_dimensions(self) -> tuple[Dimension, ...]:
        return tuple(d for d in self.dimensions if d.prompt_index is None)


@dataclass(frozen=True)
class SubtaskSpec:
    """One combination of variable values: everything a subtask needs to make its image."""

    variable_indices: list[int]
    prompts: list[dict[str, Any]]
    ratio: str
    width: int
    height: int
    seed: int | None  # None: choose a random seed when the job is created
    use_polish: bool
    is_lumina: bool
    lumina_model_name: str | None
    lumina_cfg: float | None
    lumina_step: int | None

    def subtask_id(self, task_id: str) -> str:
        """This subtask's id within the task `task_id`."""
        return subtask_id(task_id, self.variable_indices)

    def as_dict(self) -> dict[str, Any]:
        """The stored subtask fields this spec determines (fresh copies)."""
        return {
            "variable_indices": list(self.variable_indices),
            "prompts": [dict(p) for p in self.prompts],
            "ratio": self.ratio,
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "use_polish": self.use_polish,
            "is_lumina": self.is_lumina,
            "lumina_model_name": self.lumina_model_name,
            "lumina_cfg": self.lumina_cfg,
            "lumina_step": self.lumina_step,
        }


# --- primitive checks -----------------------------------------------------------------------------


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def _show(value: Any) -> str:
    """A short rendering of a scalar for messages."""
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if value is None or isinstance(value, bool | int | float):
        text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return _kind(value)


def _string(value: Any, path: str, *, max_chars: int, required: bool = False, multiline: bool = False) -> str:
    """A string field. Only free text (`multiline`) may hold tabs, line breaks and direction marks."""
    if not isinstance(value, str):
        raise TaskValidationError(path, f"must be a string, got {_kind(value)}")
    if len(value) > max_chars:
        raise TaskValidationError(path, f"is {len(value)} characters long, at most {max_chars} allowed")
    _text_characters(value, path, multiline=multiline)
    if required and not value.strip():
        raise TaskValidationError(path, "must not be empty")
    return value


def _text_characters(value: str, path: str, *, multiline: bool) -> None:
    """Refuse characters no field may hold (lone surrogates, control characters) and, outside free
    text, line breaks and bidirectional formatting characters.

    A lone surrogate (`"\\ud800"` in the JSON) is not Unicode text: it cannot be encoded as UTF-8, so
    the task could be neither stored nor sent. Control characters (NUL, ESC, ...) have no place in a
    prompt or a label and would reach terminals, logs and the Feishu cards as they are. Names, ids,
    uuids, urls and tags are one-line labels shown in notices and `nietest status`, where invisible
    direction overrides (U+202E ...) or marks would make one name look like another; free-text
    prompts may need them (right-to-left text), and may span lines.
    """
    bad = _NOT_TEXT.search(value) or (None if multiline else _NOT_LINE.search(value))
    if bad is None:
        return
    char, where = bad.group(), f"U+{ord(bad.group()):04X} at position {bad.start() + 1}"
    if "\ud800" <= char <= "\udfff":
        raise TaskValidationError(path, f"must be valid Unicode text, found a lone surrogate {where}")
    if char in _LINE_BREAKS:
        raise TaskValidationError(path, f"must be a single line, found a tab or line break {where}")
    if _NOT_TEXT.match(char):
        raise TaskValidationError(path, f"must not contain control characters, found {where}")
    raise TaskValidationError(path, f"must not contain bidirectional formatting characters, found {where}")


def _integer(value: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskValidationError(path, f"must be an integer, got {_kind(value)} {_show(value)}")
    if not lo <= value <= hi:
        raise TaskValidationError(path, f"must be between {lo} and {hi}, got {_show(value)}")
    return int(value)


def _number(value: Any, path: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TaskValidationError(path, f"must be a number, got {_kind(value)} {_show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise TaskValidationError(path, f"must be a finite number, got {value!r}")
    if not lo <= value <= hi:  # compared before float(): a huge int would overflow
        raise TaskValidationError(path, f"must be between {lo:g} and {hi:g}, got {_show(value)}")
    return float(value)


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise TaskValidationError(path, f"must be true or false, got {_kind(value)} {_show(value)}")
    return value


def _object(value: Any, path: str, shape: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TaskValidationError(path, f"must be an object {shape}, got {_kind(value)}")
    return value


def _flag(raw: Mapping[str, Any], path: str) -> bool:
    """`is_variable`: absent or null means false."""
    value = raw.get("is_variable")
    return False if value is None else _boolean(value, f"{path}.is_variable")


def _variable_header(raw: Mapping[str, Any], path: str) -> tuple[str, str, Sequence[Any]]:
    """`variable_id`, `variable_name` and the raw `variable_values` list of a variable."""
    vid = raw.get("variable_id")
    # An id the front end sent as a number: any integer it can represent exactly, like a seed.
    if isinstance(vid, int) and not isinstance(vid, bool) and 0 <= vid <= MAX_TASK_SEED:
        vid = str(vid)
    if vid is None:
        raise TaskValidationError(f"{path}.variable_id", "is required for a variable")
    vid = _string(vid, f"{path}.variable_id", max_chars=MAX_NAME_CHARS, required=True)
    vname = raw.get("variable_name")
    if vname is None:
        raise TaskValidationError(f"{path}.variable_name", "is required for a variable")
    vname = _string(vname, f"{path}.variable_name", max_chars=MAX_NAME_CHARS, required=True)
    values = raw.get("variable_values", _MISSING)
    vpath = f"{path}.variable_values"
    if values is _MISSING or values is None:
        raise TaskValidationError(vpath, "is required for a variable")
    if not isinstance(values, list | tuple):
        raise TaskValidationError(vpath, f"must be an array, got {_kind(values)}")
    if not values:
        raise TaskValidationError(vpath, "a variable needs at least one value")
    if len(values) > MAX_VARIABLE_VALUES:
        raise TaskValidationError(vpath, f"has {len(values)} values, at most {MAX_VARIABLE_VALUES} allowed")
    return vid, vname, values


def _no_stray_values(raw: Mapping[str, Any], path: str) -> None:
    """A non-variable must not carry values: the author most likely forgot `is_variable: true`."""
    values = raw.get("variable_values")
    if values is not None and not (isinstance(values, list | tuple) and not values):
        raise TaskValidationError(f"{path}.variable_values", "is given but is_variable is not true")


# --- parameters -----------------------------------------------------------------------------------


def _ratio(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise TaskValidationError(path, f'must be a ratio string like "16:9", got {_kind(value)} {_show(value)}')
    if not _RATIO_STRICT.fullmatch(value):
        raise TaskValidationError(path, f'must be a ratio "W:H" of whole numbers like "16:9", got {_show(value)}')
    a, b = (int(part) for part in value.split(":"))
    if a > MAX_RATIO_PART or b > MAX_RATIO_PART:
        raise TaskValidationError(path, f"each side of the ratio must be between 1 and {MAX_RATIO_PART}, got {value!r}")
    return value


def _seed(value: Any, path: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskValidationError(
            path, f"must be an integer or null (0/null: random), got {_kind(value)} {_show(value)}"
        )
    return _integer(value, path, 0, MAX_TASK_SEED)


def _model_name(value: Any, path: str) -> str | None:
    if value is None:
        return None
    name = _string(value, path, max_chars=MAX_NAME_CHARS)
    return name if name.strip() else None  # the front end sends "" for "no model"


def _cfg(value: Any, path: str) -> float | None:
    return None if value is None else _number(value, path, 0.0, MAX_LUMINA_CFG)


def _step(value: Any, path: str) -> int | None:
    return None if value is None else _integer(value, path, 1, MAX_LUMINA_STEP)


_PARAMETER_VALUE = {
    "ratio": _ratio,
    "seed": _seed,
    "use_polish": _boolean,
    "is_lumina": _boolean,
    "lumina_model_name": _model_name,
    "lumina_cfg": _cfg,
    "lumina_step": _step,
}


def _parameter(doc: Mapping[str, Any], name: str) -> Parameter:
    raw = doc.get(name)
    if raw is None:
        return Parameter(name, PARAMETER_DEFAULTS[name], format=PARAMETER_FORMATS[name])
    raw = _object(raw, name, "{type, value, is_variable, format}")
    for key in ("type", "format"):
        tag = raw.get(key)
        if tag is not None:
            _string(tag, f"{name}.{key}", max_chars=MAX_TAG_CHARS)
    fmt = raw.get("format") or PARAMETER_FORMATS[name]
    check = _PARAMETER_VALUE[name]
    if _flag(raw, name):
        vid, vname, values = _variable_header(raw, name)
        normalised = tuple(check(v, f"{name}.variable_values[{i}]") for i, v in enumerate(values))
        return Parameter(name, None, True, vid, vname, normalised, fmt)
    _no_stray_values(raw, name)
    if "value" not in raw:
        if name not in _NULLABLE:
            raise TaskValidationError(f"{name}.value", "is required")
        return Parameter(name, None, format=fmt)
    return Parameter(name, check(raw["value"], f"{name}.value"), format=fmt)


# --- prompts --------------------------------------------------------------------------------------


def _is_empty(prompt: Mapping[str, Any]) -> bool:
    """A prompt whose value is empty is dropped from the subtask."""
    return not str(prompt.get("value") or "").strip()


def _copy_prompt(prompt: Mapping[str, Any]) -> dict[str, Any]:
    copy = dict(prompt)
    if "variable_values" in copy:
        copy["variable_values"] = [dict(v) for v in copy["variable_values"]]
    return copy


def _fixed_prompt(raw: Mapping[str, Any], path: str, kind: str) -> dict[str, Any]:
    _no_stray_values(raw, path)
    weight = raw.get("weight")
    weight = 1.0 if weight is None else _number(weight, f"{path}.weight", -MAX_WEIGHT, MAX_WEIGHT)
    if "value" not in raw:
        raise TaskValidationError(f"{path}.value", "is required")
    value = raw["value"]
    value = "" if value is None else value
    if kind == "freetext":
        value = _string(value, f"{path}.value", max_chars=MAX_TEXT_CHARS, multiline=True)
        return {"type": kind, "value": value, "weight": weight}
    value = _string(value, f"{path}.value", max_chars=MAX_NAME_CHARS)
    uuid = raw.get("uuid")
    uuid = "" if uuid is None else _string(uuid, f"{path}.uuid", max_chars=MAX_NAME_CHARS)
    name = raw.get("name")
    name = "" if name is None else _string(name, f"{path}.name", max_chars=MAX_NAME_CHARS)
    img_url = raw.get("img_url")
    img_url = "" if img_url is None else _string(img_url, f"{path}.img_url", max_chars=MAX_URL_CHARS)
    if value.strip():  # an empty one is dropped at expansion; nothing else of it matters
        if not _UUID.fullmatch(value):
            raise TaskValidationError(f"{path}.value", f"must be the uuid of the {_noun(kind)}, got {_show(value)}")
        if uuid and uuid.lower() != value.lower():
            raise TaskValidationError(f"{path}.uuid", f"must equal value ({value}), got {_show(uuid)}")
        if not name.strip():
            raise TaskValidationError(f"{path}.name", f"is required for a {_noun(kind)}")
        uuid = value
    return {"type": kind, "value": value, "uuid": uuid, "weight": weight, "name": name, "img_url": img_url}


def _noun(kind: str) -> str:
    return "character" if kind == "oc_vtoken_adaptor" else "element"


def _prompt_type(raw: Mapping[str, Any], path: str) -> str:
    kind = raw.get("type")
    if kind is None:
        raise TaskValidationError(f"{path}.type", f"is required: one of {', '.join(PROMPT_TYPES)}")
    if not isinstance(kind, str):
        raise TaskValidationError(f"{path}.type", f"must be a string, got {_kind(kind)}")
    if kind not in PROMPT_TYPES:
        raise TaskValidationError(
            f"{path}.type", f"unknown prompt type {_show(kind)}: one of {', '.join(PROMPT_TYPES)}"
        )
    return kind


def _prompt(raw: Any, path: str) -> dict[str, Any]:
    raw = _object(raw, path, "{type, value, weight, ...}")
    kind = _prompt_type(raw, path)
    if not _flag(raw, path):
        return _fixed_prompt(raw, path, kind)
    vid, vname, values = _variable_header(raw, path)
    normalised = []
    for j, value in enumerate(values):
        vpath = f"{path}.variable_values[{j}]"
        value = _object(value, vpath, "{type, value, weight, ...}")
        value_kind = _prompt_type(value, vpath)
        if _flag(value, vpath):
            raise TaskValidationError(f"{vpath}.is_variable", "a variable's values cannot themselves be variables")
        normalised.append(_fixed_prompt(value, vpath, value_kind))
    return {
        "type": kind,
        "is_variable": True,
        "variable_id": vid,
        "variable_name": vname,
        "variable_values": normalised,
    }


def _prompts(doc: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    raw = doc.get("prompts", _MISSING)
    if raw is _MISSING or raw is None:
        raise TaskValidationError("prompts", "is required")
    if not isinstance(raw, list | tuple):
        raise TaskValidationError("prompts", f"must be an array of prompts, got {_kind(raw)}")
    if not raw:
        raise TaskValidationError("prompts", "must contain at least one prompt")
    if len(raw) > MAX_PROMPTS:
        raise TaskValidationError("prompts", f"has {len(raw)} prompts, at most {MAX_PROMPTS} allowed")
    prompts = tuple(_prompt(p, f"prompts[{i}]") for i, p in enumerate(raw))
    fixed = [p for p in prompts if not p.get("is_variable")]
    variable = [p for p in prompts if p.get("is_variable")]
    if not any(not _is_empty(p) for p in fixed):
        # Some subtask would have no prompt at all iff every variable prompt can also be empty.
        if not variable:
            raise TaskValidationError("prompts", "every prompt is empty")
        if all(any(_is_empty(v) for v in p["variable_values"]) for p in variable):
            raise TaskValidationError(
                "prompts", "some combinations have no non-empty prompt (every prompt is empty or may be empty)"
            )
    return prompts


# --- the task -------------------------------------------------------------------------------------


def validate_task(doc: object, *, max_subtasks: int = DEFAULT_MAX_SUBTASKS) -> Task:
    """Validate and normalise a task document; raise TaskValidationError naming the bad field."""
    if isinstance(max_subtasks, bool) or not isinstance(max_subtasks, int) or max_subtasks < 1:
        raise ValueError(f"max_subtasks must be a positive integer, got {max_subtasks!r}")
    if not isinstance(doc, Mapping):
        raise TaskValidationError("task", f"must be a JSON object, got {_kind(doc)}")
    if "name" not in doc or doc["name"] is None:
        raise TaskValidationError("name", "is required")
    name = _string(doc["name"], "name", max_chars=MAX_NAME_CHARS, required=True).strip()
    priority = doc.get("priority")
    priority = 1 if priority is None else _integer(priority, "priority", 0, MAX_PRIORITY)

    prompts = _prompts(doc)
    parameters = tuple(_parameter(doc, name) for name in PARAMETERS)

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
    return Task(name, priority, prompts, parameters, tuple(dimensions))


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


# --- expansion ------------------------------------------------------------------------------------


def subtask_id(task_id: str, variable_indices: Sequence[int]) -> str:
    """Deterministic id of the subtask at `variable_indices`: `"<task_id>:1.0.2"`, `"<task_id>:-"` with no variables.

    Injective for task ids without ":" (those are refused), so no two coordinates of any tasks share an id.
    """
    if not isinstance(task_id, str) or not task_id or ":" in task_id:
        raise ValueError(f"task id must be a non-empty string without ':', got {task_id!r}")
    if not variable_indices:
        return f"{task_id}:-"
    return f"{task_id}:" + ".".join(str(int(i)) for i in variable_indices)


def subtask_at(task: Task, variable_indices: Sequence[int]) -> SubtaskSpec:
    """The subtask at one coordinate (ValueError when the coordinate is not in the task)."""
    indices = list(variable_indices)
    if len(indices) != len(task.dimensions):
        raise ValueError(f"the task has {len(task.dimensions)} dimensions, got {len(indices)} indices")
    for dim, i in zip(task.dimensions, indices, strict=True):
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < dim.size:
            raise ValueError(f"index {i!r} out of range for dimension {dim.index} of size {dim.size}")
    return _build(task, indices)


def expand(task: Task) -> Iterator[SubtaskSpec]:
    """Yield every subtask, the Cartesian product of the dimensions, last dimension fastest.

    A generator: one spec at a time. A task without variables yields exactly one, with `[]`.
    """
    for combination in itertools.product(*(range(size) for size in task.sizes)):
        yield _build(task, list(combination))


def _build(task: Task, indices: list[int]) -> SubtaskSpec:
    by_prompt = task._prompt_dimension
    prompts = []
    for i, prompt in enumerate(task.prompts):
        dim = by_prompt.get(i)
        chosen = dim.values[indices[dim.index]] if dim is not None else prompt
        if not _is_empty(chosen):
            prompts.append(dict(chosen))
    values = {p.name: p.value for p in task.parameters}
    for dim in task._parameter_dimensions:
        values[dim.variable_type] = dim.values[indices[dim.index]]
    width, height = ratio_to_size(values["ratio"])
    return SubtaskSpec(
        variable_indices=indices,
        prompts=prompts,
        ratio=values["ratio"],
        width=width,
        height=height,
        seed=values["seed"] or None,
        use_polish=values["use_polish"],
        is_lumina=values["is_lumina"],
        lumina_model_name=values["lumina_model_name"],
        lumina_cfg=values["lumina_cfg"],
        lumina_step=values["lumina_step"],
    )
