"""The Feishu webhook client against a real HTTP fake on 127.0.0.1 (nietest_daemon/testing/fake_feishu.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from nietest_daemon.clients.feishu import MAX_BODY_BYTES, FeishuClient, build_card, fit_card, sign
from nietest_daemon.coordination.rate_limit import RateLimiter
from nietest_daemon.testing.fake_feishu import FakeFeishu, Hang, Reply

SECRET = "test-secret-Zq8vX2"
HOST = "unit-host"


@dataclass
class Captured:
    """Everything logged during a test: structlog events, stdlib records (httpx), stdout/stderr."""

    events: list[dict[str, Any]] = field(default_factory=list)
    text: Callable[[], str] = lambda: ""

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> Iterator[Captured]:
    caplog.set_level(logging.DEBUG)
    captured = Captured()
    with structlog.testing.capture_logs() as events:
        captured.events = events

        def text() -> str:
            out, err = capsys.readouterr()
            return "\n".join([repr(events), caplog.text, out, err])

        captured.text = text
        yield captured


@pytest.fixture
def hook(logged: Captured) -> Iterator[FakeFeishu]:
    """A signed fake webhook; at the end, neither its URL/token nor the secret may be in any log."""
    with FakeFeishu(secret=SECRET) as fake:
        yield fake
        text = logged.text()
        assert fake.token not in text and fake.url not in text and SECRET not in text


def client_for(fake: FakeFeishu, secret: str | None = SECRET, **kwargs: Any) -> FeishuClient:
    options: dict[str, Any] = {"host": HOST, "backoff": 0.02, "trust_env": False}
    options.update(kwargs)
    return FeishuClient(fake.url, secret, None, **options)


# --- signing and card format ---------------------------------------------------------------------


def test_sign_is_hmac_of_an_empty_message_keyed_with_timestamp_and_secret() -> None:
    expected = base64.b64encode(hmac.new(b"1599360473\nsecret", b"", hashlib.sha256).digest()).decode()
    assert sign(1599360473, "secret") == sign("1599360473", "secret") == expected


def test_signed_card_is_accepted_by_the_fake(hook: FakeFeishu) -> None:
    with client_for(hook) as client:
        result = client.send_card("Worker restarted", ["line one", "line two"], "critical", queue="nietest.subtask")
    assert result.delivered and result.attempts == 1 and result.error is None
    (request,) = hook.received
    assert request.sign_ok is True
    body = request.body
    assert body["msg_type"] == "interactive" and body["timestamp"].isdigit() and body["sign"]
    header = body["card"]["header"]
    assert header["template"] == "red"
    assert HOST in header["title"]["content"] and "nietest.subtask" in header["title"]["content"]
    assert "Worker restarted" in header["title"]["content"]
    assert body["card"]["elements"][0]["text"]["content"] == "line one\nline two"


@pytest.mark.parametrize(("severity", "colour"), [("info", "blue"), ("warning", "orange"), ("success", "green")])
def test_header_colour_follows_severity(severity: Any, colour: str) -> None:
    card = build_card("t", "c", severity, fields={"queue": "q", "failures": 5}, host="h")
    assert card["card"]["header"]["template"] == colour
    fields = card["card"]["elements"][1]["fields"]
    assert [f["text"]["content"] for f in fields] == ["**queue**\nq", "**failures**\n5"]


def test_unsigned_when_no_secret(logged: Captured) -> None:
    with FakeFeishu() as fake, client_for(fake, secret=None) as client:
        assert client.send_card("t", "c").delivered
        assert "sign" not in fake.messages[0] and "timestamp" not in fake.messages[0]


# --- answers, retries, configuration errors ------------------------------------------------------


def test_rate_limit_code_then_success_is_delivered_on_attempt_two(hook: FakeFeishu, logged: Captured) -> None:
    hook.script(9499, 0)
    with client_for(hook) as client:
        result = client.send_card("t", "c")
    assert result.delivered and result.attempts == 2
    assert len(hook.received) == 2 and all(r.sign_ok for r in hook.received)
    assert hook.received[0].body["sign"]  # each attempt signed afresh


@pytest.mark.parametrize("code", [19021, 19022, 19024])
def test_configuration_errors_are_not_retried_and_logged_as_such(hook: FakeFeishu, logged: Captured, code: int) -> None:
    hook.script(code)
    with client_for(hook) as client:
        result = client.send_card("Disk full", "the content to keep", "warning")
    assert not result.delivered and result.attempts == 1 and result.config_error and result.code == code
    assert len(hook.received) == 1
    (config,) = logged.named("feishu configuration error")
    assert config["log_level"] == "error" and config["code"] == code and config["hint"]
    (lost,) = logged.named("feishu message not delivered")
    assert lost["content"] == "the content to keep" and lost["title"] == "Disk full"


def test_wrong_secret_gets_19021_from_the_fake_once(hook: FakeFeishu, logged: Captured) -> None:
    with client_for(hook, secret="not-the-secret") as client:
        result = client.send_card("t", "c")
    assert not result.delivered and result.code == 19021 and result.config_error
    assert len(hook.received) == 1 and hook.received[0].sign_ok is False
    assert logged.named("feishu configuration error")
    assert "not-the-secret" not in logged.text()


def test_nonzero_code_on_http_200_is_a_failure(hook: FakeFeishu, logged: Captured) -> None:
    hook.script(Reply(code=19001, msg="param invalid"))
    with client_for(hook) as client:
        result = client.send_card("t", "c")
    assert not result.delivered and result.attempts == 1 and result.code == 19001 and not result.config_error


@pytest.mark.parametrize("reply", [Reply(status=500, code=1), Reply(status=503), Reply(status=429, code=99991400)])
def test_server_errors_and_http_429_are_retried(hook: FakeFeishu, logged: Captured, reply: Reply) -> None:
    hook.script(reply, reply, 0)
    with client_for(hook) as client:
        result = client.send_card("t", "c")
    assert result.delivered and result.attempts == 3 and len(hook.received) == 3


def test_retry_after_is_honoured(hook: FakeFeishu, logged: Captured) -> None:
    hook.script(Reply(status=429, code=9499, headers={"Retry-After": "0.5"}), 0)
    with client_for(hook) as client:
        assert client.send_card("t", "c").delivered
    first, second = hook.received
    assert second.time - first.time >= 0.45


def test_persistent_server_error_gives_up_after_max_attempts(hook: FakeFeishu, logged: Captured) -> None:
    hook.script(*[Reply(status=500)] * 5)
    with client_for(hook, max_attempts=3) as client:
        result = client.send_card("t", "lost content")
    assert not result.delivered and result.attempts == 3 and "HTTP 500" in (result.error or "")
    assert logged.named("feishu message not delivered")[0]["content"] == "lost content"


def test_hanging_webhook_returns_within_the_deadline(hook: FakeFeishu, logged: Captured) -> None:
    hook.script(Hang(15), Hang(15), Hang(15))
    with client_for(hook, timeout=0.7, deadline=1.5) as client:
        start = time.monotonic()
        result = client.send_card("t", "content of the lost alert")
        elapsed = time.monotonic() - start
    assert elapsed < 2.2, elapsed
    assert not result.delivered and result.attempts >= 1 and "timeout" in (result.error or "")
    assert logged.named("feishu message not delivered")[0]["content"] == "content of the lost alert"


def test_a_post_that_timed_out_is_not_posted_again(hook: FakeFeishu, logged: Captured) -> None:
    """The webhook got it and answered late: a second post would show the card twice."""
    hook.script(Hang(2))
    with client_for(hook, timeout=0.5, deadline=5.0, max_attempts=3) as client:
        result = client.send_card("t", "once")
    assert not result.delivered and result.attempts == 1 and "timeout" in (result.error or "")
    time.sleep(0.2)
    assert len(hook.received) == 1


def test_unreachable_webhook_fails_fast(logged: Captured) -> None:
    with FakeFeishu() as fake:
        url = fake.url
    with FeishuClient(url, None, host=HOST, backoff=0.02, deadline=2.0, trust_env=False) as client:
        start = time.monotonic()
        result = client.send_card("t", "c")
    assert not result.delivered and time.monotonic() - start < 2.5
    assert url not in logged.text()


def test_background_mode_never_blocks_the_caller(hook: FakeFeishu, logged: Captured) -> None:
    hook.script(Hang(15))
    client = client_for(hook, timeout=0.5, deadline=1.0, max_attempts=1)
    start = time.monotonic()
    assert client.submit_card("first", "c") and client.submit_card("second", "c")
    assert time.monotonic() - start < 0.2
    assert client.flush(10)
    client.close()
    assert [r.body["card"]["header"]["title"]["content"] for r in hook.received] == [
        f"[{HOST}] first",
        f"[{HOST}] second",
    ]
    assert [e["title"] for e in logged.named("feishu message not delivered")] == ["first"]
    assert [e["title"] for e in logged.named("feishu message delivered")] == ["second"]


# --- body size -----------------------------------------------------------------------------------


def test_body_over_20kb_is_cut_below_20kb_and_says_so(hook: FakeFeishu, logged: Captured) -> None:
    content = "\n".join(f"失败 subtask {i}: " + "x" * 80 for i in range(600))  # ~60 KB, multi-byte too
    with client_for(hook) as client:
        result = client.send_card("Many failures", content, "critical", fields={"queue": "q"})
    assert result.delivered and result.truncated
    (request,) = hook.received
    assert len(request.raw) < MAX_BODY_BYTES <= 20 * 1024 and request.sign_ok
    text = request.body["card"]["elements"][0]["text"]["content"]
    assert text.startswith(content[:1000]) and "truncated" in text
    assert len(request.raw) > 15_000  # cut to the limit, not far below it


def test_oversized_fields_are_dropped_to_fit() -> None:
    body, truncated = fit_card("t", "c" * 30_000, "info", fields={f"k{i}": "v" * 5000 for i in range(40)})
    assert truncated and len(json.dumps(body, ensure_ascii=False).encode()) < MAX_BODY_BYTES


def test_small_body_is_untouched() -> None:
    body, truncated = fit_card("t", "short", "info")
    assert not truncated and body["card"]["elements"][0]["text"]["content"] == "short"


# --- rate limiting -------------------------------------------------------------------------------


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max(sum(1 for u in times[i:] if u < t + window) for i, t in enumerate(times))


def test_two_clients_sharing_redis_stay_under_5_per_second(hook: FakeFeishu, logged: Captured, valkey: Any) -> None:
    server = valkey
    clients = [
        FeishuClient(hook.url, SECRET, redis.Redis.from_url(server.url), host=HOST, deadline=20, trust_env=False)
        for _ in range(2)
    ]
    results: list[Any] = []

    def send(client: FeishuClient, n: int) -> None:
        results.extend(client.send_card(f"alert {i}", "c") for i in range(n))

    threads = [threading.Thread(target=send, args=(c, 5)) for c in clients]  # 10 cards: at least 1 s
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 10 and all(r.delivered and r.attempts == 1 for r in results)
    times = [r.time for r in hook.received]
    assert len(times) == 10 and max(times) - min(times) >= 0.9  # 10 cards at 5/s: the second five waited
    assert max_in_window(times, 1.0) <= 5
    # The count lives in Redis, under a hash of the URL.
    keys = [k.decode() for k in redis.Redis.from_url(server.url).keys("*")]
    assert keys == [clients[0].limiter.key_for(hook.url)]
    assert all(hook.token not in k and "http" not in k for k in keys)
    for c in clients:
        c.close()


def test_local_limiter_honours_5_per_second_and_100_per_minute() -> None:
    now = [1000.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    limiter = RateLimiter(None, "unit-test-local", clock=lambda: now[0], sleep=sleep)
    url = f"http://127.0.0.1:1/hook/{time.time_ns()}"
    granted: list[float] = []
    while limiter.acquire(url, timeout=5):  # refused once the minute is full: the wait is then > 5 s
        granted.append(now[0])
    assert len(granted) == 100 and granted[-1] - granted[0] < 60
    assert max_in_window(granted, 1.0) <= 5
    assert limiter.acquire(url, timeout=60)  # a minute after the first one
    assert now[0] - granted[0] >= 60


def test_redis_down_falls_back_to_the_local_limiter(logged: Captured) -> None:
    broken = redis.Redis(unix_socket_path="/nonexistent/v.sock", socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    limiter = RateLimiter(broken, "unit-test-broken")
    url = f"http://127.0.0.1:1/hook/{time.time_ns()}"
    assert limiter.acquire(url, timeout=1) and limiter.acquire(url, timeout=1)
    # One warning: after a failure the limiter does not ask Redis again for a while.
    assert len(logged.named("feishu rate limiter: redis unavailable, limiting this process only")) == 1


# --- no webhook, and secrets in logs -------------------------------------------------------------


def test_no_webhook_logs_the_message_only(logged: Captured) -> None:
    client = FeishuClient(None, SECRET, None, host=HOST)
    result = client.send_card("Queue failing", "five failures in a row", "critical", queue="q")
    assert not result.delivered and result.skipped and result.attempts == 0
    assert client.submit_card("again", "x")
    (first, second) = logged.named("feishu webhook not configured; message logged only")
    assert first["content"] == "five failures in a row" and first["queue"] == "q"
    assert second["title"] == "again"
    client.close()


def test_json_log_lines_of_a_real_process_hold_neither_url_nor_secret(hook: FakeFeishu) -> None:
    """The production pipeline (logs.configure, no set_secrets): failures and httpx lines stay clean."""
    hook.script(Reply(status=500), 19021, 0)
    script = textwrap.dedent(
        """
        import logging, os
        from nietest_daemon.core import logs
        logs.configure("unit", level="DEBUG")
        from nietest_daemon.clients.feishu import FeishuClient
        c = FeishuClient(os.environ["HOOK"], os.environ["SECRET"], None, backoff=0.01, trust_env=False)
        c.send_card("one", "first")
        c.send_card("two", "second")
        try:
            raise RuntimeError("boom " + os.environ["HOOK"])
        except RuntimeError as exc:
            c.send_card("three", "third", fields={"error": "x"})
        """
    )
    env = {**os.environ, "HOOK": hook.url, "SECRET": SECRET}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    events = [r["event"] for r in records]
    assert "feishu configuration error" in events and "feishu message delivered" in events
    assert any(r["logger"] == "httpx" for r in records)
    output = result.stdout + result.stderr
    assert hook.token not in output and SECRET not in output


# --- the transport seam: no sockets ----------------------------------------------------------------


def test_client_runs_on_a_mock_transport_and_turns_transport_errors_into_outcomes() -> None:
    hook = "https://open.feishu.cn/open-apis/bot/v2/hook/mock-token-0042"
    answers = iter(
        [
            httpx.ConnectError("refused"),
            httpx.Response(200, json={"code": 0, "msg": "success"}),
        ]
    )
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    client = FeishuClient(hook, "s3cret-mock", host="h", transport=httpx.MockTransport(handler), sleep=lambda _: None)
    try:
        result = client.send_card("title", "text")
    finally:
        client.close()
    assert result.delivered and result.attempts == 2
    assert len(bodies) == 2 and bodies[0]["msg_type"] == "interactive" and "sign" in bodies[0]
