"""Task format validation and expansion : nietest_daemon.domain.taskspec."""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import json
import math
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nietest_daemon.domain.images import ratio_to_size
from nietest_daemon.domain.taskspec import (
    PARAMETERS,
    SubtaskSpec,
    Task,
    TaskValidationError,
    expand,
    parse_task,
    subtask_at,
    subtask_id,
    validate_task,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "task.json"
CHARACTER = "5f3c1e2a-8b7d-4c6e-9a1f-2d3b4c5e6f70"
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def example() -> dict[str, Any]:
    return json.loads(EXAMPLE.read_text())


def minimal(**overrides: Any) -> dict[str, Any]:
    """The smallest valid task: a name and one freetext prompt."""
    doc: dict[str, Any] = {"name": "t", "prompts": [{"type": "freetext", "value": "a cat", "weight": 1.0}]}
    doc.update(overrides)
    return doc


def fixed(name: str, value: Any) -> dict[str, Any]:
    return {"type": name, "value": value, "is_variable": False, "format": "x"}


def variable(name: str, values: list[Any], vid: str | None = None) -> dict[str, Any]:
    return {
        "type": name,
        "is_variable": True,
        "variable_id": vid or f"id-{name}",
        "variable_name": name,
        "variable_values": values,
        "format": "x",
    }


def freetext(value: str, weight: float = 1.0) -> dict[str, Any]:
    return {"type": "freetext", "value": value, "weight": weight}


def character(**overrides: Any) -> dict[str, Any]:
    prompt = {
        "type": "oc_vtoken_adaptor",
        "value": CHARACTER,
        "uuid": CHARACTER,
        "name": "someone",
        "img_url": "https://example.invalid/a.png",
        "weight": 1.0,
    }
    prompt.update(overrides)
    return prompt


def variable_prompt(values: list[Any], vid: str = "p") -> dict[str, Any]:
    return {
        "type": "freetext",
        "is_variable": True,
        "variable_id": vid,
        "variable_name": vid,
        "variable_values": values,
    }


# --- the example ---------------------------------------------------------------------------------


def test_example_expands_to_six_in_order() -> None:
    task = validate_task(example())
    assert task.total_subtasks == 6
    assert [d.variable_type for d in task.dimensions] == ["prompt", "is_lumina"]
    specs = list(expand(task))
    assert [s.variable_indices for s in specs] == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]]
    styles = [p["value"] for p in example()["prompts"][1]["variable_values"]]
    for spec in specs:
        style, lumina = spec.variable_indices
        assert spec.is_lumina is (lumina == 1)
        assert [p["type"] for p in spec.prompts] == ["oc_vtoken_adaptor", "freetext", "freetext"]
        assert spec.prompts[0]["uuid"] == spec.prompts[0]["value"] == CHARACTER
        assert spec.prompts[1]["value"] == styles[style]
        assert (spec.ratio, spec.width, spec.height) == ("3:4", 888, 1184)
        assert spec.seed is None
        assert spec.use_polish is False
        assert (spec.lumina_model_name, spec.lumina_cfg, spec.lumina_step) == ("lumina_2", 5.5, 30)
    assert specs[5].prompts[1]["weight"] == 1.2


def test_example_document() -> None:
    task = validate_task(example())
    doc = task.to_document()
    assert set(doc) >= {"name", "priority", "prompts", *PARAMETERS, "variables_map", "total_images"}
    assert doc["total_images"] == 6
    assert list(doc["variables_map"]) == ["0", "1"]
    assert doc["variables_map"]["0"]["variable_type"] == "prompt"
    assert doc["variables_map"]["0"]["variable_id"] == "style"
    assert [v["value"] for v in doc["variables_map"]["0"]["values"]][0].startswith("watercolor")
    assert doc["variables_map"]["1"] == {
        "variable_id": "lumina",
        "variable_name": "Lumina",
        "variable_type": "is_lumina",
        "values": [False, True],
    }
    assert doc["ratio"]["value"] == "3:4"
    json.dumps(doc, allow_nan=False)
    assert "variable_values" not in doc["prompts"][1] and "variable_values" not in doc["is_lumina"]  # stored once
    assert Task.from_document(doc) == task  # the stored document reads back as the same task


def test_example_via_parse_task() -> None:
    assert parse_task(EXAMPLE.read_bytes()) == validate_task(example())


# --- basics --------------------------------------------------------------------------------------


