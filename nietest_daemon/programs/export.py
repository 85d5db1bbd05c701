"""`nietest export TASK_ID --format csv|jsonl`: one row per subtask, for spreadsheets and scripts.

A header line first, then the rows, streamed: the subtasks are read a page at a time
(`Store.iter_subtasks`), in the store's order (by subtask id; `variable_indices` gives each row's
place in the grid). Columns: `subtask_id`, one per variable (its value as people read it), then
`FIXED_COLUMNS`, in that order; a column added later goes at the end (`owner`, the task's owner
on every row, came last), so that a script reading the columns by position keeps working.

- csv: RFC 4180 (the `csv` module: fields with a comma, a quote or a line break are quoted,
  quotes doubled; lines end in CRLF). `earlier_errors` is JSON text there.
- jsonl: the header line is one object describing the task and the columns
  (`{"task": {...}, "variables": [...], "columns": [...]}`), then one object per subtask keyed by
  the columns. A variable's column holds its value's label, text as in the CSV and the report
  (`taskspec.value_label`; null for a subtask off the grid); the fixed columns are typed (numbers,
  null, a list for `earlier_errors` and `variable_indices`).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

from nietest_daemon.core.settings import Settings
from nietest_daemon.store import Store
from nietest_daemon.store.base import round_of
from nietest_daemon.store.results import (
    ResultsError,
    TaskView,
    column_names,
    history,
    indices_of,
    iso,
    labels,
    load_task,
    seconds_between,
)

FORMATS = ("csv", "jsonl")
FIXED_COLUMNS = (
    "status",
    "image_url",
    "seed",
    "error",
    "started_at",
    "completed_at",
    "duration_seconds",
    "attempt",
    "earlier_errors",
    "job_uuid",
    "variable_indices",
    "owner",
)


def columns_of(view: TaskView) -> list[str]:
    return ["subtask_id", *column_names(view.dimensions, ("subtask_id", *FIXED_COLUMNS)), *FIXED_COLUMNS]


def rows_of(store: Store, view: TaskView) -> Iterator[list[Any]]:
    """One row per subtask in `columns_of` order: the variables' labels (text), then the fixed
    columns typed (None, numbers, lists)."""
    all_labels = [labels(d) for d in view.dimensions]
    owner = view.doc.get("owner")
    for sub in store.iter_subtasks(view.id):
        place = indices_of(sub, view.dimensions)
        values = [all_labels[d][i] for d, i in enumerate(place)] if place is not None else [None] * len(all_labels)
        earlier = [
            {k: h.get(k) for k in ("round", "status", "error", "seed", "job_uuid", "completed_at")}
            for h in history(sub)
        ]
        yield [
            sub.get("id"),
            *values,
            sub.get("status"),
            sub.get("result"),
            sub.get("seed"),
            sub.get("error"),
            iso(sub.get("started_at")),
            iso(sub.get("completed_at")),
            seconds_between(sub.get("started_at"), sub.get("completed_at")),
            len(earlier) + 1,
            earlier,
            sub.get("job_uuid"),
            list(sub.get("variable_indices") or []),
            owner,
        ]


def header_of(view: TaskView, columns: Sequence[str]) -> dict[str, Any]:
    doc = view.doc
    task = {
        "id": view.id,
        "name": doc.get("name"),
        "owner": doc.get("owner"),
        "status": doc.get("status"),
        "round": round_of(doc),
        "priority": doc.get("priority"),
        **{
            k: doc.get(k)
            for k in ("total_images", "processed_images", "completed_images", "failed_images", "cancelled_images")
        },
        "progress": doc.get("progress"),
        "error": doc.get("error"),
        "created_at": iso(doc.get("created_at")),
        "started_at": iso(doc.get("started_at")),
        "completed_at": iso(doc.get("completed_at")),
    }
    variables = [
        {
            "column": name,
            "dimension": d.index,
            "variable_id": d.variable_id,
            "variable_name": d.variable_name,
            "variable_type": d.variable_type,
            "values": labels(d),
        }
        for d, name in zip(view.dimensions, columns[1 : 1 + len(view.dimensions)], strict=True)
    ]
    return {"task": task, "variables": variables, "columns": list(columns)}


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | Mapping):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")) if value else ""
    return value


def export(store: Store, task_id: str, fmt: str, out: IO[str]) -> int:
    """Write the task's header line and rows to `out`; how many rows."""
    if fmt not in FORMATS:
        raise ResultsError(f"unknown export format {fmt!r} (one of: {', '.join(FORMATS)})")
    view = load_task(store, task_id)
    columns = columns_of(view)
    n = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(columns)
        for row in rows_of(store, view):
            writer.writerow([_csv_value(v) for v in row])
            n += 1
    else:
        out.write(json.dumps(header_of(view, columns), ensure_ascii=False, default=str) + "\n")
        for row in rows_of(store, view):
            out.write(json.dumps(dict(zip(columns, row, strict=True)), ensure_ascii=False, default=str) + "\n")
            n += 1
    return n


def run(settings: Settings, task_id: str, *, fmt: str) -> int:
    from nietest_daemon.store import open_store_for

    store = open_store_for(settings)
    try:
        export(store, task_id, fmt, sys.stdout)
        sys.stdout.flush()
    except ResultsError as exc:
        print(f"nietest: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `nietest export ... | head`: stop quietly, and at exit too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        store.close()
    return 0
