"""The task format's fields (README.md, "Tasks"; docs/tasks.md): the limits, and the check of each
field, which normalises it or raises `TaskValidationError` naming it (`prompts[2].variable_values[0].value`).

Pure Python, no I/O. `taskspec.validate_task` puts the checked fields together into a `Task`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nietest_daemon.domain.images import MAX_TASK_SEED

#: Prompt types a (non-variable) prompt may have.
PROMPT_TYPES = ("freetext", "oc_vtoken_adaptor", "elementum")
#: The seven parameters, in dimension order.
PARAMETERS = ("ratio", "seed", "use_polish", "is_lumina", "lumina_model_name", "lumina_cfg", "lumina_step")
#: The top-level fields of a task's JSON that nietest uses; any other is kept as it is (`check_extra`).
INPUT_FIELDS: tuple[str, ...] = ("name", "priority", "prompts", *PARAMETERS)
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
#: The integers an unknown field may hold: MongoDB stores none outside signed 64 bits.
MIN_STORED_INT, MAX_STORED_INT = -(2**63), 2**63 - 1
#: How deeply objects and arrays may nest in an unknown field's value.
MAX_EXTRA_DEPTH = 32

_RATIO_STRICT = re.compile(r"[1-9][0-9]{0,2}:[1-9][0-9]{0,2}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_MISSING: Any = object()
#: Never in any string: lone surrogates, C0 controls but tab/LF/CR, DEL and the C1 controls.
_NOT_TEXT = re.compile("[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
#: Not in one-line fields either: tab, line breaks and the bidirectional formatting characters.
_LINE_BREAKS = frozenset("\t\n\r\u2028\u2029")
_NOT_LINE = re.compile("[\t\n\r\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


class TaskValidationError(ValueError):
    """A task is malformed; `field` is the path of the offending field, str() is `"<field>: <problem>"`."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


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

    def to_document(self, *, values: bool = True) -> dict[str, Any]:
        """The parameter in the front end's shape (re-validates to the same parameter); a variable's
        `variable_values` left out unless `values` (the stored task keeps them in `variables_map`)."""
        fmt = self.format or PARAMETER_FORMATS[self.name]
        if not self.is_variable:
            return {"type": self.name, "value": self.value, "is_variable": False, "format": fmt}
        doc: dict[str, Any] = {
            "type": self.name,
            "is_variable": True,
            "variable_id": self.variable_id,
            "variable_name": self.variable_name,
        }
        if values:
            doc["variable_values"] = list(self.values)
        doc["format"] = fmt
        return doc


# --- primitive checks -----------------------------------------------------------------------------


def kind_of(value: Any) -> str:
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
    return kind_of(value)


def check_string(value: Any, path: str, *, max_chars: int, required: bool = False, multiline: bool = False) -> str:
    """A string field. Only free text (`multiline`) may hold tabs, line breaks and direction marks."""
    if not isinstance(value, str):
        raise TaskValidationError(path, f"must be a string, got {kind_of(value)}")
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


