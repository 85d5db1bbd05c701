"""Malformed tasks given to `nietest submit FILE`: refused, one message naming the field, nothing stored or enqueued.

Every case, generated (hypothesis) or hand-written, is a task file plus the field its refusal must
name: wrong types, missing fields, huge lists and strings, odd characters (lone surrogates, NUL
and other controls, line breaks and bidirectional formatting characters in one-line fields),
deep nesting, more subtasks than the cap, a top level that is not an object, text that is not
JSON and bytes that are not UTF-8. Each must end with exit status 2, nothing on stdout and one
stderr line `nietest: FILE: invalid task: FIELD: problem`, with NIETEST_HOME never created (so no
store) and the broker (a private valkey-server) holding no key at all (nothing enqueued).

The same cases run through the real command line (a subprocess, ~0.5 s each: a few dozen) and,
many more of them, in-process through `task_commands.submit`, the function the command calls.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nietest_daemon.core import settings as settings_module
from nietest_daemon.domain.taskspec import (
    DEFAULT_MAX_SUBTASKS,
    MAX_NAME_CHARS,
    MAX_PROMPTS,
    MAX_TEXT_CHARS,
    MAX_URL_CHARS,
    MAX_VARIABLE_VALUES,
    PROMPT_TYPES,
    parse_task,
)
from nietest_daemon.internals.dramatiq_redis import queue_stats
from nietest_daemon.programs import task_commands
from nietest_daemon.store import open_store_for
from nietest_daemon.testing import task_documents as taskdocs
from nietest_daemon.testing.daemon import NIETEST, clean_env
from nietest_daemon.testing.valkey import PrivateValkey

TOKEN = "tok-bad-tasks-0123456789"
CHARACTER = "5f3c1e2a-8b7d-4c6e-9a1f-2d3b4c5e6f70"
SUPPRESS = [
    HealthCheck.function_scoped_fixture,  # the harness is only read: every example must leave it empty
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.large_base_example,
]
IN_PROCESS = settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=SUPPRESS)
VIA_CLI = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=SUPPRESS)


# --- the base task and its fields -------------------------------------------------------------------


def base_task() -> dict[str, Any]:
    """A valid task touching every kind of field: a fixed freetext, a character, a variable prompt, a variable seed."""
    return taskdocs.task_document(
        "bad input",
        [
            taskdocs.fixed_prompt("1girl, portrait"),
            {
                "type": "oc_vtoken_adaptor",
                "value": CHARACTER,
                "uuid": CHARACTER,
                "name": "someone",
                "img_url": "https://example.invalid/a.png",
                "weight": 1.0,
                "is_variable": False,
            },
            taskdocs.variable_prompt("style", ["watercolor", "oil painting"], weights=[1.0, 1.2]),
        ],
        ratio="3:4",
        seed=taskdocs.variable_param("seed", [1, 2], variable_id="seeds"),
        lumina_model_name="lumina_2",
        lumina_cfg=5.5,
        lumina_step=30,
    )


Key = str | int
Place = tuple[Key, ...]


def field_of(keys: Place) -> str:
    """The validator's name for a place in the document: ("prompts", 2, "variable_id") -> prompts[2].variable_id."""
    text = ""
    for key in keys:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else key)
    return text


def with_value(keys: Place, value: Any) -> dict[str, Any]:
    doc = base_task()
    parent: Any = doc
    for key in keys[:-1]:
        parent = parent[key]
    parent[keys[-1]] = value
    return doc


def without(keys: Place) -> dict[str, Any]:
    doc = base_task()
    parent: Any = doc
    for key in keys[:-1]:
        parent = parent[key]
    del parent[keys[-1]]
    return doc


def encode(doc: Any, *, ascii_only: bool = True) -> bytes:
    """JSON bytes; NaN/Infinity written as their (non-standard) literals, which parse_task reads."""
    return json.dumps(doc, ensure_ascii=ascii_only).encode()


@dataclass(frozen=True)
class Case:
    """A task file and the field its refusal must name."""

    category: str
    content: bytes
    field: str
    label: str = ""

    def __repr__(self) -> str:  # hypothesis prints failing examples: keep huge contents readable
        head = self.content[:160]
        return f"Case({self.category!r}, field={self.field!r}, {len(self.content)} bytes: {head!r}..., {self.label!r})"


