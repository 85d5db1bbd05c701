"""Every setting of nietest, read from the environment and validated in one place.

The variable names are a contract with operators (README.md, "Configuration"). `load()` either returns a complete,
validated `Settings` or raises `SettingsError` naming the first bad variable, so that the
daemon refuses to start before anything is spawned.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nietest_daemon.core.broker_urls import SentinelTarget, is_sentinel_url, parse_sentinel_url
from nietest_daemon.core.redaction import MIN_SECRET_CHARS, redact, redact_url
from nietest_daemon.core.store_urls import ESCAPE_HINT as _ESCAPE_HINT
from nietest_daemon.core.store_urls import (
    SQLITE_FILENAME,
    STORE_SCHEMES,
    STORE_URL_FORMS,
    check_sqlite_file,
    masked_url,
    postgres_url,
    shown_url,
    sqlite_path_of,
    url_passwords,
)
from nietest_daemon.core.store_urls import StoreKind as StoreKind  # settings.StoreKind: part of the settings' API

#: The four queues: command-line key -> (variable holding the queue name, its default).
QUEUE_NAME_VARS: dict[str, tuple[str, str]] = {
    "master": ("STANDARD_QUEUE", "nietest_master"),
    "master_ops": ("LUMINA_QUEUE", "nietest_master_ops"),
    "subtask": ("SUBTASK_QUEUE", "nietest_subtask"),
    "subtask_ops": ("SUBTASK_OPS_QUEUE", "nietest_subtask_ops"),
}
QUEUE_KEYS = tuple(QUEUE_NAME_VARS)
DEFAULT_PROCESSES = {"master": 2, "master_ops": 0, "subtask": 2, "subtask_ops": 2}
DEFAULT_THREADS = 5
#: A worker recycles past this resident memory: about 10x what one uses at its busiest (bench/pipeline.py:
#: 51 MiB with 500 jobs in flight), so only a leak reaches it, and long before the kernel's OOM killer
#: would pick a victim (perhaps the broker) on a small host. No message-count limit by default: the
#: actors keep nothing between messages, so recycling by count would only cost restarts.
DEFAULT_MAX_MEMORY = 512 * 1024**2
#: The exit status of a worker that recycled itself (EX_TEMPFAIL). Listeners tell a recycle from a crash
#: by the worker's recycle mark in the broker (coordination/counters.py), not by this status.
RECYCLED_EXIT = 75
MAX_PROCESSES = 64
MAX_THREADS = 256


class FairShare(StrEnum):
    """What the job slots of a lane are shared between first (coordination/scheduler.py)."""

    OWNER = "owner"  # between owners (weighted), then between each owner's tasks by priority
    TASK = "task"  # between tasks by priority, whoever submitted them


#: Bounds of an owner's weight: a ratio of a million between the extremes, and a pass step (1 / weight)
#: that stays far above the rounding of a double however long a lane runs.
MIN_OWNER_WEIGHT = 0.001
MAX_OWNER_WEIGHT = 1000.0
MAX_OWNER_NAME_CHARS = 128


class SettingsError(ValueError):
    """A variable has a value nietest cannot use; str() is the one-line operator message."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(redact(f"{variable}: {problem}"))  # a URL password or hook token pasted in the wrong variable
        self.variable = variable


# --- value parsers: each takes the raw string and returns the value or raises ValueError ----------


def _int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"must be an integer, got {raw!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise ValueError(f"must be {bound}, got {value}")
        return value

    return parse


def _float(lo: float, hi: float | None = None) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"must be a number, got {raw!r}") from None
        if not (value >= lo and (hi is None or value <= hi)):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise ValueError(f"must be {bound}, got {raw.strip()}")
        return value

    return parse