def check_integer(value: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskValidationError(path, f"must be an integer, got {kind_of(value)} {_show(value)}")
    if not lo <= value <= hi:
        raise TaskValidationError(path, f"must be between {lo} and {hi}, got {_show(value)}")
    return int(value)


def _number(value: Any, path: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TaskValidationError(path, f"must be a number, got {kind_of(value)} {_show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise TaskValidationError(path, f"must be a finite number, got {value!r}")
    if not lo <= value <= hi:  # compared before float(): a huge int would overflow
        raise TaskValidationError(path, f"must be between {lo:g} and {hi:g}, got {_show(value)}")
    return float(value)


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise TaskValidationError(path, f"must be true or false, got {kind_of(value)} {_show(value)}")
    return value


def _object(value: Any, path: str, shape: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TaskValidationError(path, f"must be an object {shape}, got {kind_of(value)}")
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
    vid = check_string(vid, f"{path}.variable_id", max_chars=MAX_NAME_CHARS, required=True)
    vname = raw.get("variable_name")
    if vname is None:
        raise TaskValidationError(f"{path}.variable_name", "is required for a variable")
    vname = check_string(vname, f"{path}.variable_name", max_chars=MAX_NAME_CHARS, required=True)
    values = raw.get("variable_values", _MISSING)
    vpath = f"{path}.variable_values"
    if values is _MISSING or values is None:
        raise TaskValidationError(vpath, "is required for a variable")
    if not isinstance(values, list | tuple):
        raise TaskValidationError(vpath, f"must be an array, got {kind_of(values)}")
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
        raise TaskValidationError(path, f'must be a ratio string like "16:9", got {kind_of(value)} {_show(value)}')
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
            path, f"must be an integer or null (0/null: random), got {kind_of(value)} {_show(value)}"
        )
    return check_integer(value, path, 0, MAX_TASK_SEED)


def _model_name(value: Any, path: str) -> str | None:
    if value is None:
        return None
    name = check_string(value, path, max_chars=MAX_NAME_CHARS)
    return name if name.strip() else None  # the front end sends "" for "no model"


def _cfg(value: Any, path: str) -> float | None:
    return None if value is None else _number(value, path, 0.0, MAX_LUMINA_CFG)


def _step(value: Any, path: str) -> int | None:
    return None if value is None else check_integer(value, path, 1, MAX_LUMINA_STEP)


_PARAMETER_VALUE = {
    "ratio": _ratio,
    "seed": _seed,
    "use_polish": _boolean,
    "is_lumina": _boolean,
    "lumina_model_name": _model_name,
    "lumina_cfg": _cfg,
    "lumina_step": _step,
}


def check_parameter(doc: Mapping[str, Any], name: str) -> Parameter:
    raw = doc.get(name)
    if raw is None:
        return Parameter(name, PARAMETER_DEFAULTS[name], format=PARAMETER_FORMATS[name])
    raw = _object(raw, name, "{type, value, is_variable, format}")
    for key in ("type", "format"):
        tag = raw.get(key)
        if tag is not None:
            check_string(tag, f"{name}.{key}", max_chars=MAX_TAG_CHARS)
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


def is_empty(prompt: Mapping[str, Any]) -> bool:
    """A prompt whose value is empty is dropped from the subtask."""
    return not str(prompt.get("value") or "").strip()


def copy_prompt(prompt: Mapping[str, Any]) -> dict[str, Any]:
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
        value = check_string(value, f"{path}.value", max_chars=MAX_TEXT_CHARS, multiline=True)
        return {"type": kind, "value": value, "weight": weight}
    value = check_string(value, f"{path}.value", max_chars=MAX_NAME_CHARS)
    uuid = raw.get("uuid")
    uuid = "" if uuid is None else check_string(uuid, f"{path}.uuid", max_chars=MAX_NAME_CHARS)
    name = raw.get("name")
    name = "" if name is None else check_string(name, f"{path}.name", max_chars=MAX_NAME_CHARS)
    img_url = raw.get("img_url")
    img_url = "" if img_url is None else check_string(img_url, f"{path}.img_url", max_chars=MAX_URL_CHARS)
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
        raise TaskValidationError(f"{path}.type", f"must be a string, got {kind_of(kind)}")
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


def check_prompts(doc: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    raw = doc.get("prompts", _MISSING)
    if raw is _MISSING or raw is None:
        raise TaskValidationError("prompts", "is required")
    if not isinstance(raw, list | tuple):
        raise TaskValidationError("prompts", f"must be an array of prompts, got {kind_of(raw)}")
    if not raw:
        raise TaskValidationError("prompts", "must contain at least one prompt")
    if len(raw) > MAX_PROMPTS:
        raise TaskValidationError("prompts", f"has {len(raw)} prompts, at most {MAX_PROMPTS} allowed")
    prompts = tuple(_prompt(p, f"prompts[{i}]") for i, p in enumerate(raw))
    fixed = [p for p in prompts if not p.get("is_variable")]
    variable = [p for p in prompts if p.get("is_variable")]
    if not any(not is_empty(p) for p in fixed):
        # Some subtask would have no prompt at all iff every variable prompt can also be empty.
        if not variable:
            raise TaskValidationError("prompts", "every prompt is empty")
        if all(any(is_empty(v) for v in p["variable_values"]) for p in variable):
            raise TaskValidationError(
                "prompts", "some combinations have no non-empty prompt (every prompt is empty or may be empty)"
            )
    return prompts


# --- the fields nietest does not use ----------------------------------------------------------------


def field_path(parent: str, key: str) -> str:
    """The path of `key` of an object at `parent` ("": the task itself), as messages name it:
    `meta.x`, or `meta["a.b"]` for a key that is not a plain name."""
    if _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    shown = key if len(key) <= 40 else key[:37] + "..."
    return f"{parent}[{json.dumps(shown, ensure_ascii=not shown.isprintable())}]"


def _key(key: Any, parent: str) -> str:
    """A key of an object in an unknown field: text that MongoDB can store as a field name."""
    where = parent or "task"
    if not isinstance(key, str):
        raise TaskValidationError(where, f"keys must be strings, got {kind_of(key)} {_show(key)}")
    if _SURROGATE.search(key):
        raise TaskValidationError(where, f"key {_show(key)} must be valid Unicode text, found a lone surrogate")
    if "\x00" in key:
        raise TaskValidationError(where, f"key {_show(key)} must not contain U+0000 (MongoDB cannot store it)")
    if key.startswith("$"):
        raise TaskValidationError(field_path(parent, key), "a field name must not start with $ (MongoDB reserves it)")
    return key


def _json_value(value: Any, path: str, depth: int) -> Any:
    """A copy of a JSON value that every store keeps as it is; TaskValidationError naming `path`."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        bad = _SURROGATE.search(value)
        if bad:
            raise TaskValidationError(
                path, f"must be valid Unicode text, found a lone surrogate at position {bad.start() + 1}"
            )
        return value
    if isinstance(value, int):
        if not MIN_STORED_INT <= value <= MAX_STORED_INT:
            got = _show(value) if value.bit_length() <= 128 else f"an integer of {value.bit_length()} bits"
            raise TaskValidationError(
                path, f"must be an integer within signed 64 bits (MongoDB stores no larger), got {got}"
            )
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TaskValidationError(path, f"must be a finite number, got {value!r}")
        return float(value)
    if isinstance(value, Mapping | list | tuple):
        if depth >= MAX_EXTRA_DEPTH:
            raise TaskValidationError(path, f"nests objects and arrays more than {MAX_EXTRA_DEPTH} levels deep")
        if isinstance(value, Mapping):
            return {_key(k, path): _json_value(v, field_path(path, k), depth + 1) for k, v in value.items()}
        return [_json_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    raise TaskValidationError(path, f"must be a JSON value, got {kind_of(value)}")


def check_extra(doc: Mapping[Any, Any]) -> dict[str, Any]:
    """The top-level fields of a task's JSON that nietest does not use (not `INPUT_FIELDS`), copied:
    kept with the task, as long as every store can keep them as they are (JSON values, integers
    within signed 64 bits, finite numbers, at most `MAX_EXTRA_DEPTH` levels deep, field names that
    do not start with `$`). TaskValidationError names the offending field as the task writes it
    (`meta.ids[3]`)."""
    return {
        _key(key, ""): _json_value(value, field_path("", key), 0)
        for key, value in doc.items()
        if key not in INPUT_FIELDS
    }