# --- hypothesis: wrong values per kind of field -------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
INTS = st.integers()
FLOATS = st.floats()  # NaN and the infinities included
BOOLS = st.booleans()
STRINGS = st.text(max_size=12)
LISTS = st.lists(scalars, max_size=3)
DICTS = st.dictionaries(st.text(max_size=5), scalars, max_size=3)


@st.composite
def deep(draw: st.DrawFn, container: str) -> Any:
    """A value nested `depth` arrays (or objects) deep: within the parser's limit, so the field is refused."""
    depth = draw(st.integers(20, 300))
    value: Any = draw(scalars)
    for _ in range(depth):
        value = [value] if container == "list" else {"k": value}
    return value


NOT_STRING = st.one_of(INTS, FLOATS, BOOLS, LISTS, DICTS, deep("list"), deep("dict"))
#: Wrong values of each kind of field (every one of them is refused by the field that holds it).
WRONG: dict[str, st.SearchStrategy[Any]] = {
    "text": st.one_of(NOT_STRING, st.sampled_from(["", "   "])),  # a required one-line string
    "optional_text": NOT_STRING,  # null is allowed
    "freetext": NOT_STRING,
    "variable_id": st.one_of(
        st.integers(max_value=-1), FLOATS, BOOLS, LISTS, DICTS, deep("list"), st.sampled_from(["", " "])
    ),
    "priority": st.one_of(st.integers(max_value=-1), st.integers(min_value=101), FLOATS, BOOLS, STRINGS, LISTS, DICTS),
    "weight": st.one_of(
        st.floats(min_value=100, exclude_min=True),
        st.floats(max_value=-100, exclude_max=True),
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.integers(min_value=101),
        BOOLS,
        STRINGS,
        LISTS,
        DICTS,
    ),
    "bool": st.one_of(st.none(), INTS, FLOATS, STRINGS, LISTS, DICTS),  # a fixed boolean's value
    "flag": st.one_of(INTS, FLOATS, STRINGS, LISTS, DICTS),  # is_variable: null means false
    "ratio": st.one_of(
        INTS,
        FLOATS,
        BOOLS,
        LISTS,
        DICTS,
        st.sampled_from(["", "16:9 ", "16:0", "0:9", "101:1", "wide", "16/9", "1:1:1", "٣:٤", "1.5:1", "-1:2"]),
    ),
    "seed": st.one_of(
        st.integers(max_value=-1), st.integers(min_value=2**53), FLOATS, BOOLS, STRINGS, LISTS, DICTS, deep("list")
    ),
    "cfg": st.one_of(
        st.floats(max_value=-1e-9),  # not -0.0: that is 0
        st.floats(min_value=100, exclude_min=True),
        st.just(math.nan),
        BOOLS,
        STRINGS,
        LISTS,
        DICTS,
    ),
    "step": st.one_of(st.integers(max_value=0), st.integers(min_value=1001), FLOATS, BOOLS, STRINGS, LISTS, DICTS),
    "prompt_type": st.one_of(INTS, FLOATS, BOOLS, LISTS, DICTS, STRINGS.filter(lambda s: s not in PROMPT_TYPES)),
    "object": st.one_of(st.none(), INTS, FLOATS, BOOLS, STRINGS, LISTS, deep("list")),  # a prompt
    "parameter": st.one_of(INTS, FLOATS, BOOLS, STRINGS, LISTS, deep("list")),  # null: the default
    "array": st.one_of(st.none(), INTS, FLOATS, BOOLS, STRINGS, DICTS, deep("dict"), st.just([])),
}

