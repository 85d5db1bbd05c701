"""The results commands on a real SQLite store, without a daemon: `nietest tasks`, `nietest report`
(the HTML, parsed), `nietest export` (CSV read back with the csv module, JSON lines).

tests/test_report_browser.py opens the report in headless Chromium; the retry path is in
tests/test_pipeline_steps.py (in-process) and tests/test_retry_e2e.py (a real daemon).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from nietest_daemon.core import settings as settings_module
from nietest_daemon.domain import taskspec
from nietest_daemon.domain.lifecycle import Status
from nietest_daemon.programs import cli, export, report, task_commands
from nietest_daemon.store import SQLiteStore, Store
from nietest_daemon.store.results import ResultsError
from nietest_daemon.testing import task_documents as taskdocs

HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"
TRICKY = 'a "quoted", comma\nand a second line'


def task_document(styles: list[str], ratios: list[str], polish: list[bool], *, name: str = "campaign") -> dict:
    """A task of len(styles) x len(ratios) x len(polish) images: a prompt variable and two parameters."""
    return taskdocs.task_document(
        name,
        [taskdocs.fixed_prompt("1girl, portrait"), taskdocs.variable_prompt("style", styles)],
        priority=2,
        ratio=taskdocs.variable_param("ratio", ratios, variable_name="Ratio"),
        seed=7,
        use_polish=taskdocs.variable_param("use_polish", polish, variable_id="polish", variable_name="Polish"),
    )


def store_task(store: Store, task_id: str, doc: dict[str, Any]) -> list[str]:
    """Store a task as `submit` and the master would: the document, then its subtasks (running)."""
    task = taskspec.validate_task(doc)
    store.create_task({"id": task_id, **task.to_document()})
    store.mark_task_running(task_id)
    specs = list(taskspec.expand(task))
    store.insert_subtasks(task_id, [{"id": s.subtask_id(task_id), **s.as_dict()} for s in specs])
    return [s.subtask_id(task_id) for s in specs]


def finish_all(store: Store, ids: list[str], outcome: Any) -> Counter[str]:
    """End each subtask as `outcome(i)` says: completed, failed, cancelled or left (None)."""
    ended: Counter[str] = Counter()
    for i, sid in enumerate(ids):
        status = outcome(i)
        if status is None:
            continue
        store.start_subtask(sid)
        store.record_job(sid, f"job-{i}", 100 + i)
        result = f"https://images.example/{i}.png?a=1&b=2" if status == Status.COMPLETED else None
        error = f"GPU on fire {i}: {HOSTILE}" if status == Status.FAILED else None
        store.finish_subtask(sid, status, result=result, error=error)
        ended[status] += 1
    return ended


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = SQLiteStore(tmp_path / "data")
    yield s
    s.close()


class Dom(HTMLParser):
    """Elements of a page: (tag, attributes) in order, and its text."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def count(self, tag: str, cls: str | None = None) -> int:
        return sum(1 for t, a in self.elements if t == tag and (cls is None or cls in (a.get("class") or "").split()))


def outcome_of(i: int) -> str | None:
    return [Status.COMPLETED, Status.COMPLETED, Status.FAILED, Status.CANCELLED, None, Status.COMPLETED][i % 6]


# --- report -------------------------------------------------------------------------------------------


def test_report_shows_every_cell_and_escapes_every_value(store: Store, tmp_path: Path) -> None:
    styles = [HOSTILE, TRICKY, "watercolor"]
    ids = store_task(store, "t1", task_document(styles, ["1:1", "3:4"], [False, True], name=f"name {HOSTILE}"))
    ended = finish_all(store, ids, outcome_of)
    path = tmp_path / "r.html"
    assert report.write_report(store, "t1", path) == 12
    page = path.read_text()
    dom = Dom(page)
    # Rows: style, columns: ratio (the first two dimensions); one grid per value of polish.
    assert dom.count("details", "block") == 2
    assert dom.count("td", "cell") == 12
    assert dom.count("img") == ended[Status.COMPLETED] == dom.count("td", "completed")
    assert dom.count("td", "failed") == ended[Status.FAILED]
    assert dom.count("td", "cancelled") == ended[Status.CANCELLED]
    assert dom.count("td", "pending") == 2  # never started
    assert all(a.get("loading") == "lazy" for t, a in dom.elements if t == "img")
    links = [a["href"] for t, a in dom.elements if t == "a" and a.get("href", "").startswith("https://")]
    assert len(links) == ended[Status.COMPLETED] and "https://images.example/0.png?a=1&b=2" in links
    # Nothing the task holds became markup: no script, no handler, no element from a prompt.
    assert dom.count("script") == 0 and "<script>" not in page
    assert not any(name.startswith("on") for _, attrs in dom.elements for name in attrs)
    assert {a.get("src") for t, a in dom.elements if t == "img"} <= set(links)
    text = "".join(dom.text)
    assert HOSTILE in text and f"name {HOSTILE}" in text and "GPU on fire 2: " + HOSTILE in text
    assert "Content-Security-Policy" in page and "script-src" not in page and "default-src 'none'" in page
    assert report.CSP in page and "img-src http: https:;" in report.CSP and "data:" not in report.CSP
    assert "base-uri 'none'" in report.CSP and "form-action 'none'" in report.CSP
    assert "seed 100" in text and "seed 107" in text  # the seed of each image