def test_no_variables_is_exactly_one_subtask() -> None:
    task = validate_task(minimal())
    assert task.dimensions == () and task.total_subtasks == 1
    specs = list(expand(task))
    assert len(specs) == 1
    spec = specs[0]
    assert spec.variable_indices == []
    assert spec.prompts == [{"type": "freetext", "value": "a cat", "weight": 1.0}]
    assert (spec.ratio, spec.width, spec.height, spec.seed) == ("1:1", 1024, 1024, None)
    assert (spec.use_polish, spec.is_lumina) == (False, False)
    assert (spec.lumina_model_name, spec.lumina_cfg, spec.lumina_step) == (None, None, None)
    assert spec.subtask_id("T") == subtask_id("T", []) == "T:-"
    assert task.variables_map() == {}
    assert task.to_document()["total_images"] == 1


def test_defaults_and_normalisation() -> None:
    task = validate_task(
        minimal(
            priority=None,
            seed=fixed("seed", 0),
            lumina_model_name=fixed("lumina_model_name", ""),
            lumina_cfg=fixed("lumina_cfg", 5),
            use_polish=None,
        )
    )
    assert task.priority == 1
    assert task.parameter("seed").value == 0
    assert task.parameter("lumina_model_name").value is None
    assert task.parameter("lumina_cfg").value == 5.0 and isinstance(task.parameter("lumina_cfg").value, float)
    (spec,) = expand(task)
    assert spec.seed is None  # 0 means random
    assert spec.use_polish is False
    (spec,) = expand(validate_task(minimal(seed=fixed("seed", 42), priority=7)))
    assert spec.seed == 42


def test_empty_prompts_are_dropped() -> None:
    doc = minimal(prompts=[freetext(""), variable_prompt([freetext("red"), freetext("  ")]), freetext("a cat")])
    specs = list(expand(validate_task(doc)))
    assert [[p["value"] for p in s.prompts] for s in specs] == [["red", "a cat"], ["a cat"]]


def test_character_with_empty_value_is_dropped() -> None:
    doc = minimal(prompts=[character(value="", uuid="", name=""), freetext("x")])
    (spec,) = expand(validate_task(doc))
    assert [p["type"] for p in spec.prompts] == ["freetext"]


def test_dimension_order_prompts_then_parameters() -> None:
    doc = minimal(
        prompts=[
            variable_prompt([freetext("a"), freetext("b")], "p1"),
            freetext("x"),
            variable_prompt([freetext("c")], "p2"),
        ],
        lumina_step=variable("lumina_step", [10, 20, 30]),
        ratio=variable("ratio", ["1:1", "16:9"]),
        seed=variable("seed", [1, 2]),
    )
    task = validate_task(doc)
    assert [d.variable_type for d in task.dimensions] == ["prompt", "prompt", "ratio", "seed", "lumina_step"]
    assert [d.variable_id for d in task.dimensions] == ["p1", "p2", "id-ratio", "id-seed", "id-lumina_step"]
    assert task.total_subtasks == 2 * 1 * 2 * 2 * 3
    specs = list(expand(task))
    assert specs[1].variable_indices == [0, 0, 0, 0, 1] and specs[1].lumina_step == 20
    assert specs[-1].variable_indices == [1, 0, 1, 1, 2]
    assert (specs[-1].ratio, specs[-1].width, specs[-1].height) == ("16:9", 1368, 768)


def test_input_is_not_mutated() -> None:
    doc = example()
    before = copy.deepcopy(doc)
    task = validate_task(doc)
    list(expand(task))
    task.to_document()["variables_map"]["0"]["values"][0]["value"] = "changed"
    task.to_document()["prompts"][0]["value"] = "changed"
    task.variables_map()["0"]["values"][0]["value"] = "changed"
    assert doc == before
    assert validate_task(example()) == task


def test_expand_is_a_lazy_generator() -> None:
    doc = minimal(
        prompts=[variable_prompt([freetext(f"style {i}") for i in range(250)]), freetext("x")],
        seed=variable("seed", list(range(1, 201))),
    )
    task = validate_task(doc)
    assert task.total_subtasks == 50_000
    gen = expand(task)
    assert inspect.isgenerator(gen)
    first = next(gen)
    assert first.variable_indices == [0, 0] and first.seed == 1
    tracemalloc.start()
    try:
        count = 1 + sum(1 for _ in gen)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 50_000
    assert peak < 2_000_000, f"expansion held {peak} bytes at once"


def test_subtask_at_and_ids() -> None:
    task = validate_task(example())
    assert subtask_at(task, [2, 1]) == list(expand(task))[5]
    with pytest.raises(ValueError):
        subtask_at(task, [3, 0])
    with pytest.raises(ValueError):
        subtask_at(task, [0])
    assert subtask_id("T", [2, 1]) == "T:2.1"
    assert subtask_id("T", [21]) != subtask_id("T", [2, 1])
    assert subtask_id("T", []) != subtask_id("T", [0])
    with pytest.raises(ValueError):
        subtask_id("a:b", [0])
    spec = subtask_at(task, [0, 1])
    assert isinstance(spec, SubtaskSpec)
    assert spec.as_dict()["variable_indices"] == [0, 1]


