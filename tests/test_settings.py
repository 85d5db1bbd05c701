"""Settings: defaults and one clear error per bad variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from nietest_daemon.core.redaction import Redactor, redact_url
from nietest_daemon.core.settings import FairShare, SettingsError, StoreKind, load


def test_defaults_follow_the_design() -> None:
    s = load({"NIETEST_HOME": "/srv/nt"})
    assert s.home == Path("/srv/nt")
    assert (s.data_dir, s.log_dir, s.run_dir) == (Path("/srv/nt/data"), Path("/srv/nt/log"), Path("/srv/nt/run"))
    assert {k: (q.name, q.processes, q.threads) for k, q in s.queues.items()} == {
        "master": ("nietest_master", 2, 5),
        "master_ops": ("nietest_master_ops", 0, 5),
        "subtask": ("nietest_subtask", 2, 5),
        "subtask_ops": ("nietest_subtask_ops", 2, 5),
    }
    assert s.embedded_broker and s.broker_url == "unix:///srv/nt/run/broker.sock"
    assert s.store_description == "sqlite /srv/nt/data/nietest.sqlite3"
    assert (s.log_max_bytes, s.log_backups) == (50 * 1024 * 1024, 10)
    assert (s.max_jobs, s.max_lumina_jobs, s.max_retries) == (50, 24, 0)
    assert (s.image_max_polling_attempts, s.image_polling_interval) == (30, 2.0)
    assert (s.lumina_max_polling_attempts, s.lumina_polling_interval) == (50, 3.0)
    assert (s.alert_crash_loop_restarts, s.alert_crash_loop_window) == (3, 300.0)
    assert (s.alert_failure_streak, s.alert_coalesce_seconds) == (5, 10.0)
    assert s.nieta_api_base_url == "https://api.talesofai.cn"
    assert s.nieta_ops_api_base_url == "https://ops.api.talesofai.cn"
    assert (s.mongo_db, s.task_collection, s.subtask_collection) == ("task_db", "tasks", "subtasks")
    assert s.fair_share is FairShare.OWNER and s.owner_weights == {} and s.owner_weight("anyone") == 1.0


def test_fair_share_and_owner_weights() -> None:
    s = load({"NIETEST_FAIR_SHARE": " Task ", "NIETEST_OWNER_WEIGHTS": " alice = 2, ci=0.5 ,bob smith=1e-3,"})
    assert s.fair_share is FairShare.TASK
    assert s.owner_weights == {"alice": 2.0, "ci": 0.5, "bob smith": 0.001}
    assert (s.owner_weight("alice"), s.owner_weight("ci"), s.owner_weight("carol")) == (2.0, 0.5, 1.0)
    assert load({"NIETEST_OWNER_WEIGHTS": "x=1000"}).owner_weights == {"x": 1000.0}
    assert load({"NIETEST_FAIR_SHARE": "owner"}).fair_share is FairShare.OWNER


def test_broker_url_wins_over_host_and_host_builds_a_url() -> None:
    s = load({"BROKER_REDIS_URL": "redis://:pw@h1:6380/2", "REDIS_HOST": "h2"})
    assert s.broker_url == "redis://:pw@h1:6380/2" and not s.embedded_broker
    assert s.broker_description == "redis redis://:***@h1:6380/2"
    s = load({"REDIS_HOST": "h2", "REDIS_PORT": "6390", "REDIS_DB": "3"})
    assert s.broker_url == "redis://h2:6390/3"


def test_webhooks_fall_back_to_the_default_bot() -> None:
    s = load({"FEISHU_WEBHOOK_URL": "https://open.feishu.cn/open-apis/bot/v2/hook/abc"})
    assert s.feishu_task_webhook_url == s.feishu_alert_webhook_url == "https://open.feishu.cn/open-apis/bot/v2/hook/abc"
    s = load({"FEISHU_WEBHOOK_URL": "https://a.example/x", "FEISHU_ALERT_WEBHOOK_URL": "https://b.example/y"})
    assert s.feishu_alert_webhook_url == "https://b.example/y" and s.feishu_task_webhook_url == "https://a.example/x"


def test_mongo_selects_the_store() -> None:
    assert load({"MONGO_HOST": "db1"}).store_description == "mongodb db1:27017/task_db"
    assert load({"MONGO_URI": "mongodb://u:secret@db2/x"}).store_description == "mongodb mongodb://u:***@db2/x"
    assert load({"MONGO_HOST": "db1"}).store_kind is StoreKind.MONGODB
    default = load({"NIETEST_HOME": "/srv/nt"})
    assert default.store_kind is StoreKind.SQLITE and default.store_url is None
    assert default.sqlite_path == Path("/srv/nt/data/nietest.sqlite3")


@pytest.mark.parametrize(
    ("url", "kind", "description"),
    [
        (
            "postgresql://nietest:pa%2Fss@db.example:5432/nietest?sslmode=require",
            StoreKind.POSTGRESQL,
            "postgresql postgresql://nietest:***@db.example:5432/nietest?sslmode=require",
        ),
        ("POSTGRES://db.example/nietest", StoreKind.POSTGRESQL, "postgresql postgres://db.example/nietest"),
        ("postgresql:///nietest", StoreKind.POSTGRESQL, "postgresql postgresql:///nietest"),  # the default socket
        (
            "postgresql://nt@h1:5432,h2:5433/nietest?password=pa%2Fss&connect_timeout=5",
            StoreKind.POSTGRESQL,
            "postgresql postgresql://nt@h1:5432,h2:5433/nietest?password=***&connect_timeout=5",
        ),
        ("postgresql://[::1]:5432/nietest", StoreKind.POSTGRESQL, "postgresql postgresql://[::1]:5432/nietest"),
        ("mongodb://u:pa%2Fss@db2/x", StoreKind.MONGODB, "mongodb mongodb://u:***@db2/x"),
        (
            "mongodb+srv://u:pa%2Fss@cluster.example/x",
            StoreKind.MONGODB,
            "mongodb mongodb+srv://u:***@cluster.example/x",
        ),
        ("sqlite:///srv/nt/tasks.db", StoreKind.SQLITE, "sqlite /srv/nt/tasks.db"),
        ("sqlite:////srv/nt/tasks.db", StoreKind.SQLITE, "sqlite /srv/nt/tasks.db"),  # SQLAlchemy's absolute form
        ("sqlite:///srv/my%20tasks.db", StoreKind.SQLITE, "sqlite /srv/my tasks.db"),
    ],
)
def test_store_url_selects_the_store_by_scheme(url: str, kind: StoreKind, description: str) -> None:
    s = load({"NIETEST_STORE_URL": f"  {url} ", "NIETEST_HOME": "/srv/nt"})
    assert s.store_kind is kind and s.store_description == description
    assert s.store_url is not None and s.store_url.lower() == url.lower()
    # The password, as written and percent-decoded, is a secret: masked in every log line.
    if "pa%2Fss" in url:
        assert {"pa%2Fss", "pa/ss"} <= set(s.secrets())
        redactor = Redactor(s.secrets())
        said = redactor(f"the driver said: pa/ss (pa%2Fss) refused for {url}")
        assert "pa/ss" not in said and "pa%2Fss" not in said and "***" in said


def test_a_sqlite_url_names_the_file() -> None:
    s = load({"NIETEST_STORE_URL": "sqlite:///srv/other/tasks.db", "NIETEST_HOME": "/srv/nt"})
    assert s.sqlite_path == Path("/srv/other/tasks.db")
    assert s.data_dir == Path("/srv/nt/data")  # the broker's data and the rest stay in the data dir


@pytest.mark.parametrize("other", [{"MONGO_URI": "mongodb://u:hunter2@db/x"}, {"MONGO_HOST": "db"}])
def test_a_store_url_and_a_mongo_store_are_an_error_naming_both(other: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as caught:
        load({"NIETEST_STORE_URL": "postgresql://nt:hunter2@db/nietest", **other})
    message = str(caught.value)
    assert caught.value.variable == "NIETEST_STORE_URL" and next(iter(other)) in message
    assert message.startswith("NIETEST_STORE_URL: ") and "hunter2" not in message
    # MONGO_DB and the collection names are not stores: they apply to a mongodb:// NIETEST_STORE_URL
    s = load({"NIETEST_STORE_URL": "mongodb://db/x", "MONGO_DB": "campaigns", "TASK_COLLECTION": "t"})
    assert (s.store_kind, s.mongo_db, s.task_collection) == (StoreKind.MONGODB, "campaigns", "t")


def test_supervisor_env_exports_validated_values() -> None:
    env = load(
        {
            "NIETEST_HOME": "/srv/nt",
            "NIETEST_SUBTASK_PROCESSES": "7",
            "NIETEST_LOG_MAX_BYTES": "2MB",
            "NIETEST_DRAIN_SECONDS": "20",
        }
    ).supervisor_env()
    assert env["NIETEST_SUBTASK_PROCESSES"] == "7"
    assert env["NIETEST_MASTER_OPS_PROCESSES"] == "0"
    assert env["NIETEST_LOG_MAX_BYTES"] == str(2 * 1024 * 1024)
    assert env["NIETEST_STOP_WAIT_SECONDS"] == "30"
    assert env["NIETEST_BROKER_PROCESSES"] == "1"
    assert env["NIETEST_RUN_DIR"] == "/srv/nt/run"
    # what the daemon exports is itself accepted by load(): workers re-read it
    assert load({**env, "NIETEST_PYTHON": "/usr/bin/python3"}).queues["subtask"].processes == 7


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("NIETEST_SUBTASK_PROCESSES", "-1", "between 0 and"),
        ("NIETEST_SUBTASK_THREADS", "0", "between 1 and"),
        ("NIETEST_MASTER_PROCESSES", "two", "integer"),
        ("NIETEST_SUBTASK_PROCESSES", "1000", "between 0 and 64"),
        ("BROKER_REDIS_URL", "http://localhost", "scheme"),
        ("BROKER_REDIS_URL", "redis://", "no host"),
        ("BROKER_REDIS_URL", "redis://h:notaport/0", "not a valid URL"),
        ("REDIS_PORT", "0", "between 1 and 65535"),
        ("REDIS_DB", "99", "between 0 and 15"),
        ("REDIS_HOST", "bad host", "host name"),
        ("MONGO_URI", "postgres://x", "scheme"),
        ("NIETA_API_BASE_URL", "api.talesofai.cn", "scheme"),
        ("FEISHU_WEBHOOK_URL", "ftp://x", "scheme"),
        ("IMAGE_POLLING_INTERVAL", "nan", "between"),
        ("LUMINA_MAX_POLLING_ATTEMPTS", "0", "between 1"),
        ("NIETEST_LOG_MAX_BYTES", "10", "at least 1KB"),
        ("NIETEST_LOG_MAX_BYTES", "50 parsecs", "size"),
        ("NIETEST_LOG_LEVEL", "LOUD", "DEBUG"),
        ("NIETEST_ALERT_CRASH_LOOP_RESTARTS", "1", "between 2"),
        ("NIETEST_START_RETRIES", "-1", "between 0 and 1000"),
        ("NIETEST_START_RETRIES", "often", "integer"),
        ("NIETEST_DRAIN_SECONDS", "-5", "between 0"),
        ("NIETEST_BROKER_HEARTBEAT_TIMEOUT", "0", "between 1"),
        ("NIETEST_ACTOR_MODULES", "tests/e2e_actors.py", "module names"),
        ("SUBTASK_QUEUE", "has space", "queue name"),
        ("SUBTASK_QUEUE", "nietest_master", "used by another queue"),
        ("LUMINA_QUEUE", "x.DQ", "queue name"),
        ("NIETEST_SUBTASKS_PROCESSES", "3", "unknown queue 'SUBTASKS'"),
        ("NIETEST_LOGLEVEL", "INFO", "unknown nietest variable"),
        ("NIETEST_RUN_DIR", "/" + "r" * 120, "too long for a unix socket"),
        ("NIETEST_FAIR_SHARE", "people", "must be owner or task, got 'people'"),
        ("NIETEST_OWNER_WEIGHTS", "alice=2,bob", "entry 'bob' must be name=weight"),
        ("NIETEST_OWNER_WEIGHTS", "alice=0", "entry 'alice=0': the weight must be between 0.001 and 1000"),
        ("NIETEST_OWNER_WEIGHTS", "ci=half", "entry 'ci=half': the weight must be a number"),
        ("NIETEST_OWNER_WEIGHTS", "ci=1,ci=2", "owner 'ci' is given twice"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str, words: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load({variable: value})
    assert caught.value.variable == variable
    message = str(caught.value)
    assert message.startswith(f"{variable}: ") and words in message and "\n" not in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BROKER_REDIS_URL", "http://user:hunter2@host/0"),
        ("BROKER_REDIS_URL", "redis://:hun/ter2@redis:6379/0"),  # "hun" would be read as the port
        ("MONGO_URI", "mongodb://user:hun#ter2@host/db"),
        ("MONGO_URI", "mongodb://user:12/hunter2@host/db"),  # parses, with the password in the path
        ("NIETEST_STORE_URL", "postgresql://user:hun/ter2@db/nietest"),
        ("NIETEST_STORE_URL", "postgresql://user:hunter2@db:5432/"),  # no database
        ("NIETEST_STORE_URL", "postgresql://user:hun#ter2@db/nietest"),
        ("NIETEST_STORE_URL", "postgresql://user@db/nietest?password=hunter2&ssl mode=x"),
        ("NIETEST_STORE_URL", "mysql://user:hunter2@db/nietest"),
        ("NIETEST_STORE_URL", "mongodb://user:hun/ter2@db/x"),
        ("NIETA_API_BASE_URL", "https://u:hunter2@api.example:99999/"),
    ],
)
def test_errors_never_echo_a_password(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load({variable: value})
    assert caught.value.variable == variable
    assert "hun" not in str(caught.value) and "ter2" not in str(caught.value)


def test_redact_url() -> None:
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("mongodb://u:p%40ss@h/db") == "mongodb://u:***@h/db"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_secrets_lists_every_secret_value() -> None:
    s = load(
        {
            "NIETA_XTOKEN": "tok-123456",
            "FEISHU_WEBHOOK_URL": "https://open.feishu.cn/open-apis/bot/v2/hook/hook-id-1",
            "FEISHU_WEBHOOK_SECRET": "sec-abcdef",
            "BROKER_REDIS_URL": "redis://:brokerpw@h/0",
            "MONGO_PASSWORD": "mongopw",
        }
    )
    secrets = s.secrets()
    for value in (
        "tok-123456",
        "sec-abcdef",
        "brokerpw",
        "mongopw",
        "https://open.feishu.cn/open-apis/bot/v2/hook/hook-id-1",
    ):
        assert value in secrets


def test_start_retries_default_and_export() -> None:
    """supervisord's startretries for the workers (etc/supervisord.conf): 10 unless set."""
    assert load({}).start_retries == 10
    s = load({"NIETEST_START_RETRIES": "2"})
    assert s.start_retries == 2
    assert s.supervisor_env()["NIETEST_START_RETRIES"] == "2"
    assert load({}).supervisor_env()["NIETEST_START_RETRIES"] == "10"
