"""`nietest report TASK_ID`: one self-contained HTML page of a task's images, as a matrix.

The page has no script at all (its Content-Security-Policy forbids any, and everything else but
images), inline CSS and no fonts: it works from `file://`, and the only requests it makes are the
images, each loaded lazily (`loading="lazy"`) when it comes into view. Every value that reaches
the page is escaped (`html.escape`, quotes included): prompts are user input. A link or an image
is made only of an http(s) URL.

Layout: a header (name, owner, status, counts, fixed parameters, variables, timings), then one grid per
combination of the variables that are neither the rows nor the columns. A grid is cut into blocks
of at most `CELLS_PER_BLOCK` cells (whole rows), each a `<details>` element: only the first is
open and a closed block is not laid out, so a 50 000-image task is one file (16 MB) that a browser
opens in seconds (`bench/report.py`), fetching the images lazily as they come into view. (Headless
Chromium does not lazy-load: it fetches every image of the page, open or folded.) A block's
summary says what it holds and how many of its images completed and failed; a table of contents
links every block.
"""

from __future__ import annotations

import html
import itertools
import math
import statistics
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from nietest_daemon.core.settings import Settings
from nietest_daemon.domain import taskspec
from nietest_daemon.domain.lifecycle import STATUSES, Status
from nietest_daemon.domain.taskspec import Dimension
from nietest_daemon.store import Store
from nietest_daemon.store.base import round_of
from nietest_daemon.store.results import (
    ResultsError,
    TaskView,
    describe,
    find_dimension,
    history,
    indices_of,
    iso,
    labels,
    load_task,
    seconds_between,
)

CELLS_PER_BLOCK = 1000
THUMB_WIDTH = 160  # CSS pixels
LABEL_CHARS = 40  # a value shown in a header; its title holds up to TITLE_CHARS of it
TITLE_CHARS = 2000
ERROR_CHARS = 600

#: No script, no form, no <base>; images from http(s) URLs only (every image is one: `safe_url`).
CSP = "default-src 'none'; img-src http: https:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