# --- the size cap --------------------------------------------------------------------------------


def test_size_cap_refuses_with_the_field_named() -> None:
    doc = minimal(
        prompts=[variable_prompt([freetext(f"s{i}") for i in range(300)]), freetext("x")],
        seed=variable("seed", list(range(300))),
    )
    with pytest.raises(TaskValidationError) as err:
        validate_task(doc)
    assert err.value.field == "seed.variable_values"
    assert "90000" in str(err.value) and "50000" in str(err.value)
    assert str(err.value).startswith("seed.variable_values: ")


def test_size_cap_is_configurable_and_inclusive() -> None:
    assert validate_task(example(), max_subtasks=6).total_subtasks == 6
    with pytest.raises(TaskValidationError) as err:
        validate_task(example(), max_subtasks=5)
    assert err.value.field == "is_lumina.variable_values"


def test_size_cap_huge_product_is_not_materialised() -> None:
    values = [freetext(f"s{i}") for i in range(1000)]
    doc = minimal(prompts=[variable_prompt(values, f"p{k}") for k in range(20)])
    with pytest.raises(TaskValidationError) as err:
        validate_task(doc)
    assert err.value.field == "prompts[1].variable_values"
    assert str(10**60) in str(err.value)


# --- malformed tasks -----------------------------------------------------------------------------


def _with(path: str, value: Any) -> Callable[[], Any]:
    """A copy of the example with the value at a dotted path (`prompts.1.variable_values.0`) replaced."""

    def build() -> Any:
        doc = example()
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        target = doc
        for key in keys[:-1]:
            target = target[key]
        if value is DELETE:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
        return doc

    return build


def _doc(doc: Any) -> Callable[[], Any]:
    return lambda: doc


DELETE = object()
NAN = float("nan")
INF = float("inf")

