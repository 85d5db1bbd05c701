"""A fake Feishu custom-bot webhook: a real HTTP server in a background thread, on 127.0.0.1 (or, with
`host=`, on an address of the multi-host test rig, started inside its services namespace).

    with FakeFeishu(secret="s3cret") as hook:
        hook.script(9499, 0)               # answer code 9499, then code 0 (then 0 by default)
        hook.script(Reply(status=500))     # an HTTP status
        hook.script(Hang(5))               # accept the request, answer nothing for 5 s, then drop it
        client = FeishuClient(hook.url, "s3cret")
        ...
        hook.received                      # every request: JSON body, arrival time, answer

With a secret, every request's `timestamp` / `sign` is checked first (HMAC-SHA256 keyed with
"{timestamp}\\n{secret}" over an empty message, base64; timestamp within an hour): a bad one is
answered with code 19021 and does not consume the script.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY_BYTES = 20 * 1024
RIG_NETWORK = ipaddress.ip_network("10.231.0.0/16")
"""Besides loopback, the fake listens only on an address of the multi-host test rig's namespaces
(testing/multihost.py's NETWORK): traffic never leaves the machine."""
MESSAGES = {
    0: "success",
    9499: "too many request",
    11232: "frequency limited",
    19001: "param invalid",
    19021: "sign match fail or timestamp is not within one hour from current time",
    19022: "Ip Not Allowed",
    19024: "Key Words Not Found",
}


@dataclass(frozen=True)
class Reply:
    """One scripted answer: an HTTP status and a body `code`, or a hang (no answer for `hang` s)."""

    code: int = 0
    status: int = 200
    msg: str | None = None
    hang: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def Hang(seconds: float) -> Reply:  # noqa: N802 - reads like a type in scripts
    """Accept the request, answer nothing for `seconds`, then close the connection."""
    return Reply(hang=seconds)


@dataclass(frozen=True)
class Received:
    """One request the fake received."""

    time: float  # time.monotonic() at arrival
    wall: float  # time.time() at arrival
    path: str
    raw: bytes
    body: Any  # the parsed JSON, or None
    sign_ok: bool | None  # None when the fake has no secret
    reply: Reply


def expected_sign(timestamp: str, secret: str) -> str:
    key = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


class FakeFeishu:
    """The webhook; `url` is `http://<host>:<port>/open-apis/bot/v2/hook/<token>` (host 127.0.0.1)."""

    def __init__(
        self,
        secret: str | None = None,
        *,
        token: str | None = None,
        max_body: int = MAX_BODY_BYTES,
        host: str = "127.0.0.1",
    ) -> None:
        address = ipaddress.ip_address(host)
        if not (address.is_loopback or address in RIG_NETWORK):
            raise ValueError(
                f"the fake Feishu webhook listens on loopback or the test rig's {RIG_NETWORK} only: {host}"
            )
        self.host = host
        self.secret = secret
        self.token = token or str(uuid.uuid4())
        self.path = f"/open-apis/bot/v2/hook/{self.token}"
        self.max_body = max_body
        self._script: deque[Reply] = deque()
        self._hang_until = 0.0
        self._received: list[Received] = []
        self._lock = threading.Condition()
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- control ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://{self.host}:{self._server.server_address[1]}{self.path}"

    def script(self, *replies: int | Reply) -> FakeFeishu:
        """Queue answers for the next validly signed requests (an int is a body code on HTTP 200)."""
        with self._lock:
            self._script.extend(Reply(code=r) if isinstance(r, int) else r for r in replies)
        return self

    def hang_for(self, seconds: float) -> FakeFeishu:
        """From now on, for `seconds`: accept every request, answer nothing, drop it when the time is up."""
        with self._lock:
            self._hang_until = time.monotonic() + seconds
        return self

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    @property
    def messages(self) -> list[Any]:
        """The JSON bodies of every request."""
        return [r.body for r in self.received]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least `count` requests arrived; fail at the deadline."""
        end = time.monotonic() + timeout
        with self._lock:
            while len(self._received) < count:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"fake feishu: {len(self._received)} requests after {timeout}s, not {count}")
                self._lock.wait(remaining)
            return list(self._received)

    def start(self) -> FakeFeishu:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as in fake_nieta: no delayed-ACK wait between headers and body

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the request line holds the token
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                fake._handle(self)

        server = ThreadingHTTPServer((self.host, 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False  # hanging handlers must not hold up stop()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.01,), name="fake-feishu", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeFeishu:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- serving ---------------------------------------------------------------------------------

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        arrived, wall = time.monotonic(), time.time()
        length = int(request.headers.get("Content-Length") or 0)
        raw = request.rfile.read(length) if length else b""
        try:
            body = json.loads(raw)
        except ValueError:
            body = None

        sign_ok: bool | None = None
        if request.path != self.path:
            reply = Reply(code=19001, status=404, msg="param invalid: incoming webhook access token invalid")
        elif len(raw) > self.max_body:
            reply = Reply(code=19001, status=400, msg="param invalid: request body too large")
        elif not isinstance(body, dict):
            reply = Reply(code=19001, status=400, msg="param invalid: body is not a JSON object")
        else:
            if self.secret is not None:
                sign_ok = self._sign_ok(body)
            if sign_ok is False:
                reply = Reply(code=19021)
            elif arrived < self._hang_until:
                reply = Hang(self._hang_until - arrived)
            else:
                with self._lock:
                    reply = self._script.popleft() if self._script else Reply()

        with self._lock:
            self._received.append(Received(arrived, wall, request.path, raw, body, sign_ok, reply))
            self._lock.notify_all()

        if reply.hang:
            self._closing.wait(reply.hang)
            request.close_connection = True
            return
        payload = json.dumps(
            {"code": reply.code, "msg": reply.msg or MESSAGES.get(reply.code, "error"), "data": {}}
        ).encode()
        request.send_response(reply.status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(payload)))
        for name, value in reply.headers.items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(payload)

    def _sign_ok(self, body: dict[str, Any]) -> bool:
        assert self.secret is not None
        timestamp, signature = body.get("timestamp"), body.get("sign")
        if not isinstance(timestamp, str | int) or not isinstance(signature, str):
            return False
        try:
            if abs(time.time() - int(timestamp)) > 3600:
                return False
        except ValueError:
            return False
        return hmac.compare_digest(signature, expected_sign(str(timestamp), self.secret))
