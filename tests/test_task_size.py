"""The size of a stored task: at most `MAX_TASK_BYTES` (8 MiB) of UTF-8 JSON, each variable's values
stored once, in every store (tests/test_store_contract.py stores a task just under the limit in
each), refused at submit naming the biggest field; the documents of the previous version, which
kept the values twice, still read back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bson
import mongomock
import pytest

from nietest_daemon.core import settings as settings_module
from nietest_daemon.domain.task_size import MAX_TASK_BYTES, bson_bytes, json_bytes, stored_bytes
from nietest_daemon.domain.taskspec import MAX_TEXT_CHARS, PARAMETERS, Task, TaskValidationError, validate_task
from nietest_daemon.programs import task_commands
from nietest_daemon.store import SQLiteStore, StoreError, StoreUnavailable
from nietest_daemon.store.mongo import MongoStore
from nietest_daemon.store.results import load_task
from nietest_daemon.testing.mongo_faults import MAX_BSON_BYTES, FaultyDatabase


def freetext(text: str) -> dict[str, Any]:
    return {"type": "freetext", "value": text, "weight": 1.0}


def task_with_values(values: list[str], **extra: Any) -> dict[str, Any]:
    """A task whose second prompt is a variable with these free-text values."""
    return {
        "name": "big",
        "prompts": [
            freetext("1girl"),
            {
                "type": "freetext",
                "is_variable": True,
                "variable_id": "style",
                "variable_name": "style",
                "variable_values": [freetext(v) for v in values],
            },
        ],
        "seed": {
            "type": "seed",
            "is_variable": True,
            "variable_id": "seed",
            "variable_name": "seed",
            "variable_values": [1, 2],
        },
        **extra,
    }


def stored_size(doc: dict[str, Any]) -> int:
    return json_bytes(validate_task(doc, max_bytes=None).to_document())


def task_of_size(size: int) -> dict[str, Any]:
    """A task whose stored document is exactly `size` bytes: values of `MAX_TEXT_CHARS` characters,
    a last one as long as it takes, and the rest in the fixed prompt (an ASCII character is a byte)."""
    full = "x" * MAX_TEXT_CHARS
    one, two = (stored_size(task_with_values([full] * k + ["x"])) for k in (1, 2))
    per_value = two - one  # a full value, with its separator and keys
    base = one - per_value - 1  # no full value, and a last value of no character
    count = (size - base - 1) // per_value
    last = size - base - count * per_value
    for _ in range(3):  # the count's digits ("size": 834) take a few bytes more than in `one`
        extra = max(0, last - MAX_TEXT_CHARS)
        doc = task_with_values([full] * count + ["x" * (last - extra)])
        doc["prompts"][0]["value"] += "x" * extra
        last -= stored_size(doc) - size
    assert stored_size(doc) == size
    return doc


def task_just_under_the_limit() -> dict[str, Any]:
    return task_of_size(MAX_TASK_BYTES - 100)


def previous_version(task: Task) -> dict[str, Any]:
    """The document the previous version stored: each variable's values in the variable too."""
    doc = task.to_document()
    doc["prompts"] = [dict(p) for p in task.prompts]
    for param in task.parameters:
        doc[param.name] = param.to_document(values=True)
    return doc


# --- the limit -----------------------------------------------------------------------------------------------


def test_the_issues_task_of_1000_values_of_10000_characters_is_refused_naming_the_field() -> None:
    doc = task_with_values([f"{i:04d}" + "x" * (MAX_TEXT_CHARS - 4) for i in range(1000)])
    with pytest.raises(TaskValidationError) as refused:
        validate_task(doc)
    assert refused.value.field == "prompts[1].variable_values"
    assert refused.value.problem.startswith("the task would be stored as 9.6 MiB (")
    assert "over the limit of 8.0 MiB; this field is the biggest part of it, 9.6 MiB" in refused.value.problem


def test_the_limit_is_in_bytes_so_cjk_text_counts_three_times() -> None:
    ascii_doc = task_with_values(["x" * MAX_TEXT_CHARS] * 300)  # 3 MB
    cjk_doc = task_with_values(["猫" * MAX_TEXT_CHARS] * 300)  # the same characters, 9 MB of UTF-8
    assert validate_task(ascii_doc).total_subtasks == 600
    with pytest.raises(TaskValidationError, match="stored as 8.6 MiB") as refused:
        validate_task(cjk_doc)
    assert refused.value.field == "prompts[1].variable_values"


def test_a_task_at_the_limit_passes_and_one_byte_more_does_not() -> None:
    assert json_bytes(validate_task(task_of_size(MAX_TASK_BYTES)).to_document()) == MAX_TASK_BYTES
    with pytest.raises(TaskValidationError, match="over the limit of 8.0 MiB"):
        validate_task(task_of_size(MAX_TASK_BYTES + 1))


def test_the_biggest_field_is_named_wherever_it_is() -> None:
    doc = task_with_values(["a", "b"])
    doc["seed"]["variable_values"] = list(range(1, 1001))
    doc["lumina_model_name"] = {"type": "lumina_model_name", "value": "m" * 200}
    with pytest.raises(TaskValidationError) as refused:
        validate_task(doc, max_bytes=5000)
    assert refused.value.field == "seed.variable_values"
    doc["seed"]["variable_values"] = [1]
    with pytest.raises(TaskValidationError) as refused:
        validate_task(doc, max_bytes=500)
    assert refused.value.field == "lumina_model_name"