MALFORMED: list[tuple[str, Callable[[], Any], str]] = [
    # the document
    ("not an object", _doc([example()]), "task"),
    ("a string", _doc("task"), "task"),
    ("null", _doc(None), "task"),
    # name, priority
    ("no name", _with("name", DELETE), "name"),
    ("null name", _with("name", None), "name"),
    ("empty name", _with("name", "  "), "name"),
    ("numeric name", _with("name", 5), "name"),
    ("long name", _with("name", "n" * 201), "name"),
    ("string priority", _with("priority", "1"), "priority"),
    ("bool priority", _with("priority", True), "priority"),
    ("float priority", _with("priority", 1.5), "priority"),
    ("negative priority", _with("priority", -1), "priority"),
    # prompts
    ("no prompts", _with("prompts", DELETE), "prompts"),
    ("prompts object", _with("prompts", {"0": freetext("x")}), "prompts"),
    ("prompts string", _with("prompts", "a cat"), "prompts"),
    ("no prompt", _with("prompts", []), "prompts"),
    ("too many prompts", _with("prompts", [freetext("x")] * 201), "prompts"),
    ("all prompts empty", _with("prompts", [freetext(""), freetext(" "), character(value="")]), "prompts"),
    ("every combination may be empty", _with("prompts", [freetext(""), variable_prompt([freetext("")])]), "prompts"),
    ("prompt not an object", _with("prompts.2", "a cat"), "prompts[2]"),
    ("prompt list", _with("prompts.2", [freetext("x")]), "prompts[2]"),
    ("unknown prompt type", _with("prompts.2.type", "image"), "prompts[2].type"),
    ("no prompt type", _with("prompts.2.type", DELETE), "prompts[2].type"),
    ("prompt type number", _with("prompts.2.type", 3), "prompts[2].type"),
    ("prompt without value", _with("prompts.2.value", DELETE), "prompts[2].value"),
    ("prompt value number", _with("prompts.2.value", 5), "prompts[2].value"),
    ("prompt value object", _with("prompts.2.value", {"text": "x"}), "prompts[2].value"),
    ("prompt value too long", _with("prompts.2.value", "x" * 10_001), "prompts[2].value"),
    ("weight NaN", _with("prompts.2.weight", NAN), "prompts[2].weight"),
    ("weight inf", _with("prompts.2.weight", INF), "prompts[2].weight"),
    ("weight string", _with("prompts.2.weight", "1"), "prompts[2].weight"),
    ("weight bool", _with("prompts.2.weight", True), "prompts[2].weight"),
    ("weight huge", _with("prompts.2.weight", 10**400), "prompts[2].weight"),
    ("is_variable string", _with("prompts.2.is_variable", "no"), "prompts[2].is_variable"),
    ("stray variable values", _with("prompts.2.variable_values", [freetext("x")]), "prompts[2].variable_values"),
    ("character not a uuid", _with("prompts.0.value", "alice"), "prompts[0].value"),
    ("character uuid differs", _with("prompts.0.uuid", "00000000-0000-0000-0000-000000000000"), "prompts[0].uuid"),
    ("character without name", _with("prompts.0.name", DELETE), "prompts[0].name"),
    ("character name number", _with("prompts.0.name", 1), "prompts[0].name"),
    ("character img_url list", _with("prompts.0.img_url", ["u"]), "prompts[0].img_url"),
    ("element not a uuid", _with("prompts.0", character(type="elementum", value="x")), "prompts[0].value"),
    # variable prompts
    ("variable without values", _with("prompts.1.variable_values", DELETE), "prompts[1].variable_values"),
    ("variable values null", _with("prompts.1.variable_values", None), "prompts[1].variable_values"),
    ("variable values empty", _with("prompts.1.variable_values", []), "prompts[1].variable_values"),
    ("variable values object", _with("prompts.1.variable_values", {"a": 1}), "prompts[1].variable_values"),
    ("variable too many", _with("prompts.1.variable_values", [freetext("x")] * 1001), "prompts[1].variable_values"),
    ("variable without id", _with("prompts.1.variable_id", DELETE), "prompts[1].variable_id"),
    ("variable id empty", _with("prompts.1.variable_id", ""), "prompts[1].variable_id"),
    ("variable id list", _with("prompts.1.variable_id", ["x"]), "prompts[1].variable_id"),
    ("variable without name", _with("prompts.1.variable_name", DELETE), "prompts[1].variable_name"),
    ("variable name bool", _with("prompts.1.variable_name", False), "prompts[1].variable_name"),
    ("variable unknown type", _with("prompts.1.type", "style"), "prompts[1].type"),
    ("value not a prompt", _with("prompts.1.variable_values.1", "cel"), "prompts[1].variable_values[1]"),
    ("value unknown type", _with("prompts.1.variable_values.2.type", "x"), "prompts[1].variable_values[2].type"),
    ("value value number", _with("prompts.1.variable_values.0.value", 1), "prompts[1].variable_values[0].value"),
    ("value weight NaN", _with("prompts.1.variable_values.0.weight", NAN), "prompts[1].variable_values[0].weight"),
    (
        "nested variable",
        _with("prompts.1.variable_values.0", variable_prompt([freetext("x")], "inner")),
        "prompts[1].variable_values[0].is_variable",
    ),
    ("duplicate variable id", _with("is_lumina.variable_id", "style"), "is_lumina.variable_id"),
    # parameter shape
    ("ratio bare string", _with("ratio", "16:9"), "ratio"),
    ("seed bare number", _with("seed", 42), "seed"),
    ("parameter list", _with("use_polish", [False]), "use_polish"),
    ("ratio without value", _with("ratio.value", DELETE), "ratio.value"),
    ("use_polish without value", _with("use_polish.value", DELETE), "use_polish.value"),
    ("is_variable number", _with("seed.is_variable", 1), "seed.is_variable"),
    ("stray parameter values", _with("seed.variable_values", [1, 2]), "seed.variable_values"),
    ("format number", _with("ratio.format", 5), "ratio.format"),
    ("type object", _with("ratio.type", {}), "ratio.type"),
    ("parameter variable without values", _with("is_lumina.variable_values", DELETE), "is_lumina.variable_values"),
    ("parameter variable empty", _with("is_lumina.variable_values", []), "is_lumina.variable_values"),
    ("parameter variable too many", _with("is_lumina.variable_values", [True] * 1001), "is_lumina.variable_values"),
    ("parameter variable without name", _with("is_lumina.variable_name", None), "is_lumina.variable_name"),
    ("parameter variable nested", _with("is_lumina.variable_values", [[True]]), "is_lumina.variable_values[0]"),
    # ratio
    ("ratio slash", _with("ratio.value", "16/9"), "ratio.value"),
    ("ratio number", _with("ratio.value", 1.5), "ratio.value"),
    ("ratio null", _with("ratio.value", None), "ratio.value"),
    ("ratio zero", _with("ratio.value", "0:1"), "ratio.value"),
    ("ratio decimal", _with("ratio.value", "1.5:1"), "ratio.value"),
    ("ratio too wide", _with("ratio.value", "101:1"), "ratio.value"),
    ("ratio spaces", _with("ratio.value", " 16:9"), "ratio.value"),
    ("ratio variable bad value", _with("ratio", variable("ratio", ["16:9", 3])), "ratio.variable_values[1]"),
    # seed
    ("seed string", _with("seed.value", "42"), "seed.value"),
    ("seed bool", _with("seed.value", True), "seed.value"),
    ("seed float", _with("seed.value", 42.0), "seed.value"),
    ("seed negative", _with("seed.value", -1), "seed.value"),
    ("seed too big", _with("seed.value", 2**53), "seed.value"),
    ("seed variable bool", _with("seed", variable("seed", [1, False])), "seed.variable_values[1]"),
    # booleans
    ("use_polish int", _with("use_polish.value", 1), "use_polish.value"),
    ("use_polish string", _with("use_polish.value", "true"), "use_polish.value"),
    ("use_polish null", _with("use_polish.value", None), "use_polish.value"),
    ("is_lumina variable int", _with("is_lumina.variable_values", [False, 1]), "is_lumina.variable_values[1]"),
    ("is_lumina variable null", _with("is_lumina.variable_values", [None]), "is_lumina.variable_values[0]"),
    # lumina_*
    ("model name number", _with("lumina_model_name.value", 5), "lumina_model_name.value"),
    ("model name too long", _with("lumina_model_name.value", "m" * 201), "lumina_model_name.value"),
    ("cfg NaN", _with("lumina_cfg.value", NAN), "lumina_cfg.value"),
    ("cfg inf", _with("lumina_cfg.value", -INF), "lumina_cfg.value"),
    ("cfg string", _with("lumina_cfg.value", "5.5"), "lumina_cfg.value"),
    ("cfg bool", _with("lumina_cfg.value", True), "lumina_cfg.value"),
    ("cfg negative", _with("lumina_cfg.value", -0.5), "lumina_cfg.value"),
    ("cfg huge int", _with("lumina_cfg.value", 10**400), "lumina_cfg.value"),
    ("cfg variable NaN", _with("lumina_cfg", variable("lumina_cfg", [5, NAN])), "lumina_cfg.variable_values[1]"),
    ("step float", _with("lumina_step.value", 30.0), "lumina_step.value"),
    ("step bool", _with("lumina_step.value", True), "lumina_step.value"),
    ("step zero", _with("lumina_step.value", 0), "lumina_step.value"),
    ("step variable string", _with("lumina_step", variable("lumina_step", ["30"])), "lumina_step.variable_values[0]"),
]


