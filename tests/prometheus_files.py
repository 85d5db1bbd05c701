"""The Prometheus and Grafana files in etc/, as tests see them: the metric names of the contract, the
dashboard's queries, the alert rules and their unit tests, and the metric names a PromQL expression uses.

A plain helper module (no fixtures): tests/test_prometheus_rules.py checks the files with promtool, and
the end-to-end test against a real Prometheus can run `dashboard_queries()` through its query API.
PyYAML is not a dependency, so `load_yaml` reads the subset of YAML these files are written in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "etc" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES_FILE = PROMETHEUS_DIR / "nietest-rules.yml"
RULES_TEST_FILE = PROMETHEUS_DIR / "nietest-rules.test.yml"
DASHBOARD_FILE = ROOT / "etc" / "grafana" / "nietest-dashboard.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

#: The metric names of the contract (issue 11) and their types: the only names the rules and the
#: dashboard may use, with `up` (added by Prometheus to every scrape job).
CONTRACT_METRICS: dict[str, str] = {
    "nietest_queue_messages": "gauge",
    "nietest_process_up": "gauge",
    "nietest_process_start_time_seconds": "gauge",
    "nietest_process_restarts_total": "counter",
    "nietest_job_slots_in_use": "gauge",
    "nietest_job_slots_capacity": "gauge",
    "nietest_subtasks_waiting": "gauge",
    "nietest_subtasks_finished_total": "counter",
    "nietest_subtask_failures_total": "counter",
    "nietest_image_job_seconds": "histogram",
    "nietest_api_requests_total": "counter",
    "nietest_api_request_seconds": "histogram",
    "nietest_tasks": "gauge",
    "nietest_feishu_messages_total": "counter",
    "nietest_alerts_total": "counter",
    "nietest_broker_up": "gauge",
    "nietest_store_up": "gauge",
    "nietest_supervisor_up": "gauge",
}

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

#: The series names a query may select: every gauge and counter, a histogram's `_bucket`, `_sum` and
#: `_count` series (never its bare name, which is no series), and `up`.
QUERYABLE_METRICS: frozenset[str] = frozenset(
    [name for name, kind in CONTRACT_METRICS.items() if kind != "histogram"]
    + [name + suffix for name, kind in CONTRACT_METRICS.items() if kind == "histogram" for suffix in HISTOGRAM_SUFFIXES]
    + ["up"]
)

#: Grafana's interval macros, replaced by a plain duration before a query goes to Prometheus.
GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


# --- the dashboard ----------------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def dashboard_panels(dashboard: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every panel but rows, including those inside collapsed rows, in order."""
    dashboard = dashboard if dashboard is not None else load_dashboard()
    found: list[dict[str, Any]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            if panel.get("type") == "row":
                walk(panel.get("panels", []))
            else:
                found.append(panel)

    walk(dashboard.get("panels", []))
    return found


def to_promql(expr: str) -> str:
    """A dashboard expression with Grafana's macros replaced: what Prometheus would be asked."""
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def dashboard_queries() -> list[str]:
    """Every panel target's expression in etc/grafana/nietest-dashboard.json, as PromQL."""
    return [
        to_promql(target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if target.get("expr", "").strip()
    ]


# --- the rules and their unit tests ---------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of etc/prometheus/nietest-rules.yml (`alert`, `expr`, `for`, `labels`, ...)."""
    return [rule for group in load_yaml(RULES_FILE)["groups"] for rule in group["rules"] if "alert" in rule]


def alert_rule_cases() -> list[tuple[str, str, bool]]:
    """Every case of etc/prometheus/nietest-rules.test.yml: (test name, alertname, whether alerts are expected)."""
    cases = []
    for test in load_yaml(RULES_TEST_FILE)["tests"]:
        for case in test.get("alert_rule_test") or []:
            cases.append((test.get("name", ""), case["alertname"], bool(case.get("exp_alerts"))))
    return cases


# --- the metric names of a PromQL expression -------------------------------------------------------

_KEYWORDS = frozenset(
    ("and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset")
    + ("inf", "nan", "start", "end")
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-zA-Z]+")
_NUMBER = re.compile(r"(?<![\w:.])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (its functions, keywords and labels left out)."""
    text = _STRING.sub('""', to_promql(expr))
    names = {m.group(1) for m in re.finditer(r'__name__\s*=\s*"([^"]*)"', to_promql(expr))}
    text = _MATCHERS.sub("{}", text)
    text = _BRACKETS.sub("[]", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        if word in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue  # a keyword, or a function or aggregation called here
        names.add(word)
    return names


# --- a YAML subset -----------------------------------------------------------------------------------

_KEY = re.compile(r"""^(?P<key>[A-Za-z_][\w.\-]*|"[^"]*"|'[^']*')\s*:(?:\s+|$)(?P<rest>.*)$""")


class YamlSubsetError(ValueError):
    pass


def load_yaml(path: Path) -> Any:
    """Parse a YAML file written in block style: mappings, sequences, quoted and plain scalars, `|` and
    `>` block scalars, `[]`/`{}` and one-line flow lists. Scalars stay strings. Anything else is an error.
    """
    lines = path.read_text().splitlines()
    parser = _Parser(lines, str(path))
    start = parser.next_content(0)
    if start is None:
        return None
    value, end = parser.node(start)
    end = parser.next_content(end)
    if end is not None:
        raise YamlSubsetError(f"{path}:{end + 1}: unexpected content")
    return value


class _Parser:
    def __init__(self, lines: list[str], name: str) -> None:
        self.lines = lines
        self.name = name

    def fail(self, i: int, why: str) -> YamlSubsetError:
        return YamlSubsetError(f"{self.name}:{i + 1}: {why}: {self.lines[i]!r}")

    def next_content(self, i: int) -> int | None:
        while i < len(self.lines):
            stripped = self.lines[i].strip()
            if stripped and not stripped.startswith("#"):
                if "\t" in self.lines[i][: len(self.lines[i]) - len(self.lines[i].lstrip())]:
                    raise self.fail(i, "tab in indentation")
                return i
            i += 1
        return None

    def indent_of(self, i: int) -> int:
        return len(self.lines[i]) - len(self.lines[i].lstrip(" "))

    def node(self, i: int) -> tuple[Any, int]:
        indent = self.indent_of(i)
        text = self.lines[i].strip()
        if text == "-" or text.startswith("- "):
            return self.sequence(i, indent)
        if _KEY.match(text):
            return self.mapping(i, indent)
        value = self.scalar(text, i)
        following = self.next_content(i + 1)
        if following is not None and self.indent_of(following) > indent:
            raise self.fail(following, "multi-line plain or quoted scalars are not supported")
        return value, i + 1

    def sequence(self, i: int, indent: int) -> tuple[list[Any], int]:
        items: list[Any] = []
        cursor: int | None = i
        while cursor is not None and self.indent_of(cursor) == indent:
            text = self.lines[cursor].strip()
            if not (text == "-" or text.startswith("- ")):
                break
            if text == "-":
                child = self.next_content(cursor + 1)
                if child is None or self.indent_of(child) <= indent:
                    items.append(None)
                    cursor = self.next_content(cursor + 1)
                    continue
                value, end = self.node(child)
            else:
                # "- content": the content is a node at the column after the dash.
                line = self.lines[cursor]
                dash = line.index("-")
                self.lines[cursor] = line[:dash] + " " + line[dash + 1 :]
                value, end = self.node(cursor)
            items.append(value)
            cursor = self.next_content(end)
        return items, (cursor if cursor is not None else len(self.lines))

    def mapping(self, i: int, indent: int) -> tuple[dict[str, Any], int]:
        result: dict[str, Any] = {}
        cursor: int | None = i
        while cursor is not None and self.indent_of(cursor) == indent:
            text = self.lines[cursor].strip()
            match = _KEY.match(text)
            if match is None:
                if text == "-" or text.startswith("- "):
                    break
                raise self.fail(cursor, "expected `key: value`")
            key = match.group("key").strip("'\"")
            if key in result:
                raise self.fail(cursor, f"duplicate key {key!r}")
            rest = match.group("rest").strip()
            if rest[:1] not in ('"', "'"):
                rest = _strip_comment(rest).strip()
            if rest[:1] in ("|", ">"):
                result[key], end = self.block_scalar(cursor, indent, rest)
            elif rest:
                result[key] = self.scalar(rest, cursor)
                end = cursor + 1
                following = self.next_content(end)
                if following is not None and self.indent_of(following) > indent:
                    raise self.fail(following, "multi-line plain or quoted scalars are not supported")
            else:
                child = self.next_content(cursor + 1)
                child_text = self.lines[child].strip() if child is not None else ""
                if child is not None and (
                    self.indent_of(child) > indent
                    or (self.indent_of(child) == indent and (child_text == "-" or child_text.startswith("- ")))
                ):
                    result[key], end = self.node(child)
                else:
                    result[key], end = None, cursor + 1
            cursor = self.next_content(end)
        return result, (cursor if cursor is not None else len(self.lines))

    def block_scalar(self, i: int, indent: int, header: str) -> tuple[str, int]:
        style, chomp = header[0], header[1:].strip()
        if chomp not in ("", "-", "+"):
            raise self.fail(i, "block scalar indentation indicators are not supported")
        body: list[str] = []
        block_indent: int | None = None
        j = i + 1
        while j < len(self.lines):
            line = self.lines[j]
            if not line.strip():
                body.append("")
                j += 1
                continue
            line_indent = self.indent_of(j)
            if line_indent <= indent:
                break
            if block_indent is None:
                block_indent = line_indent
            if line_indent < block_indent:
                raise self.fail(j, "less indented line in a block scalar")
            body.append(line[block_indent:])
            j += 1
        trailing = 0
        while body and body[-1] == "":
            body.pop()
            trailing += 1
        if style == "|":
            text = "\n".join(body)
        else:
            text = ""
            for line in body:
                if not line:
                    text += "\n"
                elif not text or text.endswith("\n"):
                    text += line
                else:
                    text += " " + line
        if chomp == "" and body:
            text += "\n"
        elif chomp == "+":
            text += "\n" * (trailing + 1)
        return text, j

    def scalar(self, text: str, i: int) -> Any:
        text = text.strip()
        if text[:1] == '"':
            match = re.match(r'"((?:[^"\\]|\\.)*)"\s*(#.*)?$', text)
            if match is None:
                raise self.fail(i, "bad double-quoted scalar")
            return json.loads('"' + match.group(1) + '"')
        if text[:1] == "'":
            match = re.match(r"'((?:[^']|'')*)'\s*(#.*)?$", text)
            if match is None:
                raise self.fail(i, "bad single-quoted scalar")
            return match.group(1).replace("''", "'")
        text = _strip_comment(text).strip()
        if text == "[]":
            return []
        if text == "{}":
            return {}
        if text[:1] == "[" and text[-1:] == "]":
            items = re.findall(r"""\s*("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[^,\[\]{}"']+?)\s*(?:,|$)""", text[1:-1])
            if ",".join(items).replace(" ", "") != text[1:-1].replace(" ", "").rstrip(","):
                raise self.fail(i, "nested flow collections are not supported")
            return [self.scalar(item, i) for item in items]
        if text[:1] in ("{", "&", "*", "!", "%", "@", "`"):
            raise self.fail(i, "flow mappings, anchors, aliases, tags and directives are not supported")
        return text


def _strip_comment(text: str) -> str:
    """A plain scalar without its ` # comment` (quoted scalars are handled before)."""
    if text.startswith("#"):
        return ""
    match = re.search(r"\s#", text)
    return text[: match.start()] if match else text
