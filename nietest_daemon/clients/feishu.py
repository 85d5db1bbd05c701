"""Feishu custom-bot webhook client.

`FeishuClient.send_card` posts one interactive card and returns a `SendResult`; it never raises and
never takes longer than `deadline` seconds (plus one HTTP phase timeout at worst).

- Requests are signed when a secret is set: HMAC-SHA256 keyed with "{timestamp}\\n{secret}" over an
  empty message, base64; `timestamp` (seconds, as a string) and `sign` go in the body.
- Any body `code` other than 0 is a failure, even on HTTP 200. Rate limits (HTTP 429, codes 9499 and
  11232), server errors (5xx) and failures to connect are retried with backoff; a post that may have
  arrived (a read timeout, a dropped connection: `clients/transport.maybe_delivered`) is not, as
  Feishu would show the card twice; signature, IP and keyword errors (19021, 19022, 19024) are
  configuration errors: never retried, logged as such.
- Each webhook stays under 5 requests a second and 100 a minute across every process sharing one
  Redis (`coordination.rate_limit.RateLimiter`); without Redis, or while Redis fails, an in-process
  limiter stands in.
- Bodies stay under 20 KB: the card content is cut, and the card says so.
- No webhook: the message is only logged. An undelivered message is logged with its content.
  The webhook URL and the secret never appear in a log line or in a `SendResult`.
- `submit_card` queues the card for a background thread: the caller never waits for the network.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from queue import Empty, Full, Queue
from typing import Any, Literal

import httpx
import redis

from nietest_daemon.clients.tls import shared_ssl_context
from nietest_daemon.clients.transport import maybe_delivered
from nietest_daemon.coordination.keys import FEISHU_RATE_LIMIT_PREFIX
from nietest_daemon.coordination.rate_limit import RateLimiter
from nietest_daemon.core.backoff import SPREAD, parse_retry_after
from nietest_daemon.core.backoff import backoff as backoff_delay
from nietest_daemon.core.logs import get_logger
from nietest_daemon.core.redaction import add_secrets, redact
from nietest_daemon.core.settings import default_host_name

log = get_logger(__name__)

Severity = Literal["info", "warning", "critical", "success"]

#: Header template colour of a card, by severity.
TEMPLATES: dict[str, str] = {"info": "blue", "warning": "orange", "critical": "red", "success": "green"}

#: Feishu refuses bodies over 20 KB; we stay under 20,000 bytes, signature fields included.
MAX_BODY_BYTES = 20_000
_SIGN_RESERVE = 128  # room for "timestamp" and "sign" added at send time
MAX_FIELD_CHARS = 1_000
MAX_FIELDS = 30
MAX_TITLE_CHARS = 200
MAX_LOGGED_CONTENT = 8_000  # an undelivered message's content in its log line (lines are capped at 16 KiB)

RATE_LIMIT_CODES = frozenset({9499, 11232})
CONFIG_ERROR_CODES: dict[int, str] = {
    19021: "signature check failed: wrong secret, or the host clock is off by more than an hour",
    19022: "this host's IP address is not in the bot's allow list",
    19024: "the message does not contain any of the bot's keywords",
}

MAX_RETRY_AFTER = 10.0  # a longer Retry-After / x-ogw-ratelimit-reset is waited this long at most


# --- redaction -----------------------------------------------------------------------------------
# `redact` (core.redaction, the one redactor of the process) masks every webhook
# URL and secret a FeishuClient was built with, any Feishu hook token, known secrets and URL passwords.


class _RedactHttpxFilter(logging.Filter):
    """httpx logs every request line, URL included: mask the webhook before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return True


_HTTPX_FILTER = _RedactHttpxFilter()
for _name in ("httpx", "httpcore"):
    if not any(isinstance(f, _RedactHttpxFilter) for f in logging.getLogger(_name).filters):
        logging.getLogger(_name).addFilter(_HTTPX_FILTER)


# --- signing and cards ---------------------------------------------------------------------------


