"""The task-document builders of the tests and benches (nietest_daemon/testing/task_documents.py)."""

from __future__ import annotations

import json

import pytest

from nietest_daemon.domain.taskspec import PARAMETER_DEFAULTS, PARAMETERS, parse_task, validate_task
from nietest_daemon.testing.task_documents import (
    fixed_param,
    fixed_prompt,
    task_document,
    variable_param,
    variable_prompt,
)


def test_a_minimal_document_is_complete_and_takes_the_defaults() -> None:
    doc = task_document("t", [fixed_prompt("a cat")])
    assert list(doc) == ["name", "priority", "prompts", *PARAMETERS]
    assert doc["priority"] == 1
    assert doc["prompts"] == [{"type": "freetext", "value": "a cat", "weight": 1.0, "is_variable": False}]
    task = validate_task(doc)
    assert task.total_subtasks == 1
    assert {p.name: p.value for p in task.parameters} == PARAMETER_DEFAULTS
    assert task.to_document() == validate_task({"name": "t", "prompts": doc["prompts"]}).to_document()


def test_variables_keep_their_order_ids_and_names() -> None:
    doc = task_document(
        "campaign",
        [fixed_prompt("1girl"), variable_prompt("style", ["a", "b"], name="Style", weights=[1.0, 1.5])],
        priority=3,
        seed=7,
        ratio=variable_param("ratio", ["1:1", "3:4"], variable_name="Ratio"),
        is_lumina=variable_param("is_lumina", [False, True], variable_id="lumina"),
    )
    assert doc["seed"] == {"type": "seed", "value": 7, "is_variable": False, "format": "int"}
    assert doc["prompts"][1]["variable_values"][1] == {"type": "freetext", "value": "b", "weight": 1.5}
    task = parse_task(json.dumps(doc))
    assert task.priority == 3 and task.total_subtasks == 8
    assert [(d.variable_id, d.variable_name, d.variable_type) for d in task.dimensions] == [
        ("style", "Style", "prompt"),
        ("ratio", "Ratio", "ratio"),
        ("lumina", "lumina", "is_lumina"),
    ]
    assert task.parameter("seed").value == 7
    assert fixed_param("lumina_cfg", 5.5)["format"] == "float"


def test_mistakes_are_refused() -> None:
    with pytest.raises(TypeError, match="unknown parameters colour"):
        task_document("t", [fixed_prompt("a")], colour="red")
    with pytest.raises(ValueError, match="unknown parameter 'size'"):
        fixed_param("size", 3)
    with pytest.raises(ValueError, match="2 values but 1 weights"):
        variable_prompt("p", ["a", "b"], weights=[1.0])