def test_submit_refuses_it_in_one_line_and_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "big.json"
    path.write_text(json.dumps(task_with_values(["y" * MAX_TEXT_CHARS] * 1000)))
    monkeypatch.setenv("NIETEST_HOME", str(tmp_path))
    monkeypatch.setenv("NIETA_XTOKEN", "a-token-for-the-test")
    settings = settings_module.load()
    assert task_commands.submit(settings, str(path), wait=False) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"nietest: {path}: invalid task: prompts[1].variable_values: the task would be stored as")
    with SQLiteStore(settings.data_dir) as store:
        assert store.list_tasks() == []


# --- stored once ---------------------------------------------------------------------------------------------


def test_each_variables_values_are_stored_once() -> None:
    task = validate_task(task_with_values(["watercolor", "oil"]))
    doc = task.to_document()
    assert "variable_values" not in json.dumps(doc)
    assert doc["prompts"][1] == {
        "type": "freetext",
        "is_variable": True,
        "variable_id": "style",
        "variable_name": "style",
    }
    assert doc["seed"] == {
        "type": "seed",
        "is_variable": True,
        "variable_id": "seed",
        "variable_name": "seed",
        "format": "int",
    }
    assert [v["value"] for v in doc["variables_map"]["0"]["values"]] == ["watercolor", "oil"]
    assert doc["variables_map"]["1"]["values"] == [1, 2]
    assert Task.from_document(doc) == task
    # The previous version's document, the values twice, is half again as big as this one.
    big = validate_task(task_just_under_the_limit())
    assert json_bytes(previous_version(big)) > 1.9 * json_bytes(big.to_document())


def test_a_document_of_the_previous_version_reads_back(tmp_path: Path) -> None:
    doc = task_with_values(["watercolor", "oil", ""])
    doc["ratio"] = {
        "type": "ratio",
        "is_variable": True,
        "variable_id": 7,
        "variable_name": "r",
        "variable_values": ["1:1", "16:9"],
    }
    task = validate_task(doc)
    old = json.loads(json.dumps(previous_version(task)))
    assert Task.from_document(old) == task
    with SQLiteStore(tmp_path) as store:
        store.create_task({"id": "old", **old})
        store.create_task({"id": "new", **task.to_document()})
        assert load_task(store, "old").task == load_task(store, "new").task == task


def test_a_stored_document_is_not_judged_by_its_size_again() -> None:
    task = validate_task(task_of_size(MAX_TASK_BYTES + 1000), max_bytes=None)
    assert Task.from_document(task.to_document()) == task


def test_a_stored_document_that_lost_its_values_is_no_task() -> None:
    doc = validate_task(task_with_values(["a", "b"])).to_document()
    del doc["variables_map"]["0"]
    with pytest.raises(TaskValidationError, match=r"^prompts\[1\]\.variable_values: is required"):
        Task.from_document(doc)
    assert set(PARAMETERS) <= set(doc)


# --- MongoDB's own limit -------------------------------------------------------------------------------------


def test_the_previous_versions_document_of_a_task_under_the_limit_was_too_large_for_mongodb() -> None:
    """What the issue measured: the values twice make a document MongoDB refuses (16 MiB of BSON).
    The wrapper refuses it as pymongo does, and the store's edge makes that a StoreError."""
    task = validate_task(task_just_under_the_limit())
    old = {"id": "old", **previous_version(task)}
    assert len(bson.encode(old)) > MAX_BSON_BYTES
    store = MongoStore(FaultyDatabase(mongomock.MongoClient().db))  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="DocumentTooLarge: BSON document too large") as refused:
        store.create_task(old)
    assert not isinstance(refused.value, StoreUnavailable)
    store.create_task({"id": "new", **task.to_document()})  # stored once, it fits
    got = store.get_task("new")
    assert got is not None and Task.from_document(got) == task


# --- the fields nietest does not use ---------------------------------------------------------------------


def test_bson_bytes_is_the_size_bson_encodes() -> None:
    values = [
        {},
        {"a": [0, 1, -(2**31), 2**31, 2**63 - 1, 1.5, None, True, "猫", ""], "b": {"c": {"d": []}}},
        {"user_id": "x" * 1000, "n": -7},
    ]
    for value in values:
        assert bson_bytes(value) == len(bson.encode(value))


def test_extra_counts_at_its_bson_size_where_that_is_bigger() -> None:
    """Millions of tiny values are cheap in JSON and not in BSON (a `0` in an array: 2 bytes of JSON,
    up to 15 of BSON): the limit counts `extra` at the bigger of the two, so a task that passes fits
    in MongoDB's 16 MiB too."""
    doc = task_with_values(["a"], ids=[0] * 100_000)
    task = validate_task(doc, max_bytes=None)
    stored = {"id": "t", **task.to_document()}
    assert json_bytes(stored) < 400_000 < len(bson.encode(stored)) <= stored_bytes(task) + 1000
    with pytest.raises(TaskValidationError) as refused:
        validate_task(doc, max_bytes=json_bytes(task.to_document()) + 1000)
    assert refused.value.field == "ids"
    assert "bytes of UTF-8 JSON, the fields nietest does not use counted as BSON)" in refused.value.problem
    text = validate_task(task_with_values(["a"], note="x" * 5000))  # text: a few bytes more in BSON
    assert 0 < stored_bytes(text) - json_bytes(text.to_document()) < 10


def test_the_biggest_field_may_be_one_nietest_does_not_use() -> None:
    doc = task_with_values(["a", "b"], meta={"blob": "z" * 4000})
    with pytest.raises(TaskValidationError, match="over the limit") as refused:
        validate_task(doc, max_bytes=3000)
    assert refused.value.field == "meta"
    doc = task_with_values(["a", "b"], **{"odd key": "z" * 4000})
    with pytest.raises(TaskValidationError) as refused:
        validate_task(doc, max_bytes=3000)
    assert refused.value.field == '["odd key"]'