def sign(timestamp: int | str, secret: str) -> str:
    """Feishu signature: base64(HMAC-SHA256(key="{timestamp}\\n{secret}", message=b""))."""
    key = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


def card_title(title: str, host: str | None = None, queue: str | None = None) -> str:
    """The card header: "[host · queue] title"."""
    where = " · ".join(p for p in (host, queue) if p)
    text = f"[{where}] {title}" if where else title
    return text if len(text) <= MAX_TITLE_CHARS else text[: MAX_TITLE_CHARS - 1] + "…"


def _content_text(content: str | Sequence[str]) -> str:
    return content if isinstance(content, str) else "\n".join(str(line) for line in content)


def _short(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def build_card(
    title: str,
    content: str | Sequence[str],
    severity: Severity = "info",
    *,
    fields: Mapping[str, Any] | None = None,
    host: str | None = None,
    queue: str | None = None,
) -> dict[str, Any]:
    """An `interactive` message body: coloured header, markdown content, short key/value fields."""
    elements: list[dict[str, Any]] = []
    text = _content_text(content)
    if text:
        elements.append({"tag": "div", "text": {"tag": "lark_md", "content": text}})
    if fields:
        items = list(fields.items())[:MAX_FIELDS]
        elements.append(
            {
                "tag": "div",
                "fields": [
                    {
                        "is_short": True,
                        "text": {"tag": "lark_md", "content": f"**{_short(k, 100)}**\n{_short(v, MAX_FIELD_CHARS)}"},
                    }
                    for k, v in items
                ],
            }
        )
    return {
        "msg_type": "interactive",
        "card": {
            "config": {"wide_screen_mode": True},
            "header": {
                "template": TEMPLATES.get(severity, "blue"),
                "title": {"tag": "plain_text", "content": card_title(title, host, queue)},
            },
            "elements": elements,
        },
    }


def encode_body(body: Mapping[str, Any]) -> bytes:
    """The exact bytes sent: compact UTF-8 JSON."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def fit_card(
    title: str,
    content: str | Sequence[str],
    severity: Severity = "info",
    *,
    fields: Mapping[str, Any] | None = None,
    host: str | None = None,
    queue: str | None = None,
    max_bytes: int = MAX_BODY_BYTES,
) -> tuple[dict[str, Any], bool]:
    """`build_card`, with the content cut (and a note saying so) until the signed body fits `max_bytes`.

    Returns the body and whether anything was cut.
    """
    limit = max_bytes - _SIGN_RESERVE
    text = _content_text(content)

    def make(cut: int | None = None) -> dict[str, Any]:
        if cut is None:
            return build_card(title, text, severity, fields=fields, host=host, queue=queue)
        note = f"\n\n… *(message truncated: {len(text) - cut} of {len(text)} characters not shown)*"
        return build_card(title, text[:cut] + note, severity, fields=fields, host=host, queue=queue)

    whole = make(None)
    if len(encode_body(whole)) <= limit:
        return whole, False
    body = _largest_fit(make, len(text), limit)
    if body is None:  # the fields alone are too big: drop them
        fields = None
        body = _largest_fit(make, len(text), limit) or make(0)
    return body, True


def _largest_fit(make: Callable[[int], dict[str, Any]], length: int, limit: int) -> dict[str, Any] | None:
    """The body with the longest content prefix that encodes within `limit` bytes, or None."""
    low, high = -1, min(length, limit)  # every character is at least one byte
    while low < high:
        mid = (low + high + 1) // 2
        if len(encode_body(make(mid))) <= limit:
            low = mid
        else:
            high = mid - 1
    return make(low) if low >= 0 else None


# --- the client ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendResult:
    """What became of one message."""

    delivered: bool
    attempts: int
    error: str | None = None
    code: int | None = None  # the last Feishu body code seen, if any
    config_error: bool = False  # a signature / IP / keyword error: fix the configuration
    truncated: bool = False  # the content was cut to fit the body size limit
    skipped: bool = False  # no webhook configured: logged only


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    retryable: bool = False
    error: str | None = None
    code: int | None = None
    config_error: bool = False
    retry_after: float | None = None
    rate_limited: bool = False


@dataclass(frozen=True)
class _Job:
    body: dict[str, Any]
    summary: dict[str, Any]
    truncated: bool


def _default_host() -> str:
    """The daemon's name (NIETEST_HOST_NAME, exported to every supervised process), else the machine's."""
    return os.environ.get("NIETEST_HOST_NAME", "").strip() or default_host_name()


class FeishuClient:
    """Sends cards to one Feishu custom-bot webhook; see the module docstring for the guarantees.

    `timeout` bounds each HTTP phase of one attempt; `deadline` bounds a whole send: rate-limit
    waits, attempts and backoff. `clock` (monotonic), `sleep`, `wall_clock` (signature
    timestamps) and `transport` (an `httpx.MockTransport`: no sockets) are injectable for tests.
    Every failure of an attempt, httpx's exceptions included, becomes its outcome: none escapes.
    `on_result(outcome)` hears what became of each message sent (sent, failed or rate_limited: the
    last attempt was refused for the rate limit, or no slot of ours was free in time): the metrics hook.
    """

    def __init__(
        self,
        webhook_url: str | None,
        secret: str | None = None,
        redis_client: redis.Redis | None = None,
        *,
        host: str | None = None,
        timeout: float = 3.0,
        deadline: float = 6.0,
        max_attempts: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 4.0,
        rate_limiter: RateLimiter | None = None,
        key_prefix: str = FEISHU_RATE_LIMIT_PREFIX,
        queue_size: int = 200,
        trust_env: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall_clock: Callable[[], float] = time.time,
        transport: httpx.BaseTransport | None = None,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.webhook_url = webhook_url or None
        self.on_result = on_result
        self.secret = secret or None
        add_secrets([self.webhook_url, self.secret])
        self.host = host if host is not None else _default_host()
        self.timeout = timeout
        self.deadline = deadline
        self.max_attempts = max(1, max_attempts)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.clock = clock
        self.sleep = sleep
        self.wall_clock = wall_clock
        self.limiter = rate_limiter or RateLimiter(redis_client, key_prefix, clock=clock, sleep=sleep)
        self._http = (
            httpx.Client(
                trust_env=trust_env,
                verify=shared_ssl_context(trust_env),
                follow_redirects=False,
                transport=transport,
            )
            if self.webhook_url
            else None
        )
        self._queue: Queue[_Job | None] = Queue(maxsize=queue_size)
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self._in_flight: _Job | None = None  # the job the background sender is delivering
        self._closed = False

    @property
    def configured(self) -> bool:
        return self.webhook_url is not None

    # --- public API ------------------------------------------------------------------------------

    def send_card(
        self,
        title: str,
        content: str | Sequence[str],
        severity: Severity = "info",
        *,
        fields: Mapping[str, Any] | None = None,
        queue: str | None = None,
    ) -> SendResult:
        """Send one card now (bounded by `deadline`); never raises."""
        try:
            job = self._job(title, content, severity, fields, queue)
            return self._deliver(job)
        except Exception as exc:  # never crash the caller
            error = redact(f"{type(exc).__name__}: {exc}")
            self._log_undelivered({"title": title, "content": _content_text(content)}, error, 0)
            return SendResult(False, 0, error)

    def submit_card(
        self,
        title: str,
        content: str | Sequence[str],
        severity: Severity = "info",
        *,
        fields: Mapping[str, Any] | None = None,
        queue: str | None = None,
    ) -> bool:
        """Queue one card for the background sender and return at once; False if it was dropped."""
        try:
            job = self._job(title, content, severity, fields, queue)
        except Exception as exc:
            self._log_undelivered({"title": title}, redact(f"{type(exc).__name__}: {exc}"), 0)
            return False
        if not self.configured:
            self._log_skipped(job)
            return True
        if self._closed:
            self._log_undelivered(job.summary, "client closed", 0)
            return False
        self._ensure_worker()
        try:
            self._queue.put_nowait(job)
        except Full:
            self._log_undelivered(job.summary, "background queue full", 0)
            return False
        return True

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued card was sent (or given up); False if `timeout` came first."""
        end = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (for up to `timeout` s), log whatever is left, release the connection pool."""
        self._closed = True
        worker = self._worker
        if worker is not None and worker.is_alive():
            self.flush(timeout)
        while True:  # anything the worker did not get to in time
            try:
                job = self._queue.get_nowait()
            except Empty:
                break
            if job is not None:
                self._log_undelivered(job.summary, "client closed before sending", 0)
            self._queue.task_done()
        if worker is not None and worker.is_alive():
            with contextlib.suppress(Full):
                self._queue.put_nowait(None)
            worker.join(max(0.0, min(1.0, timeout)))
        in_flight = self._in_flight
        if worker is not None and worker.is_alive() and in_flight is not None:
            # still waiting for the webhook: the caller (a process about to exit) will not see the outcome
            self._log_undelivered(in_flight.summary, "client closed while the webhook had not answered yet", 0)
        if self._http is not None and (worker is None or not worker.is_alive()):
            self._http.close()

    def __enter__(self) -> FeishuClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------------

    def _job(
        self,
        title: str,
        content: str | Sequence[str],
        severity: Severity,
        fields: Mapping[str, Any] | None,
        queue: str | None,
    ) -> _Job:
        text = _content_text(content)
        body, truncated = fit_card(title, text, severity, fields=fields, host=self.host, queue=queue)
        summary: dict[str, Any] = {"title": title, "severity": severity, "content": _short(text, MAX_LOGGED_CONTENT)}
        if queue:
            summary["queue"] = queue
        if fields:
            summary["fields"] = {str(k): _short(v, 200) for k, v in list(fields.items())[:MAX_FIELDS]}
        if truncated:
            log.warning("feishu message truncated to fit the body limit", title=title, content_chars=len(text))
        return _Job(body, summary, truncated)

    def _ensure_worker(self) -> None:
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run_worker, name="feishu-sender", daemon=True)
                self._worker.start()

    def _run_worker(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._in_flight = job
                try:
                    self._deliver(job)
                except Exception as exc:  # the worker must survive anything
                    self._log_undelivered(job.summary, redact(f"{type(exc).__name__}: {exc}"), 0)
            finally:
                self._in_flight = None
                self._queue.task_done()

    def _log_skipped(self, job: _Job) -> None:
        log.info("feishu webhook not configured; message logged only", **job.summary)

    def _log_undelivered(self, summary: Mapping[str, Any], error: str | None, attempts: int, **extra: Any) -> None:
        log.error("feishu message not delivered", error=error, attempts=attempts, **extra, **summary)

    def _deliver(self, job: _Job) -> SendResult:
        result, rate_limited = self._deliver_once(job)
        if self.on_result is not None and not result.skipped:
            try:
                self.on_result("sent" if result.delivered else "rate_limited" if rate_limited else "failed")
            except Exception:  # a broken hook must not make a delivered card look undelivered
                log.exception("the on_result hook failed")
        return result

    def _deliver_once(self, job: _Job) -> tuple[SendResult, bool]:
        """The message's result, and whether it was the rate limit that stopped it."""
        if self.webhook_url is None or self._http is None:
            self._log_skipped(job)
            return SendResult(False, 0, "no webhook configured", truncated=job.truncated, skipped=True), False
        end = self.clock() + self.deadline
        attempts = 0
        last = _Outcome(ok=False, error="deadline exceeded before the first attempt")
        while attempts < self.max_attempts:
            remaining = end - self.clock()
            if remaining <= 0:
                break
            if not self.limiter.acquire(self.webhook_url, remaining):
                error = "no rate-limit slot free before the deadline"
                last = _Outcome(
                    ok=False,
                    error=error + (f" (last: {last.error})" if attempts else ""),
                    code=last.code,
                    rate_limited=True,
                )
                break
            remaining = end - self.clock()
            if remaining <= 0.01:
                break
            attempts += 1
            last = self._attempt(job.body, min(self.timeout, remaining))
            if last.ok:
                log.info("feishu message delivered", title=job.summary["title"], attempts=attempts)
                return SendResult(True, attempts, None, code=0, truncated=job.truncated), False
            if last.config_error:
                log.error(
                    "feishu configuration error",
                    code=last.code,
                    error=last.error,
                    hint=CONFIG_ERROR_CODES.get(last.code or 0),
                    title=job.summary["title"],
                )
                break
            if not last.retryable or attempts >= self.max_attempts:
                break
            delay = last.retry_after
            if delay is None:
                delay = backoff_delay(attempts - 1, base=self.backoff, cap=self.max_backoff, jitter=SPREAD)
            if self.clock() + delay >= end:
                break
            log.warning("feishu send failed, will retry", error=last.error, attempt=attempts, retry_in=round(delay, 3))
            self.sleep(delay)
        self._log_undelivered(job.summary, last.error, attempts, code=last.code, config_error=last.config_error)
        result = SendResult(False, attempts, last.error, last.code, last.config_error, job.truncated)
        return result, last.rate_limited

    def _attempt(self, body: Mapping[str, Any], timeout: float) -> _Outcome:
        assert self._http is not None and self.webhook_url is not None
        payload = dict(body)
        if self.secret:
            timestamp = int(self.wall_clock())
            payload["timestamp"] = str(timestamp)
            payload["sign"] = sign(timestamp, self.secret)
        try:
            response = self._http.post(
                self.webhook_url,
                content=encode_body(payload),
                headers={"Content-Type": "application/json; charset=utf-8"},
                timeout=httpx.Timeout(timeout),
            )
        except httpx.TimeoutException as exc:
            # A post that may have arrived is not sent again: Feishu would show the card twice.
            error = f"timeout after {timeout:.1f}s ({type(exc).__name__})"
            return _Outcome(ok=False, retryable=not maybe_delivered(exc), error=error)
        except httpx.HTTPError as exc:
            error = redact(f"{type(exc).__name__}: {exc}")[:300]
            delivered = isinstance(exc, httpx.TransportError) and maybe_delivered(exc)
            return _Outcome(ok=False, retryable=not delivered, error=error)
        except httpx.InvalidURL:  # not an HTTPError; the URL itself is never echoed, and retrying cannot help
            return _Outcome(ok=False, error="the webhook URL is not a valid URL")
        status = response.status_code
        code: int | None = None
        msg = ""
        try:
            data = response.json()
        except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
            data = None
        if isinstance(data, dict):
            raw = data.get("code", data.get("StatusCode"))
            with contextlib.suppress(TypeError, ValueError):
                code = int(raw) if raw is not None else None
            msg = redact(str(data.get("msg", data.get("StatusMessage", ""))))[:200]
        error = f"HTTP {status}" + (f", code {code}" if code is not None else "") + (f": {msg}" if msg else "")
        if code in CONFIG_ERROR_CODES:
            return _Outcome(ok=False, error=error, code=code, config_error=True)
        if status == 429 or code in RATE_LIMIT_CODES:
            return _Outcome(
                ok=False, retryable=True, error=error, code=code, retry_after=_retry_after(response), rate_limited=True
            )
        if status >= 500:
            return _Outcome(ok=False, retryable=True, error=error, code=code)
        if 200 <= status < 300 and code == 0:
            return _Outcome(ok=True, code=0)
        if 200 <= status < 300 and code is None:
            error = f"HTTP {status}: response without a Feishu code"
        return _Outcome(ok=False, error=error, code=code)


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from Retry-After, else x-ogw-ratelimit-reset, capped at MAX_RETRY_AFTER."""
    for name in ("retry-after", "x-ogw-ratelimit-reset"):
        seconds = parse_retry_after(response.headers.get(name))
        if seconds is not None:
            return min(MAX_RETRY_AFTER, seconds)
    return None