STYLE = """
body{font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 8px}h2{font-size:15px;margin:18px 0 6px}
table.facts{border-collapse:collapse;margin:4px 0 8px}
table.facts th,table.facts td{text-align:left;padding:2px 10px 2px 0;vertical-align:top}
.status{font-weight:600}.s-completed{color:#176f2c}.s-failed{color:#b42318}.s-cancelled{color:#8a6d00}
.s-processing,.s-pending{color:#175cd3}
details.block{border:1px solid #ddd;border-radius:4px;margin:8px 0}
details.block>summary{cursor:pointer;padding:6px 8px;background:#f6f6f6;font-weight:600}
details.block>summary .n{font-weight:400;color:#555}
.scroll{overflow:auto;max-width:100%}
table.grid{border-collapse:collapse;margin:6px}
table.grid th{background:#fafafa;font-weight:600;padding:4px;border:1px solid #e3e3e3;max-width:220px;
 overflow-wrap:anywhere;white-space:pre-wrap;position:sticky;top:0}
table.grid th.row{position:sticky;left:0;top:auto;text-align:left}
td.cell{border:1px solid #e3e3e3;vertical-align:top;padding:4px;width:172px;max-width:172px;
 overflow-wrap:anywhere;white-space:pre-wrap}
td.cell img{display:block;width:160px;height:auto;background:#eee}
td.completed{background:#f3fbf4}td.failed{background:#fdecec}td.cancelled{background:#fdf7e3}
td.pending,td.processing{background:#eef4ff}td.missing{background:#f4f4f4;color:#888}
.err{color:#8f1d14;font-size:12px}.state{font-weight:600;text-transform:uppercase;font-size:11px;color:#555}
.meta,.vals{font-size:11px;color:#555}.vals{color:#777}
details.hist{font-size:11px;color:#555}details.hist summary{cursor:pointer}
details.hist ol{margin:2px 0;padding-left:16px}
nav.toc{column-width:320px;font-size:12px}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def short(text: str, limit: int = LABEL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def safe_url(url: Any) -> str | None:
    """An http(s) URL, or None: nothing else becomes a link or an image (no `javascript:`)."""
    if isinstance(url, str) and url[:8].lower().startswith(("http://", "https://")):
        return url
    return None


class Axes:
    """Which dimension runs down the rows, which across the columns, and the rest (one grid per
    combination of their values)."""

    def __init__(self, dims: Sequence[Dimension], rows: str | None, cols: str | None) -> None:
        row = find_dimension(dims, rows, "--rows") if rows is not None else None
        col = find_dimension(dims, cols, "--cols") if cols is not None else None
        if row is not None and row is col:
            raise ResultsError(f"--rows and --cols name the same variable: {describe(row)}")
        free = [d for d in dims if d is not row and d is not col]
        if row is None and free:
            row = free.pop(0)
        if col is None and free:
            col = free.pop(0)
        self.dims = tuple(dims)
        self.row = row
        self.col = col
        self.sections = tuple(free)

    def coordinate(self, section: Sequence[int], r: int, c: int) -> tuple[int, ...]:
        place = [0] * len(self.dims)
        for dim, i in zip(self.sections, section, strict=True):
            place[dim.index] = i
        if self.row is not None:
            place[self.row.index] = r
        if self.col is not None:
            place[self.col.index] = c
        return tuple(place)


# --- cells ------------------------------------------------------------------------------------------


def _history_html(sub: Mapping[str, Any]) -> str:
    earlier = history(sub)
    if not earlier:
        return ""
    items = []
    for h in earlier:
        parts = [f"round {esc(h.get('round'))}", esc(h.get("status"))]
        if h.get("seed") is not None:
            parts.append(f"seed {esc(h.get('seed'))}")
        text = " · ".join(parts)
        if h.get("error"):
            text += f": {esc(short(str(h['error']), ERROR_CHARS))}"
        items.append(f"<li>{text}</li>")
    noun = "attempt" if len(earlier) == 1 else "attempts"
    return f'<details class="hist"><summary>{len(earlier)} earlier {noun}</summary><ol>{"".join(items)}</ol></details>'


def render_cell(sub: Mapping[str, Any], values: Sequence[str]) -> str:
    """One cell: `values` are the labels of the subtask's variable values (unescaped)."""
    status = sub.get("status") if sub.get("status") in STATUSES else Status.PENDING
    # Short labels only: a prompt can be 10 000 characters, and a cell is repeated 50 000 times
    # (the headers' titles hold the whole values).
    shown = esc(" · ".join(short(v, 24) for v in values))
    caption = f'<div class="vals">{shown}</div>' if values else ""
    meta_parts = []
    if sub.get("seed") is not None:
        meta_parts.append(f"seed {esc(sub.get('seed'))}")
    attempt = len(history(sub)) + 1
    if attempt > 1:
        meta_parts.append(f"attempt {attempt}")
    meta = f'<div class="meta">{" · ".join(meta_parts)}</div>' if meta_parts else ""
    earlier = _history_html(sub)
    if status == Status.COMPLETED:
        url = safe_url(sub.get("result"))
        width, height = sub.get("width"), sub.get("height")
        thumb_h = THUMB_WIDTH
        if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
            thumb_h = max(1, round(THUMB_WIDTH * height / width))
        if url is None:
            bad = esc(sub.get("result"))
            body = f'<div class="state">completed</div><div class="err">no usable image url: {bad}</div>'
        else:
            u = esc(url)
            body = (
                f'<a href="{u}"><img loading="lazy" src="{u}" alt="{shown}" width="{THUMB_WIDTH}" '
                f'height="{thumb_h}"></a>'
            )
        return f'<td class="cell completed">{body}{meta}{caption}{earlier}</td>'
    if status == Status.FAILED:
        error = esc(short(str(sub.get("error") or "failed (no error text)"), ERROR_CHARS))
        return (
            f'<td class="cell failed"><div class="state">failed</div>'
            f'<div class="err">{error}</div>{meta}{caption}{earlier}</td>'
        )
    note = f'<div class="err">{esc(short(str(sub["error"]), ERROR_CHARS))}</div>' if sub.get("error") else ""
    return f'<td class="cell {status}"><div class="state">{status}</div>{note}{meta}{caption}{earlier}</td>'


MISSING_CELL = '<td class="cell missing"><div class="state">not created</div></td>'


# --- the page ---------------------------------------------------------------------------------------


