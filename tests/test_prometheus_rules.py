"""The Prometheus and Grafana files in etc/: promtool accepts the configuration and the rules, the rules'
unit tests pass and cover every alert both firing and quiet, and the rules and the dashboard query only
the metrics of the contract (tests/prometheus_files.py).

Quick (promtool only, no daemon). Without promtool it skips, except under CI (`.ci/run` installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_files import (
    CONTRACT_METRICS,
    DASHBOARD_FILE,
    METRICS_DOC,
    PROMETHEUS_CONFIG,
    QUERYABLE_METRICS,
    ROOT,
    RULES_FILE,
    RULES_TEST_FILE,
    alert_rule_cases,
    alert_rules,
    dashboard_panels,
    dashboard_queries,
    load_dashboard,
    load_yaml,
    metric_names,
)

#: The rules issue 11 asks for; more may exist.
REQUIRED_ALERTS = {
    "NietestWorkerCrashLooping",
    "NietestBacklogStalled",
    "NietestHighFailureRatio",
    "NietestBrokerDown",
    "NietestSlotsBusyNoProgress",
    "NietestMetricsDown",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (Debian package prometheus; .ci/run installs it)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def run_promtool(promtool: str, *args: str) -> str:
    done = subprocess.run(
        [promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"}
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} exited {done.returncode}:\n{output}"
    return output


# --- promtool ------------------------------------------------------------------------------------------


def test_promtool_accepts_the_configuration(promtool: str) -> None:
    output = run_promtool(promtool, "check", "config", str(PROMETHEUS_CONFIG.relative_to(ROOT)))
    assert "SUCCESS" in output, output


def test_promtool_accepts_the_rules(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", str(RULES_FILE.relative_to(ROOT)))
    assert f"SUCCESS: {len(alert_rules())} rules found" in output, output


def test_the_rules_pass_their_unit_tests(promtool: str) -> None:
    output = run_promtool(promtool, "test", "rules", str(RULES_TEST_FILE.relative_to(ROOT)))
    assert "SUCCESS" in output and "FAILED" not in output, output


def test_every_dashboard_query_parses(promtool: str, tmp_path: Path) -> None:
    # promtool parses a recording rule's expression like any query: one rule per dashboard query.
    queries = dashboard_queries()
    rules = tmp_path / "dashboard-queries.yml"
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for number, query in enumerate(queries):
        lines += [f"      - record: dashboard:query_{number}", f"        expr: {json.dumps(query)}"]
    rules.write_text("\n".join(lines) + "\n")
    output = run_promtool(promtool, "check", "rules", str(rules))
    assert f"SUCCESS: {len(queries)} rules found" in output, output


# --- the rules and their unit tests -------------------------------------------------------------------


def test_the_configuration_scrapes_nietest_and_loads_the_rules() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == [RULES_FILE.name]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "nietest"]
    assert job["scrape_interval"] == "15s"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
    assert "authorization" not in job  # the example stays commented: no token file exists by default
    assert re.search(r"^\s*#\s*credentials_file:", PROMETHEUS_CONFIG.read_text(), re.MULTILINE)


def test_the_required_alerts_exist_once_each() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), names
    assert set(names) >= REQUIRED_ALERTS, REQUIRED_ALERTS - set(names)
    assert all(name.startswith("Nietest") for name in names), names


def test_every_alert_has_a_firing_case_and_a_quiet_case() -> None:
    cases = alert_rule_cases()
    fires = {alert for _, alert, firing in cases if firing}
    quiet = {alert for _, alert, firing in cases if not firing}
    names = {rule["alert"] for rule in alert_rules()}
    assert not names - fires, f"no unit test where these fire: {sorted(names - fires)}"
    assert not names - quiet, f"no unit test where these stay quiet: {sorted(names - quiet)}"
    assert not (fires | quiet) - names, f"unit tests of unknown alerts: {sorted((fires | quiet) - names)}"


def test_every_alert_has_for_severity_annotations_and_a_runbook_section() -> None:
    anchors = {_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.+?)\s*$", METRICS_DOC.read_text(), re.MULTILINE)}
    anchors |= set(re.findall(r'<a (?:id|name)="([^"]+)"', METRICS_DOC.read_text()))
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for") or ""), f"{name}: `for:` missing"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
        annotations = rule.get("annotations", {})
        assert {"summary", "description", "runbook"} <= set(annotations), f"{name}: {sorted(annotations)}"
        runbook = annotations["runbook"]
        assert runbook == f"docs/metrics.md#{name.lower()}", f"{name}: runbook {runbook!r}"
        assert runbook.split("#", 1)[1] in anchors, f"{name}: docs/metrics.md has no section #{runbook}"


def test_the_rules_query_only_contract_metrics() -> None:
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric in {rule['expr']!r}"
        assert names <= QUERYABLE_METRICS, f"{rule['alert']}: unknown metrics {sorted(names - QUERYABLE_METRICS)}"


# --- the dashboard -------------------------------------------------------------------------------------


def test_the_dashboard_takes_its_prometheus_as_a_variable() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids
    for panel in panels:
        for target in [panel, *panel.get("targets", [])]:
            assert target.get("datasource") == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_every_panel_queries_contract_metrics() -> None:
    panels = dashboard_panels()
    assert len(panels) >= 10
    used: set[str] = set()
    for panel in panels:
        exprs = [t["expr"] for t in panel.get("targets", []) if t.get("expr", "").strip()]
        assert exprs, f"panel {panel.get('title')!r} has no query"
        for expr in exprs:
            names = metric_names(expr)
            assert names, f"panel {panel['title']!r}: no metric in {expr!r}"
            assert names <= QUERYABLE_METRICS, f"panel {panel['title']!r}: unknown {sorted(names - QUERYABLE_METRICS)}"
            used |= names
    # Every metric of the contract is on the dashboard somewhere (a histogram through one of its series).
    for name, kind in CONTRACT_METRICS.items():
        series = {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
        assert series & used, f"no panel shows {name}"


def test_dashboard_queries_returns_every_target() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    count = sum(1 for panel in dashboard_panels(dashboard) for t in panel.get("targets", []) if t.get("expr"))
    assert len(dashboard_queries()) == count > 0


# --- the checker itself ---------------------------------------------------------------------------------


def test_metric_names_finds_selectors_and_only_selectors() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (api, le) (rate(a_bucket{api="lumina", x=~"b|c"}[5m] offset 1h)))'
        " / on (api) group_left (x) b_total * 1e3 > bool 0.2 unless topk(3, c)"
        ' or label_replace(d, "q", \'r\', "s", "t")'
        ' + max without (instance) (e[10m:1m]) + {__name__="f"} - sum(g) by (job) + rate(h[$__rate_interval])'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d", "e", "f", "g", "h"}
    assert not metric_names("vector(0) + time()")
    assert metric_names('nietest_jobs_slots_in_use{api="standard"}') - QUERYABLE_METRICS  # a typo is caught


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*]|<[^>]+>", "", heading).strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))