#: (place, kind): every field of the base task with a kind of wrong value.
TARGETS: list[tuple[Place, str]] = [
    (("name",), "text"),
    (("priority",), "priority"),
    (("prompts",), "array"),
    (("prompts", 0), "object"),
    (("prompts", 0, "type"), "prompt_type"),
    (("prompts", 0, "value"), "freetext"),
    (("prompts", 0, "weight"), "weight"),
    (("prompts", 0, "is_variable"), "flag"),
    (("prompts", 1, "type"), "prompt_type"),
    (("prompts", 1, "value"), "optional_text"),
    (("prompts", 1, "uuid"), "optional_text"),
    (("prompts", 1, "name"), "optional_text"),
    (("prompts", 1, "img_url"), "optional_text"),
    (("prompts", 1, "weight"), "weight"),
    (("prompts", 2, "is_variable"), "flag"),
    (("prompts", 2, "variable_id"), "variable_id"),
    (("prompts", 2, "variable_name"), "text"),
    (("prompts", 2, "variable_values"), "array"),
    (("prompts", 2, "variable_values", 1), "object"),
    (("prompts", 2, "variable_values", 0, "type"), "prompt_type"),
    (("prompts", 2, "variable_values", 1, "value"), "freetext"),
    (("prompts", 2, "variable_values", 1, "weight"), "weight"),
    (("ratio",), "parameter"),
    (("ratio", "value"), "ratio"),
    (("ratio", "type"), "optional_text"),
    (("ratio", "format"), "optional_text"),
    (("ratio", "is_variable"), "flag"),
    (("seed",), "parameter"),
    (("seed", "variable_id"), "variable_id"),
    (("seed", "variable_name"), "text"),
    (("seed", "variable_values"), "array"),
    (("seed", "variable_values", 1), "seed"),
    (("use_polish", "value"), "bool"),
    (("is_lumina", "value"), "bool"),
    (("lumina_model_name", "value"), "optional_text"),
    (("lumina_cfg", "value"), "cfg"),
    (("lumina_step", "value"), "step"),
]

#: Fields whose absence is an error (seed.value, say, is not: it is nullable).
REQUIRED: list[Place] = [
    ("name",),
    ("prompts",),
    ("prompts", 0, "type"),
    ("prompts", 0, "value"),
    ("prompts", 1, "type"),
    ("prompts", 1, "value"),
    ("prompts", 1, "name"),
    ("prompts", 2, "variable_id"),
    ("prompts", 2, "variable_name"),
    ("prompts", 2, "variable_values"),
    ("prompts", 2, "variable_values", 0, "type"),
    ("prompts", 2, "variable_values", 1, "value"),
    ("ratio", "value"),
    ("use_polish", "value"),
    ("is_lumina", "value"),
    ("seed", "variable_id"),
    ("seed", "variable_name"),
    ("seed", "variable_values"),
]