class Report:
    """A task read from the store, ready to write as HTML."""

    def __init__(self, store: Store, task_id: str, *, rows: str | None = None, cols: str | None = None) -> None:
        self.view: TaskView = load_task(store, task_id)
        self.axes = Axes(self.view.dimensions, rows, cols)
        self.labels = [labels(d) for d in self.view.dimensions]
        self.cells: dict[tuple[int, ...], tuple[str, str]] = {}  # coordinate -> (status, html)
        self.counts: Counter[str] = Counter()
        self.image_seconds: list[float] = []
        self.retried = 0
        stray = 0
        for sub in store.iter_subtasks(task_id):
            place = indices_of(sub, self.view.dimensions)
            if place is None:
                stray += 1
                continue
            values = [self.labels[d][i] for d, i in enumerate(place)]
            status = str(sub.get("status"))
            self.cells[place] = (status, render_cell(sub, values))
            self.counts[status] += 1
            if history(sub):
                self.retried += 1
            if status == Status.COMPLETED:
                took = seconds_between(sub.get("started_at"), sub.get("completed_at"))
                if took is not None:
                    self.image_seconds.append(took)
        self.stray = stray

    # --- pieces ---

    def _facts(self) -> str:
        doc = self.view.doc
        status = str(doc.get("status"))
        total = int(doc.get("total_images") or 0)
        rows: list[tuple[str, str]] = [
            ("task id", esc(doc["id"])),
            ("owner", esc(doc.get("owner")) or "\u2014"),  # escaped, as every value
            ("status", f'<span class="status s-{esc(status)}">{esc(status)}</span>'),
            ("round", esc(round_of(doc))),
            ("priority", esc(doc.get("priority"))),
            (
                "images",
                f"{total} in all: {esc(doc.get('completed_images'))} completed, "
                f"{esc(doc.get('failed_images'))} failed, {esc(doc.get('cancelled_images'))} cancelled, "
                f"{max(0, total - int(doc.get('processed_images') or 0))} not finished "
                f"({esc(doc.get('progress'))}% processed)",
            ),
        ]
        if self.retried:
            rows.append(("run again", f"{self.retried} images ran more than once (`nietest retry`)"))
        if doc.get("error"):
            rows.append(("note", esc(doc["error"])))
        for name in ("created_at", "started_at", "completed_at"):
            rows.append((name.replace("_", " "), esc(iso(doc.get(name)) or "—")))
        took = seconds_between(doc.get("started_at"), doc.get("completed_at"))
        if took is not None:
            rows.append(("duration", f"{took:.1f} s"))
        if self.image_seconds:
            rows.append(
                (
                    "time per image",
                    f"median {statistics.median(self.image_seconds):.1f} s, "
                    f"longest {max(self.image_seconds):.1f} s (start to end of a completed image)",
                )
            )
        if self.stray:
            rows.append(("left out", f"{self.stray} subtasks whose coordinates do not fit the task's variables"))
        return _facts_table(rows)

    def _fixed(self) -> str:
        task = self.view.task
        rows = [
            (esc(p.name), esc(taskspec.value_label(p.value)) or "\u2014") for p in task.parameters if not p.is_variable
        ]
        prompts = []
        for i, prompt in enumerate(task.prompts):
            if prompt.get("is_variable"):
                prompts.append(f"<li>[{esc(prompt.get('variable_name'))}: a variable]</li>")
            else:
                kind = esc(prompt.get("type"))
                prompts.append(f'<li><span class="meta">{kind}</span> {esc(taskspec.value_label(prompt))}</li>')
            if i > 200:
                break
        prompts_html = f"<ol>{''.join(prompts)}</ol>" if prompts else "<p>none</p>"
        return f"<h2>Fixed parameters</h2>{_facts_table(rows)}<h2>Prompts</h2>{prompts_html}"

    def _variables(self) -> str:
        if not self.view.dimensions:
            return "<h2>Variables</h2><p>none: the task is one image</p>"
        role = {}
        if self.axes.row is not None:
            role[self.axes.row.index] = "rows"
        if self.axes.col is not None:
            role[self.axes.col.index] = "columns"
        items = []
        for dim in self.view.dimensions:
            values = ", ".join(esc(short(v)) for v in self.labels[dim.index][:12])
            more = f", … ({dim.size} values)" if dim.size > 12 else ""
            items.append(
                f"<tr><th>{esc(dim.variable_name)}</th><td>{esc(dim.variable_type)}</td>"
                f"<td>{role.get(dim.index, 'one grid per value')}</td><td>{values}{more}</td></tr>"
            )
        return (
            '<h2>Variables</h2><table class="facts"><tr><th>name</th><th>type</th><th>shown as</th><th>values</th>'
            f"</tr>{''.join(items)}</table>"
        )

    def _blocks(self) -> Iterator[tuple[str, str, Counter[str], list[str]]]:
        """(id, title, counts, body parts) of every block, in order."""
        axes = self.axes
        n_rows = axes.row.size if axes.row is not None else 1
        n_cols = axes.col.size if axes.col is not None else 1
        per_block = max(1, CELLS_PER_BLOCK // n_cols)
        header = ""
        if axes.col is not None:
            heads = "".join(
                f'<th title="{esc(short(v, TITLE_CHARS))}">{esc(short(v))}</th>' for v in self.labels[axes.col.index]
            )
            corner = esc(f"{axes.row.variable_name} \u2193 / " if axes.row is not None else "")
            header = f"<thead><tr><th>{corner}{esc(axes.col.variable_name)} \u2192</th>{heads}</tr></thead>"
        number = 0
        for section in itertools.product(*(range(d.size) for d in axes.sections)):
            where = " · ".join(
                f"{d.variable_name} = {short(self.labels[d.index][i])}"
                for d, i in zip(axes.sections, section, strict=True)
            )
            for start in range(0, n_rows, per_block):
                stop = min(n_rows, start + per_block)
                counts: Counter[str] = Counter()
                parts = ['<table class="grid">', header, "<tbody>"]
                for r in range(start, stop):
                    parts.append("<tr>")
                    if axes.row is not None:
                        label = self.labels[axes.row.index][r]
                        parts.append(
                            f'<th class="row" title="{esc(short(label, TITLE_CHARS))}">{esc(short(label))}</th>'
                        )
                    elif axes.col is not None:
                        parts.append('<th class="row"></th>')
                    for c in range(n_cols):
                        status, cell = self.cells.get(axes.coordinate(section, r, c), ("missing", MISSING_CELL))
                        counts[status] += 1
                        parts.append(cell)
                    parts.append("</tr>")
                parts.append("</tbody></table>")
                title = where
                if n_rows > per_block and axes.row is not None:
                    span = f"{axes.row.variable_name} {start + 1}\u2013{stop} of {n_rows}"
                    title = f"{title} · {span}" if title else span
                number += 1
                yield f"b{number}", title or "all images", counts, parts

    def write(self, out: IO[str]) -> int:
        """Write the page; how many cells it holds."""
        doc = self.view.doc
        name = str(doc.get("name") or doc["id"])
        out.write(
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="referrer" content="no-referrer">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(name)} \u2014 nietest report</title><style>{STYLE}</style></head><body>"
        )
        out.write(f"<h1>{esc(name)}</h1>{self._facts()}{self._fixed()}{self._variables()}")
        blocks = list(self._blocks())
        if len(blocks) > 1:
            toc = "".join(
                f'<li><a href="#{bid}">{esc(title)}</a> <span class="n">{_tally(counts)}</span></li>'
                for bid, title, counts, _ in blocks
            )
            out.write(
                f'<h2>Images</h2><details class="toc"><summary>{len(blocks)} blocks</summary>'
                f'<nav class="toc"><ol>{toc}</ol></nav></details>'
            )
        else:
            out.write("<h2>Images</h2>")
        cells = 0
        for i, (bid, title, counts, parts) in enumerate(blocks):
            cells += sum(counts.values())
            out.write(
                f'<details class="block" id="{bid}"{" open" if i == 0 else ""}><summary>{esc(title)} '
                f'<span class="n">{_tally(counts)}</span></summary><div class="scroll">'
            )
            out.write("".join(parts))
            out.write("</div></details>")
        out.write("</body></html>\n")
        return cells