@pytest.mark.parametrize(("build", "field"), [(b, f) for _, b, f in MALFORMED], ids=[c for c, _, _ in MALFORMED])
def test_malformed_task_is_refused_naming_the_field(build: Callable[[], Any], field: str) -> None:
    with pytest.raises(TaskValidationError) as err:
        validate_task(build())
    assert err.value.field == field, str(err.value)
    assert str(err.value).startswith(f"{field}: ")
    assert isinstance(err.value, ValueError)


def test_parse_task_refuses_bad_json_and_nan() -> None:
    with pytest.raises(TaskValidationError) as err:
        parse_task("{not json")
    assert err.value.field == "task"
    with pytest.raises(TaskValidationError) as err:
        parse_task(b"\xff\xfe{")
    assert err.value.field == "task"
    with pytest.raises(TaskValidationError) as err:
        parse_task("[" * 100_000 + "]" * 100_000)
    assert err.value.field == "task"
    text = EXAMPLE.read_text().replace('"value": 5.5', '"value": NaN')
    with pytest.raises(TaskValidationError) as err:
        parse_task(text)
    assert err.value.field == "lumina_cfg.value"


def test_unknown_top_level_keys_are_kept_as_extra_and_change_nothing_else() -> None:
    doc = example()
    doc.update({"batch_size": 4, "user_id": "x", "variables_map": "junk"})
    task = validate_task(doc)
    assert task.extra == {"batch_size": 4, "user_id": "x", "variables_map": "junk"}
    assert replace(task, extra={}) == validate_task(example())
    stored = task.to_document()
    assert stored["extra"] == task.extra and stored["variables_map"] != "junk"  # the task's own map


def test_omitted_and_null_parameters_take_defaults() -> None:
    task = validate_task(minimal(ratio=None, seed=None))
    assert [p.value for p in task.parameters] == ["1:1", None, False, False, None, None, None]
    doc = minimal(seed={"type": "seed", "is_variable": False}, lumina_cfg={"value": None})
    assert validate_task(doc).parameter("seed").value is None


# --- ratio -> size -------------------------------------------------------------------------------