#: String fields and whether they are free text (may span lines, may hold direction marks).
STRING_FIELDS: list[tuple[Place, bool]] = [
    (("name",), False),
    (("prompts", 0, "value"), True),
    (("prompts", 1, "name"), False),
    (("prompts", 1, "img_url"), False),
    (("prompts", 2, "variable_id"), False),
    (("prompts", 2, "variable_name"), False),
    (("prompts", 2, "variable_values", 1, "value"), True),
    (("seed", "variable_name"), False),
    (("ratio", "format"), False),
    (("lumina_model_name", "value"), False),
]
SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
CONTROLS = st.one_of(st.integers(0x00, 0x1F).filter(lambda c: chr(c) not in "\t\n\r"), st.integers(0x7F, 0x9F)).map(chr)
LINE_BREAKS = st.sampled_from("\t\n\r\u2028\u2029")
BIDI = st.sampled_from("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
PLAIN = st.text(st.characters(codec="utf-8", categories=["L", "N", "Zs"]), max_size=15)


@st.composite
def wrong_type_cases(draw: st.DrawFn) -> Case:
    keys, kind = draw(st.sampled_from(TARGETS))
    value = draw(WRONG[kind])
    return Case("wrong type", encode(with_value(keys, value)), field_of(keys), f"{kind} = {value!r}"[:80])


@st.composite
def missing_cases(draw: st.DrawFn) -> Case:
    keys = draw(st.sampled_from(REQUIRED))
    return Case("missing", encode(without(keys)), field_of(keys))


@st.composite
def huge_cases(draw: st.DrawFn) -> Case:
    what = draw(st.sampled_from(["prompts", "prompt values", "seed values", "name", "freetext", "character", "url"]))
    if what == "prompts":
        n = draw(st.integers(MAX_PROMPTS + 1, MAX_PROMPTS * 20))
        prompts = [{"type": "freetext", "value": f"p{i}", "weight": 1.0} for i in range(n)]
        return Case("huge", encode(with_value(("prompts",), prompts)), "prompts", f"{n} prompts")
    if what in ("prompt values", "seed values"):
        n = draw(st.integers(MAX_VARIABLE_VALUES + 1, MAX_VARIABLE_VALUES * 3))
        if what == "seed values":
            keys: Place = ("seed", "variable_values")
            values: list[Any] = list(range(n))
        else:
            keys = ("prompts", 2, "variable_values")
            values = [{"type": "freetext", "value": f"v{i}"} for i in range(n)]
        return Case("huge", encode(with_value(keys, values)), field_of(keys), f"{n} values")
    keys, limit = {
        "name": (("name",), MAX_NAME_CHARS),
        "freetext": (("prompts", 0, "value"), MAX_TEXT_CHARS),
        "character": (("prompts", 1, "name"), MAX_NAME_CHARS),
        "url": (("prompts", 1, "img_url"), MAX_URL_CHARS),
    }[what]
    n = draw(st.integers(limit + 1, limit * 50))
    return Case("huge", encode(with_value(keys, "x" * n)), field_of(keys), f"{n} characters")


@st.composite
def unicode_cases(draw: st.DrawFn) -> Case:
    keys, free_text = draw(st.sampled_from(STRING_FIELDS))
    odd = draw(st.one_of(SURROGATES, CONTROLS) if free_text else st.one_of(SURROGATES, CONTROLS, LINE_BREAKS, BIDI))
    text = draw(PLAIN)
    at = draw(st.integers(0, len(text)))
    value = text[:at] + odd + text[at:]
    # Raw UTF-8 or \u escapes (a lone surrogate can only be escaped: its raw bytes are not UTF-8).
    ascii_only = True if "\ud800" <= odd <= "\udfff" else draw(st.booleans())
    content = encode(with_value(keys, value), ascii_only=ascii_only)
    return Case("odd unicode", content, field_of(keys), f"U+{ord(odd):04X}")


@st.composite
def nesting_cases(draw: st.DrawFn) -> Case:
    """Nesting past any parser's depth: the whole file, or an unknown field, is refused as not JSON."""
    depth = draw(st.integers(5_000, 200_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    nested = opener * depth + "1" + closer * depth
    if draw(st.booleans()):
        return Case("deep nesting", nested.encode(), "task", f"depth {depth}")
    doc = encode(base_task())
    return Case("deep nesting", doc[:-1] + b', "extra": ' + nested.encode() + b"}", "task", f"depth {depth} inside")


@st.composite
def subtask_cap_cases(draw: st.DrawFn) -> Case:
    """Three variables (a prompt, ratio, seed), each within its own limit, whose product is over the cap."""
    cap = DEFAULT_MAX_SUBTASKS
    n1 = draw(st.integers(1, MAX_VARIABLE_VALUES))
    n2 = draw(st.integers(max(1, math.ceil((cap // MAX_VARIABLE_VALUES + 1) / n1)), MAX_VARIABLE_VALUES))
    low = 1 if n1 * n2 > cap else cap // (n1 * n2) + 1
    n3 = draw(st.integers(low, MAX_VARIABLE_VALUES))
    doc = base_task()
    doc["prompts"] = [
        {"type": "freetext", "value": "anchor"},
        {
            "type": "freetext",
            "is_variable": True,
            "variable_id": "p",
            "variable_name": "p",
            "variable_values": [{"type": "freetext", "value": f"v{i}"} for i in range(n1)],
        },
    ]
    ratios = ["1:1", "3:4", "4:3", "16:9", "9:16"]
    doc["ratio"] = taskdocs.variable_param("ratio", [ratios[i % len(ratios)] for i in range(n2)], variable_id="r")
    doc["seed"] = taskdocs.variable_param("seed", list(range(n3)), variable_id="s")
    # The validator names the variable at which the running product first passes the cap.
    field = "ratio.variable_values" if n1 * n2 > cap else "seed.variable_values"
    return Case("too many subtasks", encode(doc), field, f"{n1} x {n2} x {n3}")


NOT_OBJECTS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.lists(scalars, max_size=4)
)


@st.composite
def top_level_cases(draw: st.DrawFn) -> Case:
    value = draw(st.one_of(NOT_OBJECTS, st.just([base_task()])))
    return Case("not an object", encode(value), "task", repr(value)[:60])


@st.composite
def not_json_cases(draw: st.DrawFn) -> Case:
    doc = encode(base_task())
    how = draw(st.sampled_from(["truncated", "garbage after", "garbage before", "single quotes", "comment", "empty"]))
    if how == "truncated":
        content = doc[: draw(st.integers(0, len(doc) - 1))]
    elif how == "garbage after":
        content = doc + draw(st.sampled_from([b"}", b",", b"x", b"{}", b"]"]))
    elif how == "garbage before":
        content = draw(st.sampled_from([b"x", b",", b"]", b"//"])) + doc
    elif how == "single quotes":
        content = doc.replace(b'"', b"'")
    elif how == "comment":
        content = doc[:1] + b" /* a comment */ " + doc[1:]
    else:
        content = draw(st.sampled_from([b"", b"  \n\t ", b"\xef\xbb\xbf"]))
    return Case("not JSON", content, "task", how)


@st.composite
def not_utf8_cases(draw: st.DrawFn) -> Case:
    doc = json.dumps(base_task(), ensure_ascii=False)
    how = draw(st.sampled_from(["bad byte", "encoded surrogate", "overlong", "cut sequence", "utf-16", "latin-1"]))
    if how in ("utf-16", "latin-1"):
        encoding = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32"])) if how == "utf-16" else "latin-1"
        return Case("not UTF-8", doc.replace("bad input", "café bad input").encode(encoding), "task", encoding)
    bad = {
        "bad byte": draw(st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc0"])),
        "encoded surrogate": b"\xed" + bytes([draw(st.integers(0xA0, 0xBF))]) + b"\x80",  # CESU-8: U+D800..U+DFFF
        "overlong": draw(st.sampled_from([b"\xc0\xaf", b"\xe0\x80\xaf", b"\xc1\xbf"])),
        "cut sequence": draw(st.sampled_from([b"\xe6\x97", b"\xf0\x9f\x98", b"\xc3"])),
    }[how]
    raw = doc.encode()
    at = raw.index(b"bad input") + draw(st.integers(0, len("bad input")))
    return Case("not UTF-8", raw[:at] + bad + raw[at:], "task", how)


BAD_TASKS = st.one_of(
    wrong_type_cases(),
    missing_cases(),
    huge_cases(),
    unicode_cases(),
    nesting_cases(),
    subtask_cap_cases(),
    top_level_cases(),
    not_json_cases(),
    not_utf8_cases(),
)


# --- hand-written cases: at least one per category ---------------------------------------------------


def _deep_field(depth: int) -> bytes:
    return encode(with_value(("prompts", 0, "value"), json.loads("[" * depth + "]" * depth)))


def _cap(n1: int, n2: int, n3: int) -> bytes:
    doc = base_task()
    doc["prompts"][2]["variable_values"] = [{"type": "freetext", "value": f"v{i}"} for i in range(n1)]
    doc["ratio"] = taskdocs.variable_param("ratio", ["1:1"] * n2, variable_id="r")
    doc["seed"] = taskdocs.variable_param("seed", list(range(n3)), variable_id="s")
    return encode(doc)


def _nested_variable() -> dict[str, Any]:
    doc = base_task()
    inner = {**base_task()["prompts"][2], "variable_id": "inner"}
    doc["prompts"][2]["variable_values"][0] = inner
    return doc


_DOC_TEXT = json.dumps(base_task(), ensure_ascii=False)
_DOC = _DOC_TEXT.encode()

CASES: list[Case] = [
    Case("wrong type", encode(with_value(("name",), 42)), "name"),
    Case("wrong type", encode(with_value(("priority",), "high")), "priority"),
    Case("wrong type", encode(with_value(("priority",), 1.0)), "priority"),
    Case("wrong type", encode(with_value(("prompts",), {"0": "a cat"})), "prompts"),
    Case("wrong type", encode(with_value(("prompts", 0), "a cat")), "prompts[0]"),
    Case("wrong type", encode(with_value(("prompts", 0, "value"), ["a", "cat"])), "prompts[0].value"),
    Case("wrong type", encode(with_value(("prompts", 0, "weight"), "heavy")), "prompts[0].weight"),
    Case("wrong type", encode(with_value(("prompts", 0, "weight"), math.nan)), "prompts[0].weight"),
    Case("wrong type", encode(with_value(("prompts", 2, "is_variable"), "yes")), "prompts[2].is_variable"),
    Case(
        "wrong type", encode(with_value(("prompts", 2, "variable_values", 1), "oil")), "prompts[2].variable_values[1]"
    ),
    Case("wrong type", encode(with_value(("ratio",), "16:9")), "ratio"),
    Case("wrong type", encode(with_value(("ratio", "value"), 1.5)), "ratio.value"),
    Case("wrong type", encode(with_value(("seed", "variable_values", 1), "7")), "seed.variable_values[1]"),
    Case("wrong type", encode(with_value(("use_polish", "value"), "false")), "use_polish.value"),
    Case("wrong type", encode(with_value(("is_lumina", "value"), 1)), "is_lumina.value"),
    Case("wrong type", encode(with_value(("lumina_cfg", "value"), math.inf)), "lumina_cfg.value"),
    Case("wrong type", encode(with_value(("lumina_step", "value"), 30.5)), "lumina_step.value"),
    Case("wrong type", encode(with_value(("prompts", 1, "type"), "image")), "prompts[1].type"),
    Case("wrong type", encode(with_value(("prompts", 1, "value"), "not-a-uuid")), "prompts[1].value"),
    Case("missing", encode(without(("name",))), "name"),
    Case("missing", encode(without(("prompts",))), "prompts"),
    Case("missing", encode(without(("prompts", 1, "type"))), "prompts[1].type"),
    Case("missing", encode(without(("prompts", 1, "name"))), "prompts[1].name"),
    Case("missing", encode(without(("prompts", 2, "variable_values"))), "prompts[2].variable_values"),
    Case("missing", encode(without(("use_polish", "value"))), "use_polish.value"),
    Case("missing", encode(without(("seed", "variable_id"))), "seed.variable_id"),
    Case("missing", encode(with_value(("prompts",), [])), "prompts"),
    Case("huge", encode(with_value(("prompts",), [{"type": "freetext", "value": "x"}] * 5000)), "prompts"),
    Case("huge", encode(with_value(("seed", "variable_values"), list(range(100_000)))), "seed.variable_values"),
    Case("huge", encode(with_value(("name",), "n" * 1_000_000)), "name"),
    Case("huge", encode(with_value(("prompts", 0, "value"), "x" * (MAX_TEXT_CHARS + 1))), "prompts[0].value"),
    Case("huge", b'{"name": "' + b"x" * task_commands.MAX_TASK_FILE_BYTES + b'"}', "task", "file over the size cap"),
    Case("odd unicode", encode(with_value(("name",), "bad \ud800 name")), "name"),
    Case("odd unicode", encode(with_value(("name",), "\udfff")), "name"),
    Case("odd unicode", encode(with_value(("prompts", 0, "value"), "a cat\ud83d")), "prompts[0].value"),
    Case("odd unicode", encode(with_value(("prompts", 0, "value"), "a\x00cat")), "prompts[0].value"),
    Case("odd unicode", encode(with_value(("prompts", 2, "variable_name"), "sty\x00le")), "prompts[2].variable_name"),
    Case("odd unicode", encode(with_value(("prompts", 1, "name"), "\x1b[31mred")), "prompts[1].name"),
    Case("odd unicode", encode(with_value(("name",), "invoice \u202egnp.exe"), ascii_only=False), "name"),
    Case("odd unicode", encode(with_value(("prompts", 2, "variable_id"), "style\u200f")), "prompts[2].variable_id"),
    Case("odd unicode", encode(with_value(("name",), "two\nlines")), "name"),
    Case("odd unicode", encode(with_value(("lumina_model_name", "value"), "lumina\x85")), "lumina_model_name.value"),
    Case("deep nesting", _deep_field(250), "prompts[0].value"),
    Case("deep nesting", b"[" * 100_000 + b"]" * 100_000, "task"),
    Case("deep nesting", _DOC[:-1] + b', "extra": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}", "task"),
    Case("deep nesting", encode(_nested_variable()), "prompts[2].variable_values[0].is_variable"),
    Case("too many subtasks", _cap(300, 200, 2), "ratio.variable_values"),
    Case("too many subtasks", _cap(100, 100, 6), "seed.variable_values"),
    Case("too many subtasks", encode(with_value(("seed", "variable_id"), "style")), "seed.variable_id"),
    Case("not an object", b"[]", "task"),
    Case("not an object", b'"a task"', "task"),
    Case("not an object", b"null", "task"),
    Case("not an object", b"42", "task"),
    Case("not an object", encode([base_task()]), "task"),
    Case("not JSON", b"", "task"),
    Case("not JSON", _DOC[:-1], "task"),
    Case("not JSON", _DOC + b"}", "task"),
    Case("not JSON", _DOC.replace(b'"', b"'"), "task"),
    Case("not JSON", b"name: bad input\nprompts: []\n", "task", "YAML"),
    Case("not UTF-8", _DOC.replace(b"bad input", b"bad \xff input"), "task"),
    Case("not UTF-8", _DOC.replace(b"bad input", b"bad \xed\xa0\x80 input"), "task", "CESU-8 surrogate"),
    Case("not UTF-8", _DOC_TEXT.encode("utf-16"), "task"),
    Case("not UTF-8", _DOC_TEXT.replace("bad input", "café").encode("latin-1"), "task"),
]
CATEGORIES = sorted({case.category for case in CASES})


# --- the harness -------------------------------------------------------------------------------------


class Harness:
    """NIETEST_HOME (never created by a refused task) and a private broker (never written to)."""

    def __init__(self, root: Path, valkey: PrivateValkey) -> None:
        self.root = root
        self.home = root / "home"
        self.env = clean_env(NIETEST_HOME=str(self.home), BROKER_REDIS_URL=valkey.url, NIETA_XTOKEN=TOKEN)
        self.settings = settings_module.load(self.env)
        self.redis = redis.Redis.from_url(valkey.url)
        self.files = root / "tasks"
        self.files.mkdir()
        self.count = 0

    def write(self, content: bytes) -> Path:
        self.count += 1
        path = self.files / f"task-{self.count}.json"
        path.write_bytes(content)
        return path

    def submit_in_process(self, path: Path) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = task_commands.submit(self.settings, str(path), wait=False)
        return code, out.getvalue(), err.getvalue()

    def submit_cli(self, path: Path) -> tuple[int, str, str]:
        result = subprocess.run(
            [*NIETEST, "submit", str(path)], env=self.env, capture_output=True, timeout=60, cwd=self.root
        )
        # strict: whatever the task held, the message itself is UTF-8
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    def check(self, case: Case, submit: Callable[[Path], tuple[int, str, str]]) -> str:
        path = self.write(case.content)
        try:
            code, out, err = submit(path)
        finally:
            path.unlink()
        assert code == 2, (case, code, out, err)
        assert out == "", (case, out)
        lines = err.splitlines()
        assert len(lines) == 1 and err.endswith("\n"), (case, err)
        prefix = f"nietest: {path}: invalid task: {case.field}: "
        assert lines[0].startswith(prefix), (case, lines[0])
        problem = lines[0][len(prefix) :]
        assert problem.strip() and len(lines[0]) < 400, (case, lines[0])
        assert lines[0].isprintable(), (case, lines[0])  # no raw control or direction character echoed
        self.assert_nothing_stored_or_enqueued()
        return problem

    def assert_nothing_stored_or_enqueued(self) -> None:
        assert not (self.settings.data_dir / "nietest.sqlite3").exists()
        assert not self.home.exists(), sorted(str(p) for p in self.home.rglob("*"))
        assert self.redis.dbsize() == 0, self.redis.keys("*")[:10]


@pytest.fixture
def harness(short_tmp: Path, valkey: PrivateValkey) -> Iterator[Harness]:
    h = Harness(short_tmp, valkey)
    yield h
    h.redis.close()


# --- the tests ---------------------------------------------------------------------------------------


@given(case=BAD_TASKS)
@IN_PROCESS
def test_generated_bad_tasks_are_refused_in_process(harness: Harness, case: Case) -> None:
    event(case.category)  # `pytest --hypothesis-show-statistics` shows the mix
    harness.check(case, harness.submit_in_process)


@given(case=BAD_TASKS)
@VIA_CLI
def test_generated_bad_tasks_are_refused_by_nietest_submit(harness: Harness, case: Case) -> None:
    event(case.category)
    harness.check(case, harness.submit_cli)


def test_hand_written_bad_tasks_are_refused_in_process(harness: Harness) -> None:
    # One loop, one broker: a failure names its case (Harness.check puts it in every assertion).
    for case in CASES:
        harness.check(case, harness.submit_in_process)


@pytest.mark.parametrize("category", CATEGORIES)
def test_one_bad_task_of_each_category_is_refused_by_nietest_submit(harness: Harness, category: str) -> None:
    case = next(c for c in CASES if c.category == category)
    harness.check(case, harness.submit_cli)


def test_messages_say_what_is_wrong(harness: Harness) -> None:
    """The problem text, not just the field: what was found, where, and the limit."""
    expected = {
        "bad \ud800 name": "must be valid Unicode text, found a lone surrogate U+D800 at position 5",
        "a\x00b": "must not contain control characters, found U+0000 at position 2",
        "ab\u202ec": "must not contain bidirectional formatting characters, found U+202E at position 3",
        "two\nlines": "must be a single line, found a tab or line break U+000A at position 4",
    }
    for name, problem in expected.items():
        assert (
            harness.check(Case("odd unicode", encode(with_value(("name",), name)), "name"), harness.submit_in_process)
            == problem
        )
    bad_byte = Case("not UTF-8", _DOC.replace(b"bad input", b"bad \xff input"), "task")
    offset = _DOC.index(b"bad input") + 4
    assert harness.check(bad_byte, harness.submit_in_process) == (
        f"is not UTF-8 text: byte 0xff at offset {offset} (invalid start byte)"
    )
    cap = harness.check(
        Case("too many subtasks", _cap(300, 200, 2), "ratio.variable_values"), harness.submit_in_process
    )
    assert cap == "the task would expand to 120000 subtasks (300 x 200 x 2), over the cap of 50000"
    assert harness.check(CASES[0], harness.submit_in_process) == "must be a string, got integer"
    huge = next(c for c in CASES if c.label == "file over the size cap")
    assert harness.check(huge, harness.submit_in_process) == "larger than 20 MB"


def test_a_file_without_a_size_is_read_only_up_to_the_cap(harness: Harness) -> None:
    """/dev/zero reports size 0: submit reads one byte past the cap and stops (it used to read forever)."""
    code, out, err = harness.submit_in_process(Path("/dev/zero"))
    assert (code, out, err) == (2, "", "nietest: /dev/zero: invalid task: task: larger than 20 MB\n")
    harness.assert_nothing_stored_or_enqueued()


def test_unusual_but_valid_text_is_accepted() -> None:
    """The other side of the line: what the refusals above must not catch."""
    doc = base_task()
    doc["name"] = "夜桜 🌸 👩‍👩‍👧 test ñ"  # CJK, emoji, a zero-width-joiner sequence
    doc["prompts"][0]["value"] = "line one\nline two\twith a tab\r\n\u05e9\u05dc\u05d5\u05dd \u200fמרכאות\u202e"
    doc["prompts"][2]["variable_values"][1]["value"] = "مرحبا\u200f"  # right-to-left free text with a mark
    task = parse_task(encode(doc, ascii_only=False))
    assert task.name == doc["name"]
    assert task.prompts[0]["value"] == doc["prompts"][0]["value"]
    assert parse_task(b"\xef\xbb\xbf" + encode(doc)).name == doc["name"]  # a UTF-8 BOM is fine
    # an escaped surrogate *pair* is one character (U+1F600), not two lone surrogates
    escaped = json.dumps(with_value(("name",), "smile \\ud83d\\ude00")).replace("\\\\", "\\")
    assert parse_task(escaped.encode()).name == "smile \U0001f600"


def test_a_valid_task_is_stored_and_enqueued(harness: Harness) -> None:
    """The control: the checks above would see a stored or enqueued task."""
    path = harness.write(encode(base_task()))
    code, out, err = harness.submit_cli(path)
    assert code == 0, err
    task_id = out.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", task_id), out
    assert harness.home.exists() and harness.redis.dbsize() > 0
    assert queue_stats(harness.redis, harness.settings.queue("master").name)["ready"] == 1
    store = open_store_for(harness.settings)
    try:
        stored = store.get_task(task_id)
        assert stored is not None and stored["status"] == "pending" and stored["total_images"] == 4
    finally:
        store.close()
    with pytest.raises(AssertionError):
        harness.assert_nothing_stored_or_enqueued()


def test_every_case_changes_one_field_of_a_valid_task() -> None:
    """The base task is valid and every place the generators change exists in it, so the field a
    refusal must name is the one that was changed (not some other field that was already wrong)."""
    assert parse_task(encode(base_task())).total_subtasks == 4
    for keys in [k for k, _ in TARGETS] + REQUIRED + [k for k, _ in STRING_FIELDS]:
        parent: Any = base_task()
        for key in keys[:-1]:
            parent = parent[key]
        assert keys[-1] in parent if isinstance(parent, dict) else keys[-1] < len(parent), keys
