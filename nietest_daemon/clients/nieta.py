"""Client of the Nieta image API: create an image job, poll it.

One pooled `httpx.Client` per `NietaClient`; the pipeline builds one per process (pipeline/context.py).
Transient failures (connect errors, timeouts, dropped connections, 5xx, 429) are retried inside
the client with capped, jittered exponential backoff; what is left over surfaces as a
`NietaError` whose `retryable` flag tells the caller whether trying again later can help. A create
is retried only when its request cannot have reached the API (a failure to connect) or the API
answered: the API has no idempotency key, so a create whose answer was lost (read timeout, dropped
connection, 504) ends at once as `in_doubt` rather than paying for a second image.
Nothing in this module raises anything but `NietaError` for a bad answer of the API, and the
token never appears in an exception message or a log line.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from nietest_daemon.clients.tls import shared_ssl_context
from nietest_daemon.clients.transport import maybe_delivered
from nietest_daemon.core.backoff import EQUAL, backoff, parse_retry_after
from nietest_daemon.core.logs import get_logger
from nietest_daemon.core.loopback import is_loopback
from nietest_daemon.core.redaction import add_secrets, redact
from nietest_daemon.domain.images import SeedError, choose_seed, ratio_to_size

log = get_logger(__name__)

#: The element every Lumina job gets appended to its prompts.
LUMINA_ELEMENT_UUID = "b5edccfe-46a2-4a14-a8ff-f4d430343805"
LUMINA_ELEMENT_NAME = "lumina1"
LUMINA_ELEMENT_IMG_URL = "https://oss.talesofai.cn/picture_s/1y7f53e6itfn_0.jpeg"
ENTITY_PROMPT_TYPES = ("oc_vtoken_adaptor", "elementum")

#: Answers larger than this are not read further (a proxy's error page, a runaway body).
MAX_BODY_BYTES = 1024 * 1024
#: API text kept in an error message at most.
MAX_MESSAGE_CHARS = 500
#: API error text kept in a JobStatus at most (verbatim below that).
MAX_JOB_ERROR_CHARS = 2000

_UUID_KEYS = ("uuid", "task_uuid", "id", "task_id")
_BARE_UUID = re.compile(r"[0-9a-fA-F]{8}(-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}")
_TOKEN_OK = re.compile(r"[!-~]+")  # printable ASCII, no whitespace: anything else cannot be a header value
_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.IGNORECASE | re.DOTALL)
_SPACE = re.compile(r"\s+")
#: A JSON answer may hold "\\ud800" escapes: lone surrogates, which no store or log can encode.
_SURROGATE = re.compile("[\ud800-\udfff]")


class NietaError(Exception):
    """The API refused or could not be reached.

    `retryable`: trying again later may succeed (transient errors after the client's own retries).
    `in_doubt`: a create whose request may have reached the API with its answer lost (a read
    timeout, a dropped connection, a gateway timeout): a job may exist, and sending the create again
    could pay for a second one; never `retryable`. `status_code`: the HTTP status when there was an
    answer. `retry_after`: seconds the API asked us to wait (429/503), when it said so.
    `api_message`: the API's own text, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        in_doubt: bool = False,
        status_code: int | None = None,
        retry_after: float | None = None,
        api_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable and not in_doubt
        self.in_doubt = in_doubt
        self.status_code = status_code
        self.retry_after = retry_after
        self.api_message = api_message

    def __str__(self) -> str:
        return self.message


class JobState(StrEnum):
    """Where an image job stands, as one poll reads the API's `task_status` (`STATE_OF_TASK_STATUS`)."""

    PENDING = "pending"  # not done: poll again
    SUCCESS = "success"  # done: the image is the first artifact with a url
    FAILURE = "failure"  # failed; also any task_status this client does not know
    MODERATED = "moderated"  # ILLEGAL_IMAGE: refused by moderation, final
    TIMEOUT = "timeout"  # the API gave up on the job: a new one may be created


#: The API's `task_status` values (any case) and the state each one means; any other one is a
#: failure that keeps the raw status in its error.
STATE_OF_TASK_STATUS: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "RUNNING": JobState.PENDING,
    "QUEUING": JobState.PENDING,
    "SUCCESS": JobState.SUCCESS,
    "FAILURE": JobState.FAILURE,
    "FAILED": JobState.FAILURE,
    "ERROR": JobState.FAILURE,
    "ILLEGAL_IMAGE": JobState.MODERATED,
    "TIMEOUT": JobState.TIMEOUT,
}