RATIO_TABLE = {
    "1:1": (1024, 1024),
    "4:3": (1184, 888),
    "3:4": (888, 1184),
    "16:9": (1368, 768),
    "9:16": (768, 1368),
    "3:2": (1256, 840),
    "2:3": (840, 1256),
    "21:9": (1568, 672),
}


@pytest.mark.parametrize(("ratio", "size"), RATIO_TABLE.items())
def test_ratio_table(ratio: str, size: tuple[int, int]) -> None:
    assert ratio_to_size(ratio) == size


@pytest.mark.parametrize(
    "ratio", ["", "abc", "16", "16:", ":9", "16:0", "0:9", "1:1:1", "-1:2", "16:9x", "a:b", "1e3:1"]
)
def test_unparsable_ratio_is_1024_square(ratio: str) -> None:
    assert ratio_to_size(ratio) == (1024, 1024)


@pytest.mark.parametrize("ratio", [None, 16, 1.5, ["16:9"]])
def test_non_string_ratio_is_1024_square(ratio: Any) -> None:
    assert ratio_to_size(ratio) == (1024, 1024)


@given(st.integers(1, 100), st.integers(1, 100))
@FAST
def test_ratio_formula(a: int, b: int) -> None:
    width, height = ratio_to_size(f"{a}:{b}")
    x = math.sqrt(1024**2 / (a * b))
    assert width % 8 == 0 and height % 8 == 0
    assert abs(width - a * x) <= 4 and abs(height - b * x) <= 4
    assert ratio_to_size(f"{b}:{a}") == (height, width)


# --- properties of expansion ---------------------------------------------------------------------

# Valid text: no lone surrogates (Cs), control characters (Cc), line breaks or bidirectional
# formatting characters (refused in one-line fields; see test_bad_tasks.py for the refusals).
texts = st.text(
    st.characters(
        codec="utf-8",
        exclude_categories=["Cs", "Cc"],
        exclude_characters="\u2028\u2029\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
    ),
    max_size=12,
)
uuids = st.uuids().map(str)


@st.composite
def fixed_prompts(draw: st.DrawFn) -> dict[str, Any]:
    weight = draw(st.one_of(st.none(), st.floats(-5, 5), st.integers(-5, 5)))
    if draw(st.booleans()):
        prompt: dict[str, Any] = {"type": "freetext", "value": draw(texts)}
    else:
        uuid = draw(uuids)
        prompt = {
            "type": draw(st.sampled_from(["oc_vtoken_adaptor", "elementum"])),
            "value": uuid,
            "uuid": draw(st.sampled_from([uuid, uuid.upper(), None])),
            "name": draw(texts.filter(str.strip)),
            "img_url": draw(st.one_of(st.none(), texts)),
        }
    if weight is not None:
        prompt["weight"] = weight
    return prompt


PARAMETER_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "ratio": st.sampled_from(list(RATIO_TABLE) + ["5:7", "100:1"]),
    "seed": st.one_of(st.none(), st.integers(0, 2**53 - 1)),
    "use_polish": st.booleans(),
    "is_lumina": st.booleans(),
    "lumina_model_name": st.one_of(st.none(), texts),
    "lumina_cfg": st.one_of(st.none(), st.integers(0, 100), st.floats(0, 100)),
    "lumina_step": st.one_of(st.none(), st.integers(1, 1000)),
}


@st.composite
def valid_tasks(draw: st.DrawFn, max_dimensions: int = 4, max_size: int = 3) -> dict[str, Any]:
    """A valid task document in the front end's format, with at most `max_dimensions` variables."""
    budget = [draw(st.integers(0, max_dimensions))]
    ids = itertools.count()

    def make_variable() -> bool:
        if budget[0] > 0 and draw(st.booleans()):
            budget[0] -= 1
            return True
        return False

    prompts: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 3))):
        if make_variable():
            values = draw(st.lists(fixed_prompts(), min_size=1, max_size=max_size))
            vid = f"v{next(ids)}"
            prompts.append(variable_prompt(values, vid) | {"type": draw(st.sampled_from(["freetext", "elementum"]))})
        else:
            prompts.append(draw(fixed_prompts()))
    anchor = freetext(draw(texts.filter(str.strip)))
    prompts.insert(draw(st.integers(0, len(prompts))), anchor)  # never a subtask without a prompt
    doc: dict[str, Any] = {"name": draw(texts.filter(str.strip)), "prompts": prompts}
    if draw(st.booleans()):
        doc["priority"] = draw(st.integers(0, 100))
    for name in PARAMETERS:
        how = draw(st.sampled_from(["omit", "null", "fixed", "variable"]))
        if how == "null":
            doc[name] = None
        elif how == "fixed" or (how == "variable" and not make_variable()):
            doc[name] = {"type": name, "value": draw(PARAMETER_VALUES[name]), "is_variable": False}
        elif how == "variable":
            values = draw(st.lists(PARAMETER_VALUES[name], min_size=1, max_size=max_size))
            doc[name] = variable(name, values, f"v{next(ids)}")
    return doc