def test_report_axes_blocks_and_unknown_variables(store: Store, tmp_path: Path, monkeypatch) -> None:
    ids = store_task(store, "t2", task_document(["a", "b", "c"], ["1:1", "3:4", "16:9"], [False, True]))
    finish_all(store, ids, lambda i: Status.COMPLETED)
    path = tmp_path / "r.html"
    report.write_report(store, "t2", path, rows="Polish", cols="style")
    dom = Dom(path.read_text())
    assert dom.count("details", "block") == 3  # one per ratio
    assert dom.count("th", "row") == 3 * 2  # polish down the rows
    monkeypatch.setattr(report, "CELLS_PER_BLOCK", 4)  # 3 columns: one row per block
    report.write_report(store, "t2", path, rows="ratio", cols="2")
    page = path.read_text()
    dom = Dom(page)
    assert dom.count("details", "block") == 2 * 3  # per style value, rows of 3 cells cut one per block
    assert sum(1 for t, a in dom.elements if t == "details" and "open" in a) == 1  # only the first is open
    assert dom.count("td", "cell") == 18 and dom.count("a") >= 18 + 6  # images + the table of contents
    with pytest.raises(ResultsError) as caught:
        report.write_report(store, "t2", path, rows="colour")
    message = str(caught.value)
    assert "--rows: unknown variable 'colour'" in message
    assert "'style' (id style" in message and "'Ratio' (id ratio" in message and "'Polish' (id polish" in message
    with pytest.raises(ResultsError, match="same variable"):
        report.write_report(store, "t2", path, rows="style", cols="style")
    with pytest.raises(ResultsError, match="no task"):
        report.write_report(store, "missing", path)


def test_report_of_a_task_without_variables_and_with_one(store: Store, tmp_path: Path) -> None:
    doc = task_document(["only"], ["1:1"], [False])
    doc["prompts"] = doc["prompts"][:1]
    doc["ratio"] = taskdocs.fixed_param("ratio", "1:1")
    doc["use_polish"] = taskdocs.fixed_param("use_polish", False)
    [sid] = store_task(store, "t0", doc)
    store.finish_subtask(sid, Status.COMPLETED, result="https://images.example/one.png")
    assert report.write_report(store, "t0", tmp_path / "a.html") == 1
    with pytest.raises(ResultsError, match="no variables"):
        report.write_report(store, "t0", tmp_path / "a.html", cols="style")
    doc = task_document(["a", "b"], ["1:1"], [False])
    doc["ratio"] = taskdocs.fixed_param("ratio", "1:1")
    doc["use_polish"] = taskdocs.fixed_param("use_polish", False)
    store_task(store, "t1", doc)
    assert report.write_report(store, "t1", tmp_path / "b.html") == 2
    assert Dom((tmp_path / "b.html").read_text()).count("td", "pending") == 2


def test_report_shows_the_latest_attempt_and_the_earlier_errors(store: Store, tmp_path: Path) -> None:
    ids = store_task(store, "t", task_document(["a", "b"], ["1:1"], [False]))
    store.finish_subtask(ids[0], Status.FAILED, error="first failure")
    store.finish_subtask(ids[1], Status.COMPLETED, result="https://images.example/b.png")
    assert store.retry_subtasks("t").reopened
    store.finish_subtask(ids[0], Status.COMPLETED, result="https://images.example/a2.png")
    path = tmp_path / "r.html"
    report.write_report(store, "t", path)
    dom = Dom(path.read_text())
    assert dom.count("td", "completed") == 2 and dom.count("td", "failed") == 0
    assert dom.count("details", "hist") == 1
    text = "".join(dom.text)
    assert "round 1 · failed · seed 7: first failure" in text and "attempt 2" in text