@dataclass(frozen=True)
class JobStatus:
    """One poll's view of an image job.

    `state`: see JobState. `url`: the image (success only; None on a success without any artifact
    url). `error`: the API's text. `raw_status`: `task_status`.
    """

    state: JobState
    url: str | None = None
    error: str | None = None
    raw_status: str | None = None

    @property
    def done(self) -> bool:
        """The job will not change any more (anything but pending)."""
        return self.state != JobState.PENDING


# --- request bodies ------------------------------------------------------------------------------


def _entity_prompt(ptype: str, uuid: Any, weight: Any, name: Any, img_url: Any) -> dict[str, Any]:
    return {
        "type": ptype,
        "value": uuid,
        "uuid": uuid,
        "weight": weight,
        "name": name if name is not None else "",
        "img_url": img_url if img_url is not None else "",
        "domain": "",
        "parent": "",
        "label": None,
        "sort_index": 0,
        "status": "IN_USE",
        "polymorphi_values": {},
        "sub_type": None,
    }


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def build_raw_prompt(prompts: Any, is_lumina: bool) -> list[dict[str, Any]]:
    """The `rawPrompt` list: freetext / character / element objects, empty values dropped."""
    if prompts is None:
        prompts = []
    if not isinstance(prompts, list | tuple):
        raise NietaError(f"prompts must be a list, got {type(prompts).__name__}", retryable=False)
    raw: list[dict[str, Any]] = []
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, Mapping):
            raise NietaError(f"prompts[{index}] must be an object, got {type(prompt).__name__}", retryable=False)
        ptype = prompt.get("type")
        weight = prompt.get("weight", 1.0)
        if weight is None:
            weight = 1.0
        if ptype == "freetext":
            value = prompt.get("value")
            if _is_empty(value):
                continue
            raw.append({"type": "freetext", "value": value, "weight": weight})
        elif ptype in ENTITY_PROMPT_TYPES:
            uuid = prompt.get("value")
            if _is_empty(uuid):
                uuid = prompt.get("uuid")
            if _is_empty(uuid):
                continue
            raw.append(_entity_prompt(ptype, uuid, weight, prompt.get("name"), prompt.get("img_url")))
        else:
            raise NietaError(f"prompts[{index}].type {_excerpt(repr(ptype), 60)} is not supported", retryable=False)
    if is_lumina:
        raw.append(_entity_prompt("elementum", LUMINA_ELEMENT_UUID, 1.0, LUMINA_ELEMENT_NAME, LUMINA_ELEMENT_IMG_URL))
    return raw