def _raw_dimensions(doc: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """(where, raw values) of each variable, read straight from the document in the order of the task format."""
    dims = [(f"prompts[{i}]", p["variable_values"]) for i, p in enumerate(doc["prompts"]) if p.get("is_variable")]
    for name in PARAMETERS:
        param = doc.get(name)
        if isinstance(param, dict) and param.get("is_variable"):
            dims.append((name, param["variable_values"]))
    return dims


def _expected_parameter(name: str, raw: Any) -> Any:
    if name == "seed":
        return raw or None
    if name == "lumina_model_name":
        return raw if raw and raw.strip() else None
    if name == "lumina_cfg":
        return None if raw is None else float(raw)
    return raw


@given(valid_tasks())
@FAST
def test_expansion_properties(doc: dict[str, Any]) -> None:
    task = validate_task(doc)
    dims = _raw_dimensions(doc)
    sizes = [len(values) for _, values in dims]
    assert [d.field for d in task.dimensions] == [where for where, _ in dims]
    assert list(task.sizes) == sizes
    assert task.total_subtasks == math.prod(sizes)

    specs = list(expand(task))
    # count == product of sizes; order is last dimension fastest
    assert len(specs) == math.prod(sizes)
    assert [s.variable_indices for s in specs] == [list(c) for c in itertools.product(*map(range, sizes))]
    # ids unique and deterministic
    ids = [s.subtask_id("task") for s in specs]
    assert len(set(ids)) == len(ids)
    assert ids == [subtask_id("task", s.variable_indices) for s in expand(task)]

    for spec in specs:
        chosen = {where: values[i] for (where, values), i in zip(dims, spec.variable_indices, strict=True)}
        # the parameters carry the chosen values (or the fixed ones)
        for name in PARAMETERS:
            param = doc.get(name)
            if name in chosen:
                raw = chosen[name]
            elif isinstance(param, dict):
                raw = param.get("value")
            else:
                raw = {"ratio": "1:1", "use_polish": False, "is_lumina": False}.get(name)
            assert getattr(spec, name) == _expected_parameter(name, raw), name
        assert (spec.width, spec.height) == ratio_to_size(spec.ratio)
        # the prompts are the chosen ones, in prompt order, empties dropped
        expected = []
        for i, prompt in enumerate(doc["prompts"]):
            picked = chosen.get(f"prompts[{i}]", prompt)
            if str(picked.get("value") or "").strip():
                weight = picked.get("weight")
                expected.append((picked["type"], picked["value"], 1.0 if weight is None else float(weight)))
        assert [(p["type"], p["value"], p["weight"]) for p in spec.prompts] == expected
        assert spec == subtask_at(task, spec.variable_indices)


@given(valid_tasks())
@FAST
def test_document_round_trip_and_variables_map(doc: dict[str, Any]) -> None:
    task = validate_task(doc)
    stored = json.loads(json.dumps(task.to_document(), allow_nan=False))
    assert stored["total_images"] == task.total_subtasks
    assert Task.from_document(stored) == task
    vmap = stored["variables_map"]
    assert list(vmap) == [str(i) for i in range(len(task.dimensions))]
    for dim in task.dimensions:
        entry = vmap[str(dim.index)]
        assert set(entry) == {"variable_id", "variable_name", "variable_type", "values"}
        assert entry["variable_type"] == dim.variable_type
        assert len(entry["values"]) == dim.size


# --- robustness: junk in, TaskValidationError out ------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**400), 10**400),
    st.floats(),
    texts,
    st.sampled_from(["16:9", "freetext", "oc_vtoken_adaptor", "elementum", CHARACTER, "", "0:0"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(["type", "value", "is_variable", "variable_values", "x", "name"]), inner, max_size=5
        ),
    ),
    max_leaves=20,
)


def _validates_or_refuses(doc: Any) -> Task | None:
    try:
        task = validate_task(doc)
    except TaskValidationError as exc:
        assert isinstance(exc.field, str) and exc.field
        assert str(exc).startswith(exc.field + ": ")
        return None
    for spec in itertools.islice(expand(task), 5):
        assert isinstance(spec, SubtaskSpec)
    json.dumps(task.to_document(), allow_nan=False)
    return task


@given(json_values)
@FAST
def test_junk_is_refused_cleanly(doc: Any) -> None:
    _validates_or_refuses(doc)