def test_report_command(store: Store, tmp_path: Path, monkeypatch, capsys) -> None:
    store_task(store, "t", task_document(["a"], ["1:1", "3:4"], [False]))
    settings = settings_module.load({"NIETEST_HOME": str(tmp_path)})
    monkeypatch.chdir(tmp_path)
    code = report.run(settings, "t", output=None, rows=None, cols="nope")
    assert code == 2 and "--cols: unknown variable 'nope'" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.html")) and not list(tmp_path.glob(".*.partial"))
    # A default path that cannot be written is named in the error (it is no `None`).
    (tmp_path / "nietest-report-t.html").mkdir()
    assert report.run(settings, "t", output=None, rows=None, cols=None) == 2
    assert capsys.readouterr().err.startswith("nietest: nietest-report-t.html: ")


def test_a_large_report_renders_quickly(store: Store, tmp_path: Path) -> None:
    styles = [f"style {i}, with a comma" for i in range(50)]
    ids = store_task(store, "big", task_document(styles, ["1:1", "3:4", "4:3", "16:9"], [False, True]))
    finish_all(store, ids, outcome_of)
    started = time.monotonic()
    assert report.write_report(store, "big", tmp_path / "big.html") == 400
    assert time.monotonic() - started < 5


# --- export -------------------------------------------------------------------------------------------


def test_export_csv_is_rfc_4180_and_round_trips(store: Store) -> None:
    styles = [TRICKY, HOSTILE, "plain"]
    ids = store_task(store, "t", task_document(styles, ["1:1", "3:4"], [False, True]))
    finish_all(store, ids, outcome_of)
    out = io.StringIO(newline="")
    assert export.export(store, "t", "csv", out) == 12
    text = out.getvalue()
    assert text.endswith("\r\n") and "\r\n" in text
    lines = text.split("\r\n")
    header = lines[0].split(",")
    assert header[:4] == ["subtask_id", "style", "Ratio", "Polish"] and "image_url" in header and "seed" in header
    assert '"a ""quoted"", comma\nand a second line"' in text  # quoted, quotes doubled, the line break kept
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(rows) == 12
    by_id = {r["subtask_id"]: r for r in rows}
    for sid in ids:
        row = by_id[sid]
        sub = store.get_subtask(sid)
        assert sub is not None
        assert row["style"] == styles[sub["variable_indices"][0]]
        assert row["Polish"] == ("true" if sub["variable_indices"][2] else "false")
        assert row["status"] == sub["status"]
        assert row["image_url"] == (sub["result"] or "")
        assert row["error"] == (sub["error"] or "")
        assert row["seed"] == str(sub["seed"])
        assert json.loads(row["variable_indices"]) == sub["variable_indices"]
        if sub["status"] == Status.COMPLETED:
            assert row["started_at"] and row["completed_at"] and float(row["duration_seconds"]) >= 0
        assert row["attempt"] == "1" and row["earlier_errors"] == ""


def test_export_jsonl_header_describes_the_task(store: Store) -> None:
    ids = store_task(store, "t", task_document(["a", TRICKY], ["1:1"], [True]))
    store.finish_subtask(ids[0], Status.FAILED, error="bad")
    store.finish_subtask(ids[1], Status.COMPLETED, result="https://images.example/1.png")
    store.retry_subtasks("t")
    out = io.StringIO()
    assert export.export(store, "t", "jsonl", out) == 2
    header, *rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (
        header["task"]["id"] == "t" and header["task"]["status"] == Status.PROCESSING and header["task"]["round"] == 2
    )
    assert [v["column"] for v in header["variables"]] == ["style", "Ratio", "Polish"]
    assert header["variables"][0]["values"] == ["a", TRICKY]
    assert header["columns"][0] == "subtask_id" and list(rows[0]) == header["columns"]
    first = next(r for r in rows if r["subtask_id"] == ids[0])
    assert first["status"] == "pending" and first["attempt"] == 2 and first["earlier_errors"][0]["error"] == "bad"
    assert next(r for r in rows if r["subtask_id"] == ids[1])["style"] == TRICKY
    with pytest.raises(ResultsError, match="no task"):
        export.export(store, "missing", "csv", io.StringIO())


