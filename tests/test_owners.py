"""A task's owner (domain/owners.py) and how the command line sets and shows it: `nietest submit
--owner`, its defaults (the file's `owner` / `user_id`, the invoking user), `nietest tasks --owner`,
and the owner in `status TASK_ID`, `report` (escaped) and `export` (the last column).

Submit runs in-process against the session's private valkey-server, on a real SQLite store."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from nietest_daemon.core import settings as settings_module
from nietest_daemon.core.settings import Settings
from nietest_daemon.domain import taskspec
from nietest_daemon.domain.owners import MAX_OWNER_CHARS, check_owner, owner_in, shown_owner
from nietest_daemon.domain.taskspec import TaskValidationError
from nietest_daemon.programs import export, report, task_commands
from nietest_daemon.store import SQLiteStore, Store
from nietest_daemon.testing import task_documents as taskdocs
from nietest_daemon.testing.valkey import PrivateValkey

HOSTILE = '<b onmouseover="x()">ali&ce</b>'  # printable: a valid owner, which the report must escape


# --- check_owner / owner_in -----------------------------------------------------------------------------------


def test_an_owner_is_stripped_printable_text_of_at_most_128_characters() -> None:
    assert check_owner("  alice  ", "owner") == "alice"
    assert check_owner("Zoë 猫 o'brien", "owner") == "Zoë 猫 o'brien"
    assert check_owner("x" * MAX_OWNER_CHARS, "owner") == "x" * 128
    assert check_owner(" " + "x" * 128 + " ", "owner") == "x" * 128  # counted once stripped
    with pytest.raises(TaskValidationError, match="129 characters long, at most 128") as refused:
        check_owner("x" * 129, "--owner")
    assert refused.value.field == "--owner"
    for empty in ("", "   "):
        with pytest.raises(TaskValidationError, match="must not be empty"):
            check_owner(empty, "owner")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("al\x00ice", "control characters, found U+0000"),
        ("al\x1b[31mice", "control characters, found U+001B"),
        ("al\x85ice", "control characters, found U+0085"),
        ("ali\nce", "single line"),
        ("ali\tce", "single line"),
        ("ali\u2028ce", "single line"),
        ("ali\u202ece", "bidirectional formatting characters, found U+202E"),
        ("ali\u2066ce", "bidirectional formatting characters"),
        ("ali\u200bce", "invisible character U+200B at position 4"),
        ("ali\u00adce", "invisible character U+00AD"),
        ("ali\ud800ce", "lone surrogate"),
    ],
)
def test_an_owner_with_a_character_that_hides_or_breaks_lines_is_refused(value: str, problem: str) -> None:
    with pytest.raises(TaskValidationError) as refused:
        check_owner(value, "user_id")
    assert refused.value.field == "user_id" and problem in refused.value.problem


def test_an_integer_owner_is_its_decimal_text_and_other_types_are_refused() -> None:
    assert check_owner(12345, "user_id") == "12345"
    assert check_owner(-7, "user_id") == "-7"
    assert check_owner(10**127, "user_id") == "1" + "0" * 127
    with pytest.raises(TaskValidationError, match="over 128 digits"):
        check_owner(10**128, "user_id")
    for value, kind in ((True, "boolean"), (False, "boolean"), (None, "null"), (1.5, "number"), ({}, "object")):
        with pytest.raises(TaskValidationError, match=f"must be a string or an integer, got {kind}") as refused:
            check_owner(value, "user_id")
        assert refused.value.field == "user_id"


def test_owner_in_a_payload_is_its_owner_else_its_user_id() -> None:
    assert owner_in({"owner": "alice", "user_id": 7}) == "alice"
    assert owner_in({"user_id": 7}) == "7"
    assert owner_in({"owner": None, "user_id": " bob "}) == "bob"
    assert owner_in({}) is None and owner_in({"owner": None, "user_id": None}) is None
    with pytest.raises(TaskValidationError) as refused:
        owner_in({"owner": "a\nb", "user_id": "fine"})  # a bad owner is not replaced by the user id
    assert refused.value.field == "owner"
    with pytest.raises(TaskValidationError) as refused:
        owner_in({"user_id": True})
    assert refused.value.field == "user_id"


def test_shown_owner() -> None:
    assert shown_owner(None) == "-" and shown_owner("alice") == "alice"
    assert shown_owner("a\x1bb") == "a\ufffdb"  # a document no check let through


# --- nietest submit --owner -------------------------------------------------------------------------------------


def a_task(**extra: Any) -> dict[str, Any]:
    return {**taskdocs.task_document("campaign", [taskdocs.fixed_prompt("1girl")]), **extra}


@pytest.fixture
def submitting(tmp_path: Path, valkey: PrivateValkey) -> Callable[..., tuple[int, str, str, dict[str, Any] | None]]:
    """submit(task document, owner=...) -> (exit code, stdout, stderr, the stored task or None)."""
    settings = settings_module.load(
        {"NIETEST_HOME": str(tmp_path), "BROKER_REDIS_URL": valkey.url, "NIETA_XTOKEN": "tok-owners"}
    )
    files = iter(range(1000))

    def submit(doc: dict[str, Any], capsys: pytest.CaptureFixture[str], **kwargs: Any) -> tuple[Any, ...]:
        path = tmp_path / f"task-{next(files)}.json"
        path.write_text(json.dumps(doc))
        code = task_commands.submit(settings, str(path), wait=False, **kwargs)
        out, err = capsys.readouterr()
        stored = None
        if code == 0:
            with SQLiteStore(settings.data_dir) as store:
                stored = store.get_task(out.strip())
        return code, out, err, stored

    return submit


def test_submit_stores_the_owner_given_by_owner(submitting: Callable[..., Any], capsys: Any) -> None:
    code, _, err, stored = submitting(a_task(user_id=7, ui={"tab": 2}), capsys, owner="  alice ")
    assert code == 0, err
    assert stored["owner"] == "alice"  # --owner wins over the file's user_id, which stays in extra
    assert stored["extra"] == {"user_id": 7, "ui": {"tab": 2}}
    assert taskspec.Task.from_document(stored).extra == {"user_id": 7, "ui": {"tab": 2}}


def test_submit_defaults_to_the_files_owner_then_user_id_then_the_invoking_user(
    submitting: Callable[..., Any], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert submitting(a_task(owner="carol", user_id=7), capsys)[3]["owner"] == "carol"
    assert submitting(a_task(user_id=12345), capsys)[3]["owner"] == "12345"
    monkeypatch.setattr(task_commands.getpass, "getuser", lambda: "dave")
    assert submitting(a_task(), capsys)[3]["owner"] == "dave"

    def nobody() -> str:
        raise OSError("No username set in the environment")

    monkeypatch.setattr(task_commands.getpass, "getuser", nobody)
    code, _, _, stored = submitting(a_task(), capsys)
    assert code == 0 and stored["owner"] == "unknown" and stored["extra"] == {}


def test_submit_refuses_a_bad_owner_in_one_line_storing_nothing(
    submitting: Callable[..., Any], capsys: Any, tmp_path: Path, valkey: PrivateValkey
) -> None:
    code, out, err, _ = submitting(a_task(), capsys, owner="ali\u202ece")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "nietest: --owner: must not contain bidirectional formatting characters, found U+202E at position 4"
    ]
    code, out, err, _ = submitting(a_task(user_id=True), capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("nietest: ") and ": invalid task: user_id: must be a string or an integer" in err
    assert not (tmp_path / "data").exists() or SQLiteStore(tmp_path / "data").list_tasks() == []
    assert redis.Redis.from_url(valkey.url).keys("*") == []  # nothing enqueued


# --- tasks, status, report, export ------------------------------------------------------------------------------


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Settings, Store]:
    """Tasks of alice (2), bob and an owner who needs escaping, and one stored before owners existed."""
    store = SQLiteStore(tmp_path / "data")
    for task_id, owner in (("a1", "alice"), ("b1", "bob"), ("a2", "alice"), ("h1", HOSTILE), ("old", None)):
        doc = taskdocs.task_document(f"campaign {task_id}", [taskdocs.fixed_prompt("1girl")], ratio="1:1")
        document = {"id": task_id, **taskspec.validate_task(doc).to_document()}
        store.create_task(document if owner is None else {**document, "owner": owner})
        store.insert_subtasks(task_id, [{"id": f"{task_id}:0", "variable_indices": []}])
    store.mark_task_running("a2")
    store.connection().execute("UPDATE tasks SET doc = json_remove(doc, '$.owner', '$.extra') WHERE id = 'old'")
    return settings_module.load({"NIETEST_HOME": str(tmp_path)}), store


def test_tasks_filters_by_owner_and_shows_it(stored: tuple[Settings, Store], capsys: Any) -> None:
    settings, _ = stored
    assert task_commands.tasks(settings, status=None, limit=20, as_json=True, owner="alice") == 0
    listed = json.loads(capsys.readouterr().out)
    assert {t["id"] for t in listed} == {"a1", "a2"} and {t["owner"] for t in listed} == {"alice"}
    assert task_commands.tasks(settings, status="processing", limit=20, as_json=True, owner=" alice ") == 0
    assert [t["id"] for t in json.loads(capsys.readouterr().out)] == ["a2"]
    assert task_commands.tasks(settings, status=None, limit=20, as_json=False, owner=None) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert "OWNER" in header and header.index("OWNER") < header.index("NAME")
    by_id = {row.split()[0]: row for row in rows}
    assert " alice " in by_id["a1"] and " bob " in by_id["b1"] and by_id["old"].split()[-3] == "-"
    assert task_commands.tasks(settings, status="failed", limit=20, as_json=False, owner="bob") == 0
    assert capsys.readouterr().out.strip() == "no tasks failed of bob"
    assert task_commands.tasks(settings, status=None, limit=20, as_json=False, owner="a\nb") == 2
    assert (
        capsys.readouterr().err.strip()
        == "nietest: --owner: must be a single line, found a tab or line break U+000A at position 2"
    )


def test_status_shows_the_owner(stored: tuple[Settings, Store], capsys: Any) -> None:
    settings, _ = stored
    assert task_commands.status(settings, "a1", as_json=False) == 0
    assert "owner    alice" in capsys.readouterr().out.splitlines()
    assert task_commands.status(settings, "a1", as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["owner"] == "alice"
    assert task_commands.status(settings, "old", as_json=False) == 0
    assert "owner    -" in capsys.readouterr().out.splitlines()
    assert task_commands.status(settings, "old", as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["owner"] is None


def test_the_report_shows_the_owner_escaped(stored: tuple[Settings, Store], tmp_path: Path) -> None:
    _, store = stored
    report.write_report(store, "h1", tmp_path / "h1.html")
    page = (tmp_path / "h1.html").read_text()
    assert HOSTILE not in page and "<b " not in page
    assert "<tr><th>owner</th><td>&lt;b onmouseover=&quot;x()&quot;&gt;ali&amp;ce&lt;/b&gt;</td></tr>" in page
    report.write_report(store, "old", tmp_path / "old.html")
    assert "<tr><th>owner</th><td>\u2014</td></tr>" in (tmp_path / "old.html").read_text()


def test_export_has_the_owner_as_its_last_column(stored: tuple[Settings, Store]) -> None:
    _, store = stored
    out = io.StringIO(newline="")
    assert export.export(store, "a1", "csv", out) == 1
    header, *rows = list(csv.reader(io.StringIO(out.getvalue(), newline="")))
    assert header == ["subtask_id", *export.FIXED_COLUMNS] and header[-1] == "owner"
    assert header[-2] == "variable_indices"  # the earlier columns keep their places
    assert rows == [[*rows[0][:-1], "alice"]]
    out = io.StringIO()
    export.export(store, "old", "jsonl", out)
    head, row = (json.loads(line) for line in out.getvalue().splitlines())
    assert head["task"]["owner"] is None and head["columns"][-1] == "owner" and row["owner"] is None
    out = io.StringIO()
    export.export(store, "h1", "jsonl", out)
    head, row = (json.loads(line) for line in out.getvalue().splitlines())
    assert head["task"]["owner"] == row["owner"] == HOSTILE