@given(st.dictionaries(st.sampled_from(["name", "priority", "prompts", *PARAMETERS]), json_values, max_size=10))
@FAST
def test_junk_fields_are_refused_cleanly(doc: dict[str, Any]) -> None:
    _validates_or_refuses(doc)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON document (keys and list indices)."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


@given(valid_tasks(max_dimensions=2), st.data())
@FAST
def test_mutated_tasks_validate_or_are_refused(doc: dict[str, Any], data: st.DataObject) -> None:
    paths = _paths(doc)
    assume(paths)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(json_values)
    _validates_or_refuses(doc)


@given(st.one_of(st.text(max_size=60), st.binary(max_size=60)))
@FAST
def test_parse_task_junk_text(text: str | bytes) -> None:
    with contextlib.suppress(TaskValidationError):
        parse_task(text)


# --- the fields nietest does not use (Task.extra) -----------------------------------------------------


def test_extra_keeps_every_json_value_and_round_trips_through_the_stored_document() -> None:
    extra = {
        "user_id": 12345,
        "meta": {"ids": [1, -(2**63), 2**63 - 1], "ratio": 0.5, "ok": True, "none": None, "a.b": "dotted"},
        "tags": ["猫", "line\nbreak", ""],
        "status": "what the front end calls it",  # a stored task's field name, kept apart under `extra`
    }
    task = validate_task(minimal(**extra))
    assert task.extra == extra
    doc = task.to_document()
    assert doc["extra"] == extra and doc["extra"] is not task.extra
    doc["extra"]["meta"]["ids"].append(7)  # a fresh copy: the task is unchanged
    assert task.extra["meta"]["ids"] == [1, -(2**63), 2**63 - 1]
    assert Task.from_document(task.to_document()) == task
    assert Task.from_document(json.loads(json.dumps(task.to_document()))) == task
    assert validate_task(minimal()).to_document()["extra"] == {}


def test_a_stored_documents_own_fields_are_not_taken_for_extra() -> None:
    doc = {**validate_task(minimal(user_id="u")).to_document(), "id": "t1", "status": "pending", "owner": "u"}
    assert Task.from_document(doc).extra == {"user_id": "u"}
    del doc["extra"]  # a document stored before `extra` existed
    assert Task.from_document(doc).extra == {}


@pytest.mark.parametrize(
    ("extra", "field", "problem"),
    [
        ({"meta": {"ids": [1, 2, 3, 2**63]}}, "meta.ids[3]", "must be an integer within signed 64 bits"),
        ({"n": -(2**63) - 1}, "n", "within signed 64 bits"),
        ({"n": 10**400}, "n", "got an integer of 1329 bits"),
        ({"x": {"y": math.nan}}, "x.y", "must be a finite number, got nan"),
        ({"x": [math.inf]}, "x[0]", "must be a finite number"),
        ({"x": "\ud800"}, "x", "lone surrogate"),
        ({"x": {1: "a"}}, "x", "keys must be strings, got integer"),
        ({"x": {"$set": 1}}, 'x["$set"]', "must not start with $"),
        ({"$where": 1}, '["$where"]', "must not start with $"),
        ({"x": {"a\x00b": 1}}, "x", "must not contain U+0000"),
        ({"x": {"a b": {1, 2}}}, 'x["a b"]', "must be a JSON value, got set"),
    ],
)
def test_extra_that_a_store_cannot_keep_is_refused_naming_its_path(extra: dict, field: str, problem: str) -> None:
    with pytest.raises(TaskValidationError) as refused:
        validate_task(minimal(**extra))
    assert refused.value.field == field and problem in refused.value.problem


def test_extra_nests_at_most_32_levels() -> None:
    def nested(levels: int) -> Any:
        value: Any = 0
        for i in range(levels):
            value = {"k": value} if i % 2 else [value]
        return value

    assert validate_task(minimal(deep=nested(32))).extra["deep"] == nested(32)
    with pytest.raises(TaskValidationError, match="more than 32 levels deep") as refused:
        validate_task(minimal(deep=nested(33)))
    assert refused.value.field == "deep" + "[0].k" * 16  # the 33rd container


def test_parse_task_keeps_extra_and_input_fields_are_not_extra() -> None:
    text = json.dumps({**example(), "user_id": 7, "owner": "alice"})
    task = parse_task(text)
    assert task.extra == {"user_id": 7, "owner": "alice"}
    from nietest_daemon.domain.taskspec import INPUT_FIELDS

    assert set(INPUT_FIELDS) == {"name", "priority", "prompts", *PARAMETERS}
    assert set(example()) <= set(INPUT_FIELDS)