def test_export_streams_pages(store: Store, monkeypatch) -> None:
    ids = store_task(store, "t", task_document([f"s{i}" for i in range(30)], ["1:1", "3:4"], [False, True]))
    pages = []
    original = store.list_subtasks

    def list_subtasks(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        found = original(*args, **kwargs)
        pages.append(len(found))
        return found

    monkeypatch.setattr(store, "list_subtasks", list_subtasks)
    monkeypatch.setattr(type(store), "iter_subtasks", _small_pages(type(store).iter_subtasks))
    assert export.export(store, "t", "csv", io.StringIO()) == len(ids) == 120
    assert max(pages) <= 50 and len(pages) >= 3


def test_paging_a_tasks_subtasks_needs_no_sort(store: Store) -> None:
    """Every page of `iter_subtasks` walks the (task_id, id) index: no temp B-tree sorts the task's
    subtasks again for each page."""
    assert isinstance(store, SQLiteStore)
    ids = store_task(store, "t", task_document([f"s{i}" for i in range(5)], ["1:1"], [False]))
    conn = store.connection()
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        assert [d["id"] for d in store.iter_subtasks("t", batch=2)] == sorted(ids)
    finally:
        conn.set_trace_callback(None)
    pages = [sql for sql in statements if sql.startswith("SELECT doc FROM subtasks")]
    assert len(pages) == 3 and any(" id > " in sql for sql in pages)
    for sql in pages:
        plan = " / ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "TEMP B-TREE" not in plan and "subtasks_task_id" in plan, (sql, plan)


def _small_pages(iter_subtasks: Any) -> Any:
    def iterate(self: Store, task_id: str, status: Any = None, *, batch: int = 1000) -> Any:
        return iter_subtasks(self, task_id, status, batch=50)

    return iterate


def test_number_labels_tell_every_value_apart() -> None:
    values = [0.1 + 0.2, 0.3, 1.0000001, 1.0000002, 123456.7, 123456.8, 1e-7, 7.0, 7, 2**60]
    labels = [taskspec.value_label(v) for v in values]
    assert labels[:7] == ["0.30000000000000004", "0.3", "1.0000001", "1.0000002", "123456.7", "123456.8", "1e-07"]
    assert labels[7:] == ["7", "7", str(2**60)]  # ints stay ints; a whole float reads as the int it equals
    assert all(float(label) == v for label, v in zip(labels, values, strict=True))
    assert taskspec.value_label({"type": "freetext", "value": "cat", "weight": 1.0000001}) == "cat (weight 1.0000001)"
    assert taskspec.value_label({"type": "freetext", "value": "cat", "weight": 2}) == "cat (weight 2)"


# --- tasks --------------------------------------------------------------------------------------------


def test_tasks_lists_newest_first_with_filters(store: Store, tmp_path: Path, capsys) -> None:
    for i in range(6):
        ids = store_task(store, f"task{i}", task_document(["a", "b"], ["1:1"], [False], name=f"campaign {i}"))
        if i % 2:
            finish_all(store, ids, lambda j: [Status.COMPLETED, Status.FAILED][j])
        time.sleep(0.002)  # distinct creation times
    settings = settings_module.load({"NIETEST_HOME": str(tmp_path)})
    store.close()
    tmp_data = tmp_path / "data"
    assert (tmp_data / "nietest.sqlite3").exists()
    assert task_commands.tasks(settings, status=None, limit=4, as_json=True) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["id"] for t in listed] == ["task5", "task4", "task3", "task2"]
    five = listed[0]
    assert five["status"] == Status.COMPLETED and five["partially_completed"] is True
    assert (five["completed_images"], five["failed_images"], five["total_images"], five["priority"]) == (1, 1, 2, 2)
    assert five["progress"] == 100.0 and five["round"] == 1 and 0 <= five["age_seconds"] < 60
    assert task_commands.tasks(settings, status=Status.PROCESSING, limit=20, as_json=False) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith("ID") and [line.split()[0] for line in text[1:]] == ["task4", "task2", "task0"]
    assert "campaign 4" in text[1] and "0/2" in text[1]
    assert task_commands.tasks(settings, status=Status.CANCELLED, limit=20, as_json=False) == 0
    assert capsys.readouterr().out.strip() == "no tasks cancelled"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["tasks", "--limit", "0"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["tasks", "--status", "done"])


def test_tasks_is_fast_with_thousands_of_tasks(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "data")
    doc = taskspec.validate_task(task_document([f"style {i}" for i in range(100)], ["1:1"], [False])).to_document()
    for i in range(3000):
        store.create_task({"id": f"t{i:05d}", **doc})
    for i in range(0, 3000, 7):
        store.mark_task_running(f"t{i:05d}")
    started = time.monotonic()
    newest = store.list_tasks(limit=20)
    running = store.list_tasks(limit=20, status=Status.PROCESSING)
    several = store.list_tasks(limit=20, status=[Status.PROCESSING, Status.COMPLETED])
    took = time.monotonic() - started
    store.close()
    assert [t["id"] for t in newest][:2] == ["t02999", "t02998"]
    assert running[0]["id"] == "t02996" and len(several) == 20
    assert took < 1.0, took