def _facts_table(rows: Sequence[tuple[str, str]]) -> str:
    """Rows of (escaped name, escaped html)."""
    return '<table class="facts">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _tally(counts: Counter[str]) -> str:
    order = (Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.PROCESSING, Status.PENDING, "missing")
    shown = [f"{counts[s]} {s}" for s in order if counts.get(s)]
    return esc(f"({', '.join(shown)})") if shown else ""


def default_path(task_id: str) -> Path:
    return Path(f"nietest-report-{task_id}.html")


def write_report(store: Store, task_id: str, path: Path, *, rows: str | None = None, cols: str | None = None) -> int:
    """Write the report of a task to `path` (through a temporary file: never half a page); its cells."""
    report = Report(store, task_id, rows=rows, cols=cols)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("w", encoding="utf-8") as out:
            cells = report.write(out)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return cells


def run(settings: Settings, task_id: str, *, output: str | None, rows: str | None, cols: str | None) -> int:
    from nietest_daemon.store import open_store_for

    path = Path(output) if output else default_path(task_id)
    store = open_store_for(settings)
    try:
        cells = write_report(store, task_id, path, rows=rows, cols=cols)
    except ResultsError as exc:
        print(f"nietest: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"nietest: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    size = path.stat().st_size
    print(f"{path} ({cells} images, {math.ceil(size / 1024)} KiB)")
    return 0