def build_make_image_body(subtask: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body of `POST /v3/make_image` for one subtask.

    The caller should resolve the seed with `choose_seed()` and store it before calling this;
    a subtask still without a seed (None or 0) gets a random one here. A seed that is not an
    integer is a final NietaError.
    """
    is_lumina = bool(subtask.get("is_lumina"))
    width, height = subtask.get("width"), subtask.get("height")
    if width is None or height is None:
        width, height = ratio_to_size(subtask.get("ratio"))
    try:
        seed = choose_seed(subtask.get("seed"))
    except SeedError as exc:
        raise NietaError(_excerpt(str(exc)), retryable=False) from None
    body: dict[str, Any] = {
        "storyId": "",
        "jobType": "universal",
        "width": int(width),
        "height": int(height),
        "rawPrompt": build_raw_prompt(subtask.get("prompts"), is_lumina),
        "seed": seed,
        "meta": {"entrance": "PICTURE,PURE"},
        "context_model_series": None,
        "negative_freetext": "",
        "advanced_translator": bool(subtask.get("use_polish")),
    }
    if is_lumina:
        client_args = {
            key: subtask.get(field)
            for key, field in (("ckpt_name", "lumina_model_name"), ("cfg", "lumina_cfg"), ("steps", "lumina_step"))
            if subtask.get(field) is not None
        }
        if client_args:
            body["client_args"] = client_args
    return body


# --- response parsing ------------------------------------------------------------------------------


def _valid_text(text: str) -> str:
    """The text with any lone surrogate replaced by U+FFFD: API text must stay storable (UTF-8)."""
    return _SURROGATE.sub("\ufffd", text)


def _excerpt(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    text = _SPACE.sub(" ", _valid_text(text)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _decode(content: bytes) -> str:
    return content.decode("utf-8", errors="replace")


def _json_or_none(content: bytes) -> Any:
    """The parsed JSON body, or None when it is not JSON (a JSON null is None too)."""
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return None


def _api_text(content: bytes, content_type: str) -> str:
    """The API's message in an error answer: a JSON message field, else the body's text (HTML stripped)."""
    data = _json_or_none(content)
    if isinstance(data, Mapping):
        for key in ("message", "msg", "error", "err_msg", "detail", "error_message", "errMsg"):
            value = data.get(key)
            if isinstance(value, str) and value.strip():
                return _excerpt(value)
            if isinstance(value, Mapping | list) and value:
                return _excerpt(json.dumps(value, ensure_ascii=False))
    elif isinstance(data, str) and data.strip():
        return _excerpt(data)
    text = _decode(content[: MAX_MESSAGE_CHARS * 8])
    if "html" in content_type.lower() or text.lstrip().startswith("<"):
        text = _TAG.sub(" ", text)
    return _excerpt(text)


def _id_value(value: Any) -> str | None:
    if isinstance(value, str):
        value = value.strip()
        # printable ASCII: a job id goes into a URL path and the store (no surrogates, no controls)
        return value if len(value) <= 128 and _TOKEN_OK.fullmatch(value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def parse_job_uuid(content: bytes) -> str | None:
    """The job uuid in a make_image answer: a JSON string, or uuid/task_uuid/id/task_id at top level or under data."""
    data = _json_or_none(content)
    if data is None:
        bare = _decode(content[:300]).strip()
        return bare if _BARE_UUID.fullmatch(bare) else None
    if isinstance(data, str):
        return _id_value(data)
    if isinstance(data, Mapping):
        for scope in (data, data.get("data")):
            if isinstance(scope, str):
                return _id_value(scope)
            if isinstance(scope, Mapping):
                for key in _UUID_KEYS:
                    found = _id_value(scope.get(key))
                    if found:
                        return found
    return None


def _text_of(value: Any) -> str | None:
    if value is None or value == "" or value == [] or value == {}:
        return None
    if isinstance(value, str):
        return _valid_text(value) if value.strip() else None
    try:
        return _valid_text(json.dumps(value, ensure_ascii=False))
    except (TypeError, ValueError):
        return repr(value)


def _job_error(data: Mapping[str, Any]) -> str | None:
    """The API's own error text: `error`, `err_msg`, then the artifacts' error fields, verbatim."""
    parts: list[str] = []
    for key in ("error", "err_msg"):
        text = _text_of(data.get(key))
        if text and text not in parts:
            parts.append(text)
    artifacts = data.get("artifacts")
    if isinstance(artifacts, list):
        for artifact in artifacts:
            if not isinstance(artifact, Mapping):
                continue
            for key in ("error", "err_msg", "message", "detail"):
                text = _text_of(artifact.get(key))
                if text and text not in parts:
                    parts.append(text)
    if not parts:
        return None
    joined = "; ".join(parts)
    return joined if len(joined) <= MAX_JOB_ERROR_CHARS else joined[: MAX_JOB_ERROR_CHARS - 1] + "…"


def _first_url(data: Mapping[str, Any]) -> str | None:
    artifacts = data.get("artifacts")
    if not isinstance(artifacts, list):
        return None
    for artifact in artifacts:
        if isinstance(artifact, Mapping):
            url = artifact.get("url")
            if isinstance(url, str) and url.strip():
                return _valid_text(url.strip())
    return None


def parse_job_status(data: Mapping[str, Any]) -> JobStatus:
    """Map an artifact/task answer onto a JobStatus."""
    raw = data.get("task_status")
    raw_status = _valid_text(raw) if isinstance(raw, str) else (None if raw is None else _excerpt(str(raw), 100))
    state = STATE_OF_TASK_STATUS.get((raw_status or "").strip().upper())
    error = _job_error(data)
    if state is JobState.PENDING:
        return JobStatus(state, raw_status=raw_status)
    if state is JobState.SUCCESS:
        return JobStatus(state, url=_first_url(data), error=error, raw_status=raw_status)
    if state is JobState.FAILURE:
        return JobStatus(state, error=error or f"image job failed ({raw_status})", raw_status=raw_status)
    if state is JobState.MODERATED:
        return JobStatus(state, error=error or "image refused by moderation (ILLEGAL_IMAGE)", raw_status=raw_status)
    if state is JobState.TIMEOUT:
        return JobStatus(state, error=error or "the image API timed out the job (TIMEOUT)", raw_status=raw_status)
    unknown = f"unknown task_status {raw_status!r}" if raw_status is not None else "answer without task_status"
    if error:
        unknown = f"{unknown}: {error}"
    elif raw_status is None:
        unknown = f"{unknown}: {_excerpt(json.dumps(data, ensure_ascii=False, default=repr), 200)}"
    return JobStatus(JobState.FAILURE, error=unknown, raw_status=raw_status)


# --- the client --------------------------------------------------------------------------------------


@dataclass
class _Answer:
    status_code: int
    content: bytes
    content_type: str
    retry_after: str | None
    truncated: bool


class NietaClient:
    """Creates and polls image jobs on the standard and Lumina hosts. Thread-safe; one per process.

    `max_retries` extra attempts per call on transient failures, `backoff_base * 2**n` seconds apart
    (capped at `backoff_max`, jittered); a 429/503 `Retry-After` up to `max_retry_after` seconds
    is waited, a longer one ends the call with a retryable error carrying `retry_after`.
    `sleep` and `transport` (an `httpx.MockTransport`: no sockets) are injectable for tests.
    `observe(api, endpoint, status_code, seconds)` hears of every HTTP attempt (api: standard or
    lumina; endpoint: create or poll; status_code None when no answer came): the metrics hook.
    """

    def __init__(
        self,
        token: str,
        api_base_url: str,
        ops_api_base_url: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        max_retry_after: float = 10.0,
        max_connections: int = 256,
        sleep: Callable[[float], None] = time.sleep,
        trust_env: bool | None = None,
        transport: httpx.BaseTransport | None = None,
        observe: Callable[[str, str, int | None, float], None] | None = None,
    ) -> None:
        if not token or not isinstance(token, str):
            raise NietaError("NIETA_XTOKEN is not set", retryable=False)
        if not _TOKEN_OK.fullmatch(token):
            raise NietaError("NIETA_XTOKEN contains characters not allowed in an HTTP header", retryable=False)
        self._token = token
        add_secrets([token])  # masked in every error message and log line of this process from now on
        self.api_base_url = api_base_url.rstrip("/")
        self.ops_api_base_url = ops_api_base_url.rstrip("/")
        self.max_retries = max(0, int(max_retries))
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self._sleep = sleep
        self._observe = observe
        if trust_env is None:
            # Proxy variables must not divert traffic meant for a local (test) server.
            hosts = (urlsplit(url).hostname or "" for url in (self.api_base_url, self.ops_api_base_url))
            trust_env = not all(is_loopback(host) for host in hosts)
        self._http = httpx.Client(
            headers=self.headers,
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=read_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=False,
            trust_env=trust_env,
            verify=shared_ssl_context(trust_env),
            transport=transport,
        )

    @property
    def headers(self) -> dict[str, str]:
        """The headers of every request: the token, the platform, JSON."""
        return {"Content-Type": "application/json", "x-platform": "nieta-app/web", "X-Token": self._token}

    def __repr__(self) -> str:
        return f"NietaClient(api={self.api_base_url!r}, ops={self.ops_api_base_url!r})"

    def __enter__(self) -> NietaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def base_url(self, is_lumina: bool) -> str:
        return self.ops_api_base_url if is_lumina else self.api_base_url

    # --- the two calls -------------------------------------------------------------------------------

    def create_job(self, subtask: Mapping[str, Any]) -> str:
        """POST make_image for the subtask (Lumina host when `is_lumina`); return the job uuid."""
        body = build_make_image_body(subtask)
        try:
            content = json.dumps(body, ensure_ascii=False, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise NietaError(f"make_image body is not valid JSON: {exc}", retryable=False) from None
        is_lumina = bool(subtask.get("is_lumina"))
        url = f"{self.base_url(is_lumina)}/v3/make_image"
        answer = self._request(
            "POST", url, "make_image", content, api=_api(is_lumina), endpoint="create", resend_in_doubt=False
        )
        job_uuid = None if answer.truncated else parse_job_uuid(answer.content)
        if not job_uuid:
            raise NietaError(
                f"make_image answered HTTP {answer.status_code} without a job uuid: {self._body_excerpt(answer)}",
                retryable=False,
                status_code=answer.status_code,
            )
        return job_uuid

    def poll_job(self, job_uuid: str, is_lumina: bool) -> JobStatus:
        """GET the job's artifact/task state and map it (see JobStatus)."""
        if not isinstance(job_uuid, str) or _id_value(job_uuid) is None:  # quote() raises on a lone surrogate
            raise NietaError(f"invalid job uuid {_excerpt(repr(job_uuid), 80)}", retryable=False)
        url = f"{self.base_url(is_lumina)}/v1/artifact/task/{quote(job_uuid.strip(), safe='')}"
        answer = self._request("GET", url, "artifact/task", None, api=_api(is_lumina), endpoint="poll")
        data = None if answer.truncated else _json_or_none(answer.content)
        if not isinstance(data, Mapping):
            # Polling is idempotent and bounded by the caller's budget: a garbled answer may be retried.
            raise NietaError(
                f"artifact/task answered HTTP {answer.status_code} with an unusable body: {self._body_excerpt(answer)}",
                retryable=True,
                status_code=answer.status_code,
            )
        status = parse_job_status(data)
        if status.error:
            scrubbed = self._scrub(status.error)
            if scrubbed != status.error:
                status = JobStatus(status.state, status.url, scrubbed, status.raw_status)
        return status

    # --- transport -------------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """The shared redaction (core.redaction), which knows the token since __init__."""
        return redact(text)

    def _body_excerpt(self, answer: _Answer) -> str:
        if answer.truncated:
            return (
                f"(body larger than {MAX_BODY_BYTES} bytes) {self._scrub(_excerpt(_decode(answer.content[:200]), 200))}"
            )
        if not answer.content.strip():
            return "(empty body)"
        return self._scrub(_excerpt(_decode(answer.content[:1000]), 200))

    def _backoff(self, attempt: int) -> float:
        return backoff(attempt, base=self.backoff_base, cap=self.backoff_max, jitter=EQUAL)

    def _send(self, method: str, url: str, content: bytes | None) -> _Answer:
        with self._http.stream(method, url, content=content) as response:
            chunks: list[bytes] = []
            size = 0
            truncated = False
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    truncated = True
                    break
            return _Answer(
                status_code=response.status_code,
                content=b"".join(chunks),
                content_type=response.headers.get("content-type", ""),
                retry_after=response.headers.get("retry-after"),
                truncated=truncated,
            )

    def _timed_send(self, method: str, url: str, content: bytes | None, api: str, endpoint: str) -> _Answer:
        """`_send`, told to the `observe` hook."""
        if self._observe is None:
            return self._send(method, url, content)
        started = time.monotonic()
        status_code = None
        try:
            answer = self._send(method, url, content)
            status_code = answer.status_code
            return answer
        finally:
            try:
                self._observe(api, endpoint, status_code, time.monotonic() - started)
            except Exception:  # a broken hook must not turn a paid-for answer into an error
                log.exception("the observe hook failed")

    def _request(
        self,
        method: str,
        url: str,
        what: str,
        content: bytes | None,
        *,
        api: str,
        endpoint: str,
        resend_in_doubt: bool = True,
    ) -> _Answer:
        """One call with the retry budget; returns a 2xx answer or raises NietaError.
        `resend_in_doubt=False` (a create): a failure after the request may have reached the API
        (`maybe_delivered`) ends the call at once with an `in_doubt` error instead of a retry."""
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                answer = self._timed_send(method, url, content, api, endpoint)
            except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
                raise NietaError(f"{what}: cannot send request ({type(exc).__name__})", retryable=False) from None
            except httpx.TimeoutException as exc:
                error = NietaError(f"{what}: {_timeout_text(exc)}", retryable=True)
                if not resend_in_doubt and maybe_delivered(exc):
                    raise _in_doubt(error) from None
            except httpx.TransportError as exc:
                detail = self._scrub(_excerpt(str(exc), 200)) or type(exc).__name__
                error = NietaError(f"{what}: {_transport_text(exc)} ({detail})", retryable=True)
                if not resend_in_doubt and maybe_delivered(exc):
                    raise _in_doubt(error) from None
            except httpx.HTTPError as exc:  # decoding errors and the like: a garbled answer
                detail = self._scrub(_excerpt(str(exc), 200)) or type(exc).__name__
                error = NietaError(f"{what}: unreadable answer ({detail})", retryable=True)
            except Exception as exc:  # the contract: nothing but NietaError leaves this client
                raise NietaError(f"{what}: request failed ({type(exc).__name__})", retryable=False) from None
            else:
                code = answer.status_code
                if 200 <= code < 300:
                    return answer
                text = self._scrub(_api_text(answer.content, answer.content_type)) or "(empty body)"
                retryable = code in (408, 429) or code >= 500
                if code in (429, 503):
                    retry_after = parse_retry_after(answer.retry_after)
                error = NietaError(
                    f"{what}: HTTP {code}: {text}",
                    retryable=retryable,
                    status_code=code,
                    retry_after=retry_after,
                    api_message=text,
                )
                if not retryable:
                    raise error
                if not resend_in_doubt and code == 504:  # a gateway gave up waiting: the API may have it
                    raise _in_doubt(error)
            too_long = retry_after is not None and retry_after > self.max_retry_after
            if attempt >= self.max_retries or too_long:
                notes = [f"gave up after {attempt + 1} attempts"] if attempt else []
                if too_long:
                    notes.append(f"the API asks to retry after {retry_after:.0f}s")
                if notes:
                    error.message = f"{error.message} ({'; '.join(notes)})"
                    error.args = (error.message,)
                log.warning("nieta request gave up", call=what, attempts=attempt + 1, error=str(error))
                raise error
            delay = self._backoff(attempt)
            if retry_after is not None:
                delay = max(delay, retry_after)
            log.info(
                "nieta request failed, retrying",
                call=what,
                attempt=attempt + 1,
                delay_s=round(delay, 3),
                error=str(error),
            )
            self._sleep(delay)
            attempt += 1


def _api(is_lumina: bool) -> str:
    """The metrics' `api` label of a host."""
    return "lumina" if is_lumina else "standard"


def _in_doubt(error: NietaError) -> NietaError:
    """`error`, marked as a create whose outcome nobody knows (never retried)."""
    message = f"{error.message} (the request may have reached the API: not sent again)"
    return NietaError(message, retryable=False, in_doubt=True, status_code=error.status_code)


def _timeout_text(exc: httpx.TimeoutException) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect timeout"
    if isinstance(exc, httpx.PoolTimeout):
        return "timed out waiting for a free connection"
    if isinstance(exc, httpx.WriteTimeout):
        return "write timeout"
    return "read timeout"


def _transport_text(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "connect error"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "connection dropped"
    return "network error"
