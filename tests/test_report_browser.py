"""`nietest report` opened in a real browser: Debian's headless Chromium (`/usr/bin/chromium`, which
`.ci/run` installs; the tests skip without it).

- `--dump-dom` gives the DOM after the page loaded: the cells, images and error cells are counted
  in it, and it shows that no script ran: the hostile prompts would change the page's title, add
  an attribute and an element if any of them ran as a script or a handler, and none of that is
  there, while the same harness on a page with a real script does see its changes (the control).
- `--screenshot` keeps a picture of the report in tests/artifacts/ (ignored by git; its path is
  printed), checked not to be blank: it is decoded (a small PNG reader below: zlib and the five
  row filters) and must show the colours of the completed and failed cells and of the images,
  which a local HTTP server serves.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_results import Dom, store_task, task_document

from nietest_daemon.domain.lifecycle import Status
from nietest_daemon.programs import report
from nietest_daemon.store import SQLiteStore

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

#: The issue's example, and payloads that would leave a visible trace if they ever ran.
HOSTILE = [
    "<script>alert(1)</script><img src=x onerror=alert(2)>",
    "<script>document.title='pwned'</script>",
    "<img src=x onerror=\"document.documentElement.setAttribute('data-pwned','1')\">",
    '"><svg onload="document.body.appendChild(document.createElement(\'pwned\'))">',
]
IMAGE_RGB = (30, 144, 255)  # the colour of every image the local server serves
COMPLETED_RGB = (0xF3, 0xFB, 0xF4)  # td.completed
FAILED_RGB = (0xFD, 0xEC, 0xEC)  # td.failed

# A real browser process per test (about 1-2 s each): the e2e tier, not the quick loop.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium (apt-get install chromium)"),
]


# --- a PNG: written for the image server, read back from the screenshot --------------------------------


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _add(x: bytes, y: bytes) -> bytes:
    """Bytewise (x + y) mod 256 of two equal-length strings, on big integers (no per-byte loop)."""
    n = len(x)
    high = int.from_bytes(b"\x80" * n, "big")
    low = high >> 7 | int.from_bytes(b"\x7f" * n, "big")
    a, b = int.from_bytes(x, "big"), int.from_bytes(y, "big")
    return (((a & low) + (b & low)) ^ ((a ^ b) & high)).to_bytes(n, "big")


def _sub_filter(row: bytes, bpp: int) -> bytes:
    """Undo the Sub filter: a running sum per channel, by doubling steps."""
    out, shift = row, bpp
    while shift < len(row):
        out = _add(out, bytes(shift) + out[:-shift])
        shift *= 2
    return out


def read_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height, bpp = 8, bytearray(), 0, 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(bytes(idat))
    stride = width * bpp
    rows: list[bytes] = []
    previous = bytes(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]
        if kind == 0:
            row = line
        elif kind == 1:
            row = _sub_filter(line, bpp)
        elif kind == 2:
            row = _add(line, previous)
        else:  # Average, Paeth: rare in Chromium's screenshots, one byte at a time
            out = bytearray(line)
            for i in range(stride):
                left = out[i - bpp] if i >= bpp else 0
                up = previous[i]
                if kind == 3:
                    out[i] = (out[i] + (left + up) // 2) & 0xFF
                else:
                    corner = previous[i - bpp] if i >= bpp else 0
                    p = left + up - corner
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                    pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                    out[i] = (out[i] + pred) & 0xFF
            row = bytes(out)
        rows.append(row)
        previous = row
    if bpp == 4:  # drop alpha
        rows = [bytes(b for i, b in enumerate(r) if i % 4 != 3) for r in rows]
    return width, height, rows


def colours(rows: list[bytes]) -> Counter[tuple[int, int, int]]:
    found: Counter[tuple[int, int, int]] = Counter()
    for row in rows[::2]:  # every other row: plenty for a census
        found.update(zip(row[0::3], row[1::3], row[2::3], strict=True))
    return found


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    """Serves the same small blue PNG at every path, as the image host would."""
    body = png(96, 128, IMAGE_RGB)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def chromium(tmp: Path, page: Path, *args: str) -> str:
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={tmp / 'chromium-profile'}",
            "--virtual-time-budget=5000",  # let the page (and its lazy images) settle first
            *args,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory, image_server: str) -> dict[str, Any]:
    """A report of 3 styles (the hostile ones) x 2 ratios x 2 polish values = 12 cells."""
    tmp = tmp_path_factory.mktemp("browser")
    store = SQLiteStore(tmp / "data")
    styles = [HOSTILE[0], HOSTILE[1] + HOSTILE[2], "watercolor " + HOSTILE[3]]
    ids = store_task(store, "t", task_document(styles, ["1:1", "3:4"], [False, True], name="sweep " + HOSTILE[1]))
    # Polish varies fastest: the even subtasks make the first (open) grid, the odd ones the second.
    ok, failed, cancelled = Status.COMPLETED, Status.FAILED, Status.CANCELLED
    plan = [ok, ok, failed, cancelled, ok, None, ok, failed, cancelled, ok, None]
    plan.append(ok)
    for i, (sid, status) in enumerate(zip(ids, plan, strict=True)):
        if status is None:
            continue
        store.start_subtask(sid)
        result = f"{image_server}/img/{i}.png" if status == Status.COMPLETED else None
        error = f"moderation said no: {HOSTILE[0] if i < 6 else HOSTILE[1]}" if status == Status.FAILED else None
        store.finish_subtask(sid, status, result=result, error=error)
    path = tmp / "report.html"
    report.write_report(store, "t", path, rows="style", cols="ratio")
    store.close()
    expected = Counter(s for s in plan)
    return {"tmp": tmp, "path": path, "expected": expected}


# --- the tests ----------------------------------------------------------------------------------------


def test_the_harness_sees_a_script_that_runs(tmp_path: Path) -> None:
    """The control: on a page that does have a script, the dumped DOM shows what it did."""
    control = tmp_path / "control.html"
    control.write_text(
        "<!DOCTYPE html><html><head><title>before</title></head><body><p>x</p>"
        "<script>document.title='pwned';document.documentElement.setAttribute('data-pwned','1');"
        "document.body.appendChild(document.createElement('pwned'))</script></body></html>"
    )
    dom = Dom(chromium(tmp_path, control, "--dump-dom"))
    assert "pwned" in "".join(dom.text)  # the title
    assert any(a.get("data-pwned") == "1" for t, a in dom.elements if t == "html")
    assert dom.count("pwned") == 1


def test_the_report_in_chromium_has_every_cell_and_runs_no_script(page: dict[str, Any]) -> None:
    dumped = chromium(page["tmp"], page["path"], "--dump-dom")
    dom = Dom(dumped)
    expected = page["expected"]
    assert dom.count("td", "cell") == 12
    assert dom.count("img") == expected[Status.COMPLETED] == dom.count("td", "completed") == 6
    assert dom.count("td", "failed") == expected[Status.FAILED] == 2
    assert dom.count("td", "cancelled") == expected[Status.CANCELLED] == 2
    assert dom.count("td", "pending") == 2
    assert all(a.get("loading") == "lazy" for t, a in dom.elements if t == "img")
    # No script ran: the title is the task's name as text, nothing was added or set.
    [title] = [text for text in dom.text if text.startswith("sweep ")][:1]
    assert title == "sweep " + HOSTILE[1] + " \u2014 nietest report"
    assert dom.count("script") == 0 and dom.count("svg") == 0 and dom.count("pwned") == 0
    assert not any("data-pwned" in attrs for _, attrs in dom.elements)
    assert not any(name.startswith("on") for _, attrs in dom.elements for name in attrs)
    # The hostile values are there as text: in the errors, the headers (whole in their titles) and captions.
    text = "".join(dom.text)
    assert "moderation said no: " + HOSTILE[0] in text and "moderation said no: " + HOSTILE[1] in text
    shown = text + "".join(v or "" for _, attrs in dom.elements for v in attrs.values())
    for payload in HOSTILE:
        assert payload in shown
    assert sum(1 for t, a in dom.elements if t == "th" and a.get("title") == HOSTILE[0]) == 2  # one per grid


def test_the_report_screenshot_is_not_blank(page: dict[str, Any]) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-screenshot.png"
    shot.unlink(missing_ok=True)
    chromium(page["tmp"], page["path"], f"--screenshot={shot}", "--window-size=1280,2000")
    print(f"report screenshot: {shot}")
    width, height, rows = read_png(shot.read_bytes())
    assert (width, height) == (1280, 2000)
    found = colours(rows)
    total = sum(found.values())
    white = found[(255, 255, 255)]
    assert white < 0.97 * total, "the screenshot is (almost) blank"
    assert len(found) > 50  # text, borders, images: many colours
    assert found[IMAGE_RGB] > 1000, "no image was drawn"
    assert found[COMPLETED_RGB] > 100 and found[FAILED_RGB] > 100, "no completed or failed cell was drawn"
