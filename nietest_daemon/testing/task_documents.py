"""Builders of task documents (the front end's task JSON) for the tests and benches.

The format is `nietest_daemon.domain.taskspec`'s (README.md, "Tasks"). These build its usual
shapes only, as plain dicts ready for `json.dumps` or `taskspec.validate_task`; they do not
validate, so a test may build a valid document and then break one field of it.

    task_document(
        "campaign",
        [fixed_prompt("1girl, portrait"), variable_prompt("style", ["watercolor", "oil painting"])],
        priority=2,
        seed=7,                                        # a fixed parameter, by its value
        ratio=variable_param("ratio", ["1:1", "3:4"]),  # a variable one
    )

Every parameter the call leaves out is written as fixed at its default (`PARAMETER_DEFAULTS`),
each with its usual `format` (`PARAMETER_FORMATS`), so documents are complete and keep the order
of `PARAMETERS` (the order of the parameter dimensions, on which subtask ids depend).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nietest_daemon.domain.taskspec import PARAMETER_DEFAULTS, PARAMETER_FORMATS, PARAMETERS

__all__ = [
    "fixed_param",
    "fixed_prompt",
    "prompt_value",
    "task_document",
    "variable_param",
    "variable_prompt",
]


def prompt_value(text: str, weight: float = 1.0) -> dict[str, Any]:
    """One value of a variable prompt: a freetext `{type, value, weight}`."""
    return {"type": "freetext", "value": text, "weight": weight}


def fixed_prompt(text: str, weight: float = 1.0) -> dict[str, Any]:
    """A fixed freetext prompt."""
    return {**prompt_value(text, weight), "is_variable": False}


def variable_prompt(
    variable_id: str,
    values: Sequence[str],
    *,
    name: str | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """A variable freetext prompt: one dimension with a value per text of `values`.

    `name` (the variable_name) defaults to `variable_id`; `weights`, one per value, to 1.0 each.
    """
    if weights is None:
        weights = [1.0] * len(values)
    elif len(weights) != len(values):
        raise ValueError(f"{len(values)} values but {len(weights)} weights")
    return {
        "type": "freetext",
        "value": "",
        "weight": 1.0,
        "is_variable": True,
        "variable_id": variable_id,
        "variable_name": variable_id if name is None else name,
        "variable_values": [prompt_value(text, weight) for text, weight in zip(values, weights, strict=True)],
    }


def _format(name: str) -> str:
    if name not in PARAMETER_FORMATS:
        raise ValueError(f"unknown parameter {name!r}: one of {', '.join(PARAMETERS)}")
    return PARAMETER_FORMATS[name]


def fixed_param(name: str, value: Any) -> dict[str, Any]:
    """The parameter `name` (one of `PARAMETERS`) fixed at `value`, with its usual format."""
    return {"type": name, "value": value, "is_variable": False, "format": _format(name)}


def variable_param(
    name: str,
    values: Sequence[Any],
    *,
    variable_id: str | None = None,
    variable_name: str | None = None,
) -> dict[str, Any]:
    """The parameter `name` as a variable: one dimension with the given values.

    `variable_id` defaults to the parameter's name, `variable_name` to the variable_id.
    """
    fmt = _format(name)
    vid = name if variable_id is None else variable_id
    return {
        "type": name,
        "is_variable": True,
        "variable_id": vid,
        "variable_name": vid if variable_name is None else variable_name,
        "variable_values": list(values),
        "format": fmt,
    }


def task_document(
    name: str, prompts: Sequence[Mapping[str, Any]], *, priority: int = 1, **params: Any
) -> dict[str, Any]:
    """A task: `name`, `priority`, the prompts (in order) and all seven parameters, in `PARAMETERS` order.

    A keyword per parameter: a parameter document (`fixed_param`, `variable_param` or any dict,
    used as it is) or a plain value, short for `fixed_param(name, value)`. The parameters not
    given are fixed at their defaults.
    """
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise TypeError(f"unknown parameters {', '.join(unknown)}: one of {', '.join(PARAMETERS)}")
    doc: dict[str, Any] = {"name": name, "priority": priority, "prompts": list(prompts)}
    for param in PARAMETERS:
        value = params.get(param, PARAMETER_DEFAULTS[param])
        doc[param] = value if isinstance(value, Mapping) else fixed_param(param, value)
    return doc
