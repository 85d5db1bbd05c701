"""The JSON log renderer, exercised in a real child process (its stdout is what supervisord captures)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap

from nietest_daemon.core.logs import MAX_LINE_BYTES, render_line
from nietest_daemon.core.redaction import Redactor

SCRIPT = textwrap.dedent(
    """
    import logging, sys, warnings
    from nietest_daemon.core import logs
    from nietest_daemon.core.redaction import set_secrets
    logs.configure("unit")
    set_secrets(["tok-SECRET-1", 'quo"te-secret'])
    log = logs.get_logger("unit.test")
    log.info("hello", task_id="t1", count=3)
    logging.getLogger("dramatiq.worker").warning("library says %s", "hi")
    log.info("token tok-SECRET-1 and url redis://:pw123@h/0 and quo\\"te-secret")
    print("a stray print")
    sys.stderr.write("stderr line one\\nstderr line two\\n")
    warnings.warn("deprecated thing")
    try:
        {}["missing"]
    except KeyError:
        log.exception("it failed", subtask_id="s1")
    log.info("big", blob="x" * 100000)
    raise RuntimeError("uncaught tok-SECRET-1")
    """
)


@functools.cache
def run_script() -> tuple[list[dict], str]:
    """The script's records and raw output; run once for all the tests that read them (~0.3 s each)."""
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=30)
    lines = result.stdout.splitlines()
    return [json.loads(line) for line in lines], result.stdout + result.stderr


def test_every_line_is_json_with_the_keys() -> None:
    records, raw = run_script()
    assert records, raw
    for r in records:
        assert {"timestamp", "level", "event", "logger", "pid", "process"} <= r.keys(), r
        assert r["timestamp"].endswith("Z") and r["process"] == "unit"
    events = [r["event"] for r in records]
    assert "hello" in events and "library says hi" in events
    hello = next(r for r in records if r["event"] == "hello")
    assert hello["task_id"] == "t1" and hello["count"] == 3 and hello["logger"] == "unit.test"
    assert next(r for r in records if r["event"] == "library says hi")["logger"] == "dramatiq.worker"


def test_stray_output_and_warnings_become_records() -> None:
    records, _ = run_script()
    by_event = {r["event"]: r for r in records}
    assert by_event["a stray print"]["logger"] == "stdout"
    assert by_event["stderr line one"]["logger"] == "stderr"
    assert by_event["stderr line two"]["level"] == "error"
    assert any("deprecated thing" in r["event"] for r in records)


def test_exceptions_are_structured_fields() -> None:
    records, _ = run_script()
    failed = next(r for r in records if r["event"] == "it failed")
    assert failed["exception"][0]["exc_type"] == "KeyError" and failed["subtask_id"] == "s1"
    assert "locals" not in failed["exception"][0]["frames"][0]
    uncaught = next(r for r in records if r["event"] == "unhandled exception")
    assert uncaught["level"] == "critical" and uncaught["exception"][0]["exc_type"] == "RuntimeError"


def test_secrets_are_masked_everywhere() -> None:
    records, raw = run_script()
    assert "tok-SECRET-1" not in raw and "pw123" not in raw and "quo" not in raw
    masked = next(r for r in records if r["event"].startswith("token "))
    assert masked["event"] == "token *** and url redis://:***@h/0 and ***"


def test_no_line_exceeds_the_cap() -> None:
    records, raw = run_script()
    assert all(len(line.encode()) <= MAX_LINE_BYTES for line in raw.splitlines())
    big = next(r for r in records if r["event"] == "big")
    assert big["truncated"] is True and "chars cut" in big["blob"]


def test_render_line_caps_even_a_huge_event() -> None:
    line = render_line(
        {
            "event": "e" * 50000,
            "level": "info",
            "timestamp": "t",
            "logger": "l",
            "pid": 1,
            "process": "p",
            "other": ["y" * 100] * 500,
        }
    )
    assert len(line.encode()) <= MAX_LINE_BYTES
    record = json.loads(line)
    assert record["truncated"] is True and record["level"] == "info"


def test_redactor_masks_feishu_hooks_and_url_passwords() -> None:
    redact = Redactor(["s3cret-value"])
    text = redact("post https://open.feishu.cn/open-apis/bot/v2/hook/0a1b-2c3d to mongodb://u:pw@h/x s3cret-value")
    assert text == "post https://open.feishu.cn/open-apis/bot/v2/hook/*** to mongodb://u:***@h/x ***"