_SIZE = re.compile(r"^\s*(\d+)\s*(|B|KB|K|MB|M|GB|G)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}


def _size(raw: str) -> int:
    match = _SIZE.match(raw)
    if not match:
        raise ValueError(f"must be a size like 52428800, 512KB or 50MB, got {raw!r}")
    value = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if value < 1024:
        raise ValueError(f"must be at least 1KB, got {raw!r}")
    return value


def _memory_limit(raw: str) -> int:
    """A resident-memory limit like 512MB, or 0 for none."""
    if raw.strip() == "0":
        return 0
    value = _size(raw)
    if value < 64 * 1024**2:
        raise ValueError(f"must be 0 (no limit) or at least 64MB (a worker starts at about 45MB), got {raw!r}")
    return value


def _url(*schemes: str, secret: bool = False) -> Callable[[str], str]:
    """A URL with one of `schemes`. A `secret` URL (a Feishu webhook: whoever has it can post) is
    never echoed beyond its scheme and host; any other one only with its password redacted."""

    def parse(raw: str) -> str:
        value = raw.strip()
        # With user info, a password holding "/", "#" or "?" is split at the wrong place and would
        # leak through the parser's message or a redaction: show no more than scheme and host.
        hidden = secret or "@" in value
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            detail = _ESCAPE_HINT if "@" in value else "" if secret else str(exc)
            raise ValueError("is not a valid URL" + (f" ({detail})" if detail else "")) from None
        shown = f"{parts.scheme}://{parts.hostname or ''}/..." if hidden else redact_url(value)
        if parts.scheme not in schemes:
            raise ValueError(f"must be a URL with scheme {' or '.join(schemes)}, got {shown!r}")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError(f"has no host: {shown!r}")
        if parts.scheme == "unix" and not parts.path:
            raise ValueError(f"has no socket path: {shown!r}")
        if "@" in f"{parts.path}?{parts.query}#{parts.fragment}":
            raise ValueError(f"has an '@' after its host ({shown!r}): {_ESCAPE_HINT}")
        return value

    return parse


def _broker_url(raw: str) -> str:
    """BROKER_REDIS_URL: one server (redis, rediss, unix) or its Sentinels (redis+sentinel, rediss+sentinel)."""
    if is_sentinel_url(raw.strip()):
        parse_sentinel_url(raw)  # ValueError: what is wrong, without the password
        return raw.strip()
    return _url("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")(raw)


def _store_url(raw: str) -> str:
    """NIETEST_STORE_URL: a PostgreSQL, MongoDB or SQLite store, by its scheme."""
    value = raw.strip()
    scheme = value.partition(":")[0].lower()
    kind = STORE_SCHEMES.get(scheme)
    if kind is None or (kind is not StoreKind.SQLITE and not value[len(scheme) :].startswith("://")):
        raise ValueError(f"must be a URL like {STORE_URL_FORMS}, got {shown_url(value)!r}")
    value = scheme + value[len(scheme) :]  # the scheme in lower case, as every reader compares it
    if kind is StoreKind.MONGODB:
        return _url("mongodb", "mongodb+srv")(value)
    if kind is StoreKind.SQLITE:
        check_sqlite_file(sqlite_path_of(value))
        return value
    return postgres_url(value)


def _fair_share(raw: str) -> FairShare:
    value = raw.strip().lower()
    try:
        return FairShare(value)
    except ValueError:
        raise ValueError(f"must be owner or task, got {raw.strip()!r}") from None


def _owner_weights(raw: str) -> dict[str, float]:
    """`name=weight` entries separated by commas, e.g. `alice=2,ci=0.5`; an owner not named weighs 1."""
    weights: dict[str, float] = {}
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        name, equals, number = (part.strip() for part in entry.partition("="))
        if not equals or not name:
            raise ValueError(f"entry {entry!r} must be name=weight (e.g. alice=2,ci=0.5)")
        if len(name) > MAX_OWNER_NAME_CHARS or not name.isprintable():
            raise ValueError(f"entry {entry!r}: an owner name is 1 to {MAX_OWNER_NAME_CHARS} printable characters")
        if name in weights:
            raise ValueError(f"entry {entry!r}: owner {name!r} is given twice")
        try:
            weight = float(number)
        except ValueError:
            raise ValueError(f"entry {entry!r}: the weight must be a number") from None
        if not (math.isfinite(weight) and MIN_OWNER_WEIGHT <= weight <= MAX_OWNER_WEIGHT):
            raise ValueError(f"entry {entry!r}: the weight must be between {MIN_OWNER_WEIGHT} and {MAX_OWNER_WEIGHT:g}")
        weights[name] = weight
    return weights


def _text(raw: str) -> str:
    return raw.strip()


def _token(raw: str) -> str:
    """NIETA_XTOKEN goes into the X-Token header: printable ASCII without spaces. Never echoed."""
    value = raw.strip()
    if not re.fullmatch(r"[!-~]+", value):
        raise ValueError("contains spaces, control or non-ASCII characters, which an HTTP header cannot carry")
    return value


def _listen_addr(raw: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port` for IPv6) to listen on; port 0: any free one."""
    value = raw.strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:/@\[\]]+):(\d{1,5})", value)
    if not match:
        raise ValueError(f"must be host:port (e.g. 127.0.0.1:9464, [::1]:9464), or empty to turn it off; got {raw!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 (any free port) and 65535, got {port}")
    return host, port


def _bearer_token(raw: str) -> str:
    """A bearer token: at least 16 visible ASCII characters (it guards the metrics endpoints)."""
    value = _token(raw)
    if len(value) < 16:
        raise ValueError(f"must be at least 16 characters, got {len(value)}")
    return value


def _host(raw: str) -> str:
    value = raw.strip()
    if not value or re.search(r"[\s/@]", value):
        shown = value.rsplit("@", 1)[-1]  # never echo what may be credentials (user:password@host)
        raise ValueError(
            f"must be a host name or address, got {shown!r}" + (" (with user info)" if "@" in value else "")
        )
    return value


_HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _host_name(raw: str) -> str:
    """A daemon's name on the broker: it goes into Redis keys and broker ids (`<host>/<process>/...`),
    so no `/`, `:` or spaces."""
    name = raw.strip()
    if not _HOST_NAME.match(name):
        raise ValueError("1 to 63 characters: letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def default_host_name() -> str:
    """The machine's host name, cut to what NIETEST_HOST_NAME accepts (its first label if need be)."""
    name = socket.gethostname().strip()
    if _HOST_NAME.match(name):
        return name
    label = re.sub(r"[^A-Za-z0-9._-]", "-", name.split(".")[0])[:63].lstrip("._-")
    return label or "localhost"


def _queue_name(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}", value) or value.endswith((".DQ", ".XQ")):
        raise ValueError(f"must be a queue name of letters, digits, '_', '.', '-' (not ending .DQ/.XQ), got {raw!r}")
    return value


def _modules(raw: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in raw.split(",") if part.strip())
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", name):
            raise ValueError(f"must be a comma-separated list of Python module names, got {name!r}")
    return names


def _level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError(f"must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {raw!r}")
    return value


def _path(raw: str) -> Path:
    value = raw.strip()
    if not value:
        raise ValueError("must be a directory path, got an empty value")
    try:
        path = Path(value).expanduser().absolute()
    except RuntimeError as exc:  # "~nosuchuser/x"
        raise ValueError(f"must be a directory path, got {value!r} ({exc})") from None
    # The daemon creates it: a file in the way would stop it with a traceback after some dirs exist.
    for existing in (path, *path.parents):
        if os.path.lexists(existing):
            if not existing.is_dir():
                raise ValueError(f"must be a directory path, but {str(existing)!r} exists and is not a directory")
            break
    return path


# --- the settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueSettings:
    key: str  # master, master_ops, subtask, subtask_ops
    name: str  # the Dramatiq queue name
    processes: int
    threads: int
    max_memory: int  # bytes of resident memory past which a worker recycles; 0: no limit
    max_messages: int  # messages after which a worker recycles; 0: no limit


@dataclass(frozen=True)
class Settings:
    home: Path
    data_dir: Path
    log_dir: Path
    run_dir: Path
    queues: dict[str, QueueSettings]
    external_broker_url: str | None  # None: the embedded valkey-server
    redis_sentinel_password: str | None  # of the Sentinels, with a redis+sentinel:// broker URL
    max_retries: int
    nieta_xtoken: str | None
    nieta_api_base_url: str
    nieta_ops_api_base_url: str
    image_max_polling_attempts: int
    image_polling_interval: float
    lumina_max_polling_attempts: int
    lumina_polling_interval: float
    mongo_uri: str | None
    mongo_host: str | None
    mongo_port: int
    mongo_user: str | None
    mongo_password: str | None
    mongo_db: str
    task_collection: str
    subtask_collection: str
    feishu_webhook_url: str | None
    feishu_task_webhook_url: str | None
    feishu_alert_webhook_url: str | None
    feishu_webhook_secret: str | None
    frontend_base_url: str | None
    log_max_bytes: int
    log_backups: int
    log_level: str
    max_jobs: int
    max_lumina_jobs: int
    alert_crash_loop_restarts: int
    alert_crash_loop_window: float
    alert_failure_streak: int
    alert_coalesce_seconds: float
    start_retries: int
    drain_seconds: float
    broker_heartbeat_timeout: float
    hang_seconds: float
    metrics_addr: tuple[str, int] | None  # None: no metrics program
    metrics_token: str | None
    actor_modules: tuple[str, ...]
    fair_share: FairShare = FairShare.OWNER
    owner_weights: Mapping[str, float] = field(default_factory=dict)  # owners not named weigh 1
    store_url: str | None = None  # NIETEST_STORE_URL; None: MONGO_URI / MONGO_HOST, else SQLite in the data dir
    host_name: str = "localhost"  # NIETEST_HOST_NAME: this daemon's name on the broker (coordination/hosts.py)
    host_lost_seconds: float = 10.0  # NIETEST_HOST_LOST_SECONDS: a host silent this long is lost
    # NIETEST_TAKEOVER_PAUSE_SECONDS: fault injection for tests (programs/host_keeper.py): the wait
    # between claiming a lost host and handing back its work, so a test can cut the taker off mid-way.
    takeover_pause_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    # --- derived values -------------------------------------------------------------------------

    @property
    def embedded_broker(self) -> bool:
        return self.external_broker_url is None

    @property
    def broker_socket(self) -> Path:
        return self.run_dir / "broker.sock"

    @property
    def sentinel(self) -> SentinelTarget | None:
        """The Sentinels, master and database of a `redis+sentinel://` broker URL (None for one server)."""
        url = self.external_broker_url
        return parse_sentinel_url(url) if url and is_sentinel_url(url) else None

    @property
    def broker_url(self) -> str:
        """The URL every process connects to (the embedded broker's unix socket by default)."""
        return self.external_broker_url or f"unix://{self.broker_socket}"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def metrics_addr_file(self) -> Path:
        """Where the metrics program writes the `host:port` it listens on (port 0 picks one)."""
        return self.run_dir / "metrics.addr"

    @property
    def stop_wait_seconds(self) -> int:
        """How long supervisord waits for a worker to drain before SIGKILL: the budget plus slack."""
        return int(self.drain_seconds) + 10

    @property
    def store_kind(self) -> StoreKind:
        """The store in use: NIETEST_STORE_URL's scheme, else MongoDB with MONGO_URI / MONGO_HOST, else SQLite."""
        if self.store_url:
            return StoreKind.of_url(self.store_url)
        if self.mongo_uri or self.mongo_host:
            return StoreKind.MONGODB
        return StoreKind.SQLITE

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file: the one `sqlite:///...` names, else nietest.sqlite3 in the data dir."""
        if self.store_url and self.store_kind is StoreKind.SQLITE:
            return sqlite_path_of(self.store_url)
        return self.data_dir / SQLITE_FILENAME

    @property
    def store_description(self) -> str:
        """The store in use, its password masked: the start line, `nietest status`, error messages."""
        kind = self.store_kind
        if kind is StoreKind.SQLITE:
            return f"sqlite {self.sqlite_path}"
        if self.store_url:
            return f"{kind} {masked_url(self.store_url)}"
        if self.mongo_uri:
            return f"mongodb {redact_url(self.mongo_uri)}"
        return f"mongodb {self.mongo_host}:{self.mongo_port}/{self.mongo_db}"

    @property
    def broker_description(self) -> str:
        if self.embedded_broker:
            return f"embedded valkey {self.broker_url}"
        if self.sentinel is not None:
            return f"redis via Sentinel {self.sentinel.shown()}"
        return f"redis {redact_url(self.broker_url)}"

    def owner_weight(self, owner: str) -> float:
        """An owner's weight in the fair share of the slots (NIETEST_OWNER_WEIGHTS; 1 when not named)."""
        return self.owner_weights.get(owner, 1.0)

    def queue(self, key: str) -> QueueSettings:
        try:
            return self.queues[key]
        except KeyError:
            raise SettingsError("QUEUE", f"unknown queue {key!r}; known: {', '.join(QUEUE_KEYS)}") from None

    def secrets(self) -> list[str]:
        """Values that must never appear in a log line."""
        values = [self.nieta_xtoken, self.feishu_webhook_secret, self.mongo_password, self.metrics_token]
        values += [self.redis_sentinel_password, self.sentinel.password if self.sentinel else None]
        values += [self.feishu_webhook_url, self.feishu_task_webhook_url, self.feishu_alert_webhook_url]
        for url in (self.external_broker_url, self.mongo_uri, self.store_url):
            if url:
                values += url_passwords(url)
        return [v for v in values if v and len(v) >= MIN_SECRET_CHARS]

    def supervisor_env(self) -> dict[str, str]:
        """The variables etc/supervisord.conf expands, all validated and absolute."""
        env = {
            "NIETEST_HOME": str(self.home),
            "NIETEST_DATA_DIR": str(self.data_dir),
            "NIETEST_LOG_DIR": str(self.log_dir),
            "NIETEST_RUN_DIR": str(self.run_dir),
            "NIETEST_LOG_MAX_BYTES": str(self.log_max_bytes),
            "NIETEST_LOG_BACKUPS": str(self.log_backups),
            "NIETEST_STOP_WAIT_SECONDS": str(self.stop_wait_seconds),
            "NIETEST_BROKER_PROCESSES": "1" if self.embedded_broker else "0",
            "NIETEST_METRICS_PROCESSES": "1" if self.metrics_addr else "0",
            "NIETEST_START_RETRIES": str(self.start_retries),
            "NIETEST_HOST_NAME": self.host_name,
        }
        for q in self.queues.values():
            env[f"NIETEST_{q.key.upper()}_PROCESSES"] = str(q.processes)
            env[f"NIETEST_{q.key.upper()}_THREADS"] = str(q.threads)
        return env


# Variables nietest owns but that are not fields of their own.
# NIETEST_DAEMON_ID: this daemon start's id, from `nietest daemon` to its host keeper (programs/host_keeper.py).
_OWN_EXTRA = {
    "NIETEST_BROKER_PROCESSES",
    "NIETEST_METRICS_PROCESSES",
    "NIETEST_STOP_WAIT_SECONDS",
    "NIETEST_PYTHON",
    "NIETEST_DAEMON_ID",
}
_QUEUE_COUNT = re.compile(r"^NIETEST_(.+)_(PROCESSES|THREADS|MAX_MEMORY|MAX_MESSAGES)$")


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise SettingsError naming the first bad variable."""
    return _load(dict(os.environ if environ is None else environ), {})


def variable_names() -> tuple[str, ...]:
    """Every variable `load()` reads, in the order it reads them (the tests give each one a bad value)."""
    seen: dict[str, None] = {}
    _load({}, seen)
    return tuple(seen)


def _load(env: dict[str, str], seen: dict[str, None]) -> Settings:
    def get(name: str, parse: Callable[[str], Any], default: Any = None) -> Any:
        seen[name] = None
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw)
        except ValueError as exc:
            raise SettingsError(name, str(exc)) from None

    home = get("NIETEST_HOME", _path) or _path("var")
    data_dir = get("NIETEST_DATA_DIR", _path, home / "data")
    log_dir = get("NIETEST_LOG_DIR", _path, home / "log")
    run_dir = get("NIETEST_RUN_DIR", _path, home / "run")
    # unix sockets live in the run dir: their path must fit in sockaddr_un (108 bytes).
    if len(str(run_dir / "supervisor.sock")) > 100:
        # NIETEST_HOME when the run dir is derived from it: name what the operator set.
        variable = "NIETEST_RUN_DIR" if env.get("NIETEST_RUN_DIR", "").strip() else "NIETEST_HOME"
        raise SettingsError(variable, f"run dir path is too long for a unix socket ({len(str(run_dir))} chars)")

    queues: dict[str, QueueSettings] = {}
    for key, (name_var, default_name) in QUEUE_NAME_VARS.items():
        upper = key.upper()
        queues[key] = QueueSettings(
            key=key,
            name=get(name_var, _queue_name, default_name),
            processes=get(f"NIETEST_{upper}_PROCESSES", _int(0, MAX_PROCESSES), DEFAULT_PROCESSES[key]),
            threads=get(f"NIETEST_{upper}_THREADS", _int(1, MAX_THREADS), DEFAULT_THREADS),
            max_memory=get(f"NIETEST_{upper}_MAX_MEMORY", _memory_limit, DEFAULT_MAX_MEMORY),
            max_messages=get(f"NIETEST_{upper}_MAX_MESSAGES", _int(0, 10**9), 0),
        )
    names = [q.name for q in queues.values()]
    # Name the variable the operator set (the later one if several), not the default it collides with.
    for key, (name_var, _) in sorted(QUEUE_NAME_VARS.items(), key=lambda kv: (kv[1][0] in env, kv[0]), reverse=True):
        if names.count(queues[key].name) > 1:
            raise SettingsError(name_var, f"queue name {queues[key].name!r} is used by another queue")

    broker_url = get("BROKER_REDIS_URL", _broker_url)
    sentinel_password = get("NIETEST_REDIS_SENTINEL_PASSWORD", _text)
    if sentinel_password is not None and not is_sentinel_url(broker_url):
        raise SettingsError(
            "NIETEST_REDIS_SENTINEL_PASSWORD", "is set but BROKER_REDIS_URL is not a redis+sentinel:// URL"
        )
    redis_host = get("REDIS_HOST", _host)
    redis_port = get("REDIS_PORT", _int(1, 65535), 6379)
    redis_db = get("REDIS_DB", _int(0, 15), 0)
    if broker_url is None and redis_host is not None:
        broker_url = f"redis://{redis_host}:{redis_port}/{redis_db}"

    mongo_uri = get("MONGO_URI", _url("mongodb", "mongodb+srv"))
    mongo_host = get("MONGO_HOST", _host)
    store_url = get("NIETEST_STORE_URL", _store_url)
    if store_url is not None and (mongo_uri is not None or mongo_host is not None):
        other = "MONGO_URI" if mongo_uri is not None else "MONGO_HOST"
        raise SettingsError(
            "NIETEST_STORE_URL",
            f"and {other} both name a store: set only one (NIETEST_STORE_URL=mongodb://... replaces MONGO_URI)",
        )
    # Set but empty turns the metrics program off (unset: the default address).
    metrics_default = None if env.get("NIETEST_METRICS_ADDR", "x").strip() == "" else ("127.0.0.1", 9464)
    metrics_addr = get("NIETEST_METRICS_ADDR", _listen_addr, metrics_default)
    feishu = get("FEISHU_WEBHOOK_URL", _url("http", "https", secret=True))

    settings = Settings(
        home=home,
        data_dir=data_dir,
        log_dir=log_dir,
        run_dir=run_dir,
        queues=queues,
        external_broker_url=broker_url,
        redis_sentinel_password=sentinel_password,
        max_retries=get("MAX_RETRIES", _int(0, 100), 0),
        nieta_xtoken=get("NIETA_XTOKEN", _token),
        nieta_api_base_url=get("NIETA_API_BASE_URL", _url("http", "https"), "https://api.talesofai.cn"),
        nieta_ops_api_base_url=get("NIETA_OPS_API_BASE_URL", _url("http", "https"), "https://ops.api.talesofai.cn"),
        image_max_polling_attempts=get("IMAGE_MAX_POLLING_ATTEMPTS", _int(1, 100_000), 30),
        image_polling_interval=get("IMAGE_POLLING_INTERVAL", _float(0.05, 3600), 2.0),
        lumina_max_polling_attempts=get("LUMINA_MAX_POLLING_ATTEMPTS", _int(1, 100_000), 50),
        lumina_polling_interval=get("LUMINA_POLLING_INTERVAL", _float(0.05, 3600), 3.0),
        mongo_uri=mongo_uri,
        mongo_host=mongo_host,
        mongo_port=get("MONGO_PORT", _int(1, 65535), 27017),
        mongo_user=get("MONGO_USER", _text),
        mongo_password=get("MONGO_PASSWORD", _text),
        mongo_db=get("MONGO_DB", _queue_name, "task_db"),
        task_collection=get("TASK_COLLECTION", _queue_name, "tasks"),
        subtask_collection=get("SUBTASK_COLLECTION", _queue_name, "subtasks"),
        feishu_webhook_url=feishu,
        feishu_task_webhook_url=get("FEISHU_TASK_WEBHOOK_URL", _url("http", "https", secret=True), feishu),
        feishu_alert_webhook_url=get("FEISHU_ALERT_WEBHOOK_URL", _url("http", "https", secret=True), feishu),
        feishu_webhook_secret=get("FEISHU_WEBHOOK_SECRET", _text),
        frontend_base_url=get("FRONTEND_BASE_URL", _url("http", "https")),
        log_max_bytes=get("NIETEST_LOG_MAX_BYTES", _size, 50 * 1024**2),
        log_backups=get("NIETEST_LOG_BACKUPS", _int(0, 1000), 10),
        log_level=get("NIETEST_LOG_LEVEL", _level, "INFO"),
        max_jobs=get("NIETEST_MAX_JOBS", _int(1, 100_000), 50),
        max_lumina_jobs=get("NIETEST_MAX_LUMINA_JOBS", _int(1, 100_000), 24),
        alert_crash_loop_restarts=get("NIETEST_ALERT_CRASH_LOOP_RESTARTS", _int(2, 1000), 3),
        alert_crash_loop_window=get("NIETEST_ALERT_CRASH_LOOP_WINDOW", _float(1, 86400), 300.0),
        alert_failure_streak=get("NIETEST_ALERT_FAILURE_STREAK", _int(1, 100_000), 5),
        alert_coalesce_seconds=get("NIETEST_ALERT_COALESCE_SECONDS", _float(0, 3600), 10.0),
        start_retries=get("NIETEST_START_RETRIES", _int(0, 1000), 10),
        drain_seconds=get("NIETEST_DRAIN_SECONDS", _float(0, 3600), 30.0),
        broker_heartbeat_timeout=get("NIETEST_BROKER_HEARTBEAT_TIMEOUT", _float(1, 3600), 60.0),
        hang_seconds=get("NIETEST_HANG_SECONDS", _float(5, 3600), 30.0),
        metrics_addr=metrics_addr,
        metrics_token=get("NIETEST_METRICS_TOKEN", _bearer_token),
        actor_modules=get("NIETEST_ACTOR_MODULES", _modules, ()),
        fair_share=get("NIETEST_FAIR_SHARE", _fair_share, FairShare.OWNER),
        owner_weights=get("NIETEST_OWNER_WEIGHTS", _owner_weights, {}),
        store_url=store_url,
        host_name=get("NIETEST_HOST_NAME", _host_name, default_host_name()),
        host_lost_seconds=get("NIETEST_HOST_LOST_SECONDS", _float(3, 3600), 10.0),
        takeover_pause_seconds=get("NIETEST_TAKEOVER_PAUSE_SECONDS", _float(0, 60), 0.0),
    )

    # A mistyped NIETEST_* variable would otherwise be silently ignored.
    for name in sorted(env):
        if not name.startswith("NIETEST_") or name in seen or name in _OWN_EXTRA:
            continue
        match = _QUEUE_COUNT.match(name)
        if match:
            raise SettingsError(name, f"unknown queue {match.group(1)!r}; known: {', '.join(QUEUE_KEYS).upper()}")
        raise SettingsError(name, "unknown nietest variable (see the configuration table in README.md)")
    return settings
