"""Every variable nietest reads, given a wrong value: `nietest daemon` refuses to start.

The variables come from `settings.variable_names()` (what `settings.load()` reads), so a variable
added to core/settings.py fails `test_every_variable_has_a_wrong_value` until it gets wrong values
here, or is declared free text (a value nothing can call wrong) with the reason.

Each refusal: exit status 2, one stderr line `nietest: configuration error: VARIABLE: problem`,
nothing on stdout, nothing created on disk, no process left; and no secret (password, token,
webhook url) echoed. An empty or blank value means "unset" (the default) for every variable, so
it is never a wrong value.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
from pathlib import Path

import pytest

from nietest_daemon.core import settings as settings_module
from nietest_daemon.core.settings import SettingsError
from nietest_daemon.testing.daemon import NIETEST, clean_env, pids_of_home

SECRET = "s3cr3t-Zq81x"  # planted in every wrong value that carries a secret; must never be echoed
LONG = "/" + "r" * 120  # a run dir whose socket path cannot fit in sockaddr_un

#: Wrong values of every variable; the first is the one the daemon is started with. `{file}` is
#: an existing regular file, `{secret}` the planted secret.
BAD: dict[str, list[str]] = {
    "NIETEST_HOME": ["{file}", "{file}/below", "~no-such-user-nt/x", "/" + "h" * 120],
    "NIETEST_DATA_DIR": ["{file}", "{file}/data"],
    "NIETEST_LOG_DIR": ["{file}", "{file}/log"],
    "NIETEST_RUN_DIR": [LONG, "{file}"],
    "STANDARD_QUEUE": ["has space", "x.DQ", "nietest_subtask", "-lead", "q" * 101],
    "LUMINA_QUEUE": ["x.XQ", "a/b"],
    "SUBTASK_QUEUE": ["nietest_master", "é"],
    "SUBTASK_OPS_QUEUE": ["a/b", "nietest_subtask"],
    "BROKER_REDIS_URL": [
        "http://:{secret}@127.0.0.1:6379",
        "redis://",
        "redis://:{secret}@h:notaport/0",
        "redis://:{secret}@h:99999/0",
        "unix://",
        "127.0.0.1:6379",
        "redis+sentinel://:{secret}@h1:26379,h2:26379",  # no master name
        "redis+sentinel://:{secret}@h1:notaport/mymaster/0",
        "rediss+sentinel://:{secret}@h1:26379/mymaster/99",
        "redis+sentinel://:{secret}@,h2:26379/mymaster",
    ],
    # wrong without a redis+sentinel:// BROKER_REDIS_URL (the only thing it is for)
    "NIETEST_REDIS_SENTINEL_PASSWORD": ["{secret}"],
    "REDIS_HOST": ["bad host", "user:{secret}@h", "a/b"],
    "REDIS_PORT": ["70000", "0", "six"],
    "REDIS_DB": ["16", "-1", "zero"],
    "MONGO_URI": ["postgres://u:{secret}@h/db", "mongodb://", "not a url"],
    "NIETEST_STORE_URL": [
        "mysql://u:{secret}@db/nietest",
        "postgresql://u:{secret}@db:99999/nietest",
        "postgresql://u:{secret}@db:5432/",
        "postgresql://u:p/{secret}@db/nietest",  # a '/' in the password, not percent-encoded
        "postgresql://u:{secret}@db/nietest?ssl mode=require",
        "postgres:nietest",
        "sqlite://nietest.db",
        "sqlite:nietest.db",
        "sqlite:///{file}/tasks.db",
        "sqlite:///tmp/",
        "mongodb://",
        "mongodb+srv://u:{secret}@/x",
        "127.0.0.1:5432",
    ],
    "FEISHU_WEBHOOK_URL": [
        "ftp://open.feishu.cn/open-apis/bot/v2/hook/{secret}",
        "open.feishu.cn/open-apis/bot/v2/hook/{secret}",
        "https:///open-apis/bot/v2/hook/{secret}",
        "https://open.feishu.cn:hook/{secret}",
    ],
    "MAX_RETRIES": ["-1", "101", "some"],
    "NIETA_XTOKEN": ["tok {secret}", "tök-{secret}", "tok\t{secret}"],
    "NIETA_API_BASE_URL": ["api.talesofai.cn", "ftp://api.talesofai.cn", "https://"],
    "NIETA_OPS_API_BASE_URL": ["ops.api.talesofai.cn", "file:///etc/passwd"],
    "IMAGE_MAX_POLLING_ATTEMPTS": ["0", "-5", "lots", "100001"],
    "IMAGE_POLLING_INTERVAL": ["-2", "0", "nan", "inf", "soon"],
    "LUMINA_MAX_POLLING_ATTEMPTS": ["0", "1.5"],
    "LUMINA_POLLING_INTERVAL": ["0.01", "3601", "-inf"],
    "MONGO_HOST": ["bad host", "u:{secret}@db"],
    "MONGO_PORT": ["65536", "0", "x"],
    "MONGO_DB": ["has space", "a/b"],
    "TASK_COLLECTION": ["has space", ".hidden"],
    "SUBTASK_COLLECTION": ["a/b", "x" * 101],
    "FEISHU_TASK_WEBHOOK_URL": ["ftp://open.feishu.cn/open-apis/bot/v2/hook/{secret}", "hook-{secret}"],
    "FEISHU_ALERT_WEBHOOK_URL": ["ws://open.feishu.cn/open-apis/bot/v2/hook/{secret}", "https://:{secret}@/x"],
    "FRONTEND_BASE_URL": ["javascript:alert(1)", "ftp://x", "//example.com"],
    "NIETEST_LOG_MAX_BYTES": ["10", "huge", "-1MB", "50 parsecs"],
    "NIETEST_LOG_BACKUPS": ["-1", "1001", "x"],
    "NIETEST_LOG_LEVEL": ["LOUD", "5", "verbose"],
    "NIETEST_MAX_JOBS": ["0", "-1", "x"],
    "NIETEST_MAX_LUMINA_JOBS": ["0", "100001"],
    "NIETEST_ALERT_CRASH_LOOP_RESTARTS": ["1", "x"],
    "NIETEST_ALERT_CRASH_LOOP_WINDOW": ["0", "86401", "x"],
    "NIETEST_ALERT_FAILURE_STREAK": ["0", "-3"],
    "NIETEST_ALERT_COALESCE_SECONDS": ["-1", "3601", "x"],
    "NIETEST_START_RETRIES": ["-1", "often"],
    "NIETEST_DRAIN_SECONDS": ["-5", "x", "3601"],
    "NIETEST_BROKER_HEARTBEAT_TIMEOUT": ["0", "x"],
    "NIETEST_HANG_SECONDS": ["1", "x", "-5"],
    "NIETEST_HOST_NAME": ["a/b", "has space", "-lead"],
    "NIETEST_HOST_LOST_SECONDS": ["2", "x", "-5"],
    "NIETEST_TAKEOVER_PAUSE_SECONDS": ["-1", "x", "61"],
    "NIETEST_METRICS_ADDR": ["9464", "localhost", "127.0.0.1:99999", "http://127.0.0.1:9464", "[::1]"],
    "NIETEST_METRICS_TOKEN": ["short", "has space in it 1234567", "tök" * 8],
    "NIETEST_ACTOR_MODULES": ["tests/e2e_actors.py", "a-b", "1abc", "os;rm"],
    "NIETEST_FAIR_SHARE": ["people", "owners", "1"],
    "NIETEST_OWNER_WEIGHTS": [
        "alice",
        "alice=0",
        "alice=-1",
        "alice=two",
        "alice=1001",
        "alice=nan",
        "alice=inf",
        "=2",
        "alice=1,alice=2",
        "ci=0.5,bob",
        "al\x07ice=2",
        "a" * 129 + "=2",
    ],
}
for _key in ("MASTER", "MASTER_OPS", "SUBTASK", "SUBTASK_OPS"):
    BAD[f"NIETEST_{_key}_PROCESSES"] = ["-1", "two", "65", "1.5"]
    BAD[f"NIETEST_{_key}_THREADS"] = ["0", "many", "257"]
    BAD[f"NIETEST_{_key}_MAX_MEMORY"] = ["10MB", "lots", "-1", "1.5GB"]
    BAD[f"NIETEST_{_key}_MAX_MESSAGES"] = ["-1", "many", "1.5"]

#: Variables where no value is wrong: opaque text that only the other side can judge.
FREE_TEXT: dict[str, str] = {
    "MONGO_USER": "any user name the MongoDB server knows; only the server can refuse it",
    "MONGO_PASSWORD": "any password; only the server can refuse it (and it is never echoed)",
    "FEISHU_WEBHOOK_SECRET": "the bot's signing secret, an opaque string issued by Feishu",
}

#: Not read by load() but refused by it: a mistyped NIETEST_* name.
UNKNOWN = {"NIETEST_SUBTASKS_PROCESSES": "2", "NIETEST_LOGLEVEL": "INFO"}


def resolve(value: str, file: Path) -> str:
    return value.replace("{file}", str(file)).replace("{secret}", SECRET)


@pytest.fixture
def a_file(short_tmp: Path) -> Path:
    path = short_tmp / "a-file"
    path.write_text("not a directory\n")
    return path


def test_every_variable_has_a_wrong_value() -> None:
    names = settings_module.variable_names()
    assert len(names) == len(set(names)) and len(names) >= 50
    assert not set(BAD) & set(FREE_TEXT)
    missing = [n for n in names if n not in BAD and n not in FREE_TEXT]
    assert not missing, f"give these new variables wrong values in BAD (or a reason in FREE_TEXT): {missing}"
    assert sorted(set(BAD) | set(FREE_TEXT)) == sorted(names), "BAD/FREE_TEXT name a variable load() does not read"
    assert all(BAD.values())


@pytest.mark.parametrize("variable", sorted(BAD))
def test_each_wrong_value_is_refused_naming_its_variable(variable: str, a_file: Path, short_tmp: Path) -> None:
    for raw in BAD[variable]:
        value = resolve(raw, a_file)
        env = {"NIETEST_HOME": str(short_tmp / "home"), variable: value}
        with pytest.raises(SettingsError) as caught:
            settings_module.load(env)
        message = str(caught.value)
        assert caught.value.variable == variable, (value, message)
        assert message.startswith(f"{variable}: ") and "\n" not in message, (value, message)
        assert SECRET not in message, (value, message)
    assert not (short_tmp / "home").exists()


@pytest.mark.parametrize("variable", sorted(FREE_TEXT))
def test_free_text_variables_take_any_value(variable: str) -> None:
    for value in ("x", "ü 🔑 with spaces", "$(rm -rf /); `id` 'q' \"dq\" \\", "-1", "ftp://not-a-url"):
        settings = settings_module.load({variable: value})
        assert getattr(settings, variable.lower()) == value
        assert settings_module.load({variable: f"  {value}  "}) == settings  # surrounding blanks are trimmed


def test_blank_values_mean_the_default() -> None:
    defaults = settings_module.load({})
    for name in settings_module.variable_names():
        if name == "NIETEST_METRICS_ADDR":  # the one exception: blank turns the metrics program off
            continue
        assert settings_module.load({name: "  "}) == defaults, name


def test_blank_metrics_addr_turns_the_metrics_program_off() -> None:
    assert settings_module.load({}).metrics_addr == ("127.0.0.1", 9464)
    off = settings_module.load({"NIETEST_METRICS_ADDR": "  "})
    assert off.metrics_addr is None and off.supervisor_env()["NIETEST_METRICS_PROCESSES"] == "0"
    assert settings_module.load({"NIETEST_METRICS_ADDR": "[::1]:9000"}).metrics_addr == ("::1", 9000)
    assert settings_module.load({"NIETEST_METRICS_ADDR": "0.0.0.0:0"}).metrics_addr == ("0.0.0.0", 0)


def test_token_and_webhook_errors_never_echo_the_secret() -> None:
    for variable, value in (
        ("NIETA_XTOKEN", f"tok {SECRET}"),
        ("FEISHU_WEBHOOK_URL", f"ftp://open.feishu.cn/open-apis/bot/v2/hook/{SECRET}"),
        ("FEISHU_ALERT_WEBHOOK_URL", f"https://open.feishu.cn:{SECRET}/hook"),  # a bad port
        ("BROKER_REDIS_URL", f"http://user:{SECRET}@h/0"),
        ("REDIS_HOST", f"user:{SECRET}@h"),
    ):
        with pytest.raises(SettingsError) as caught:
            settings_module.load({variable: value})
        assert SECRET not in str(caught.value) and caught.value.variable == variable, str(caught.value)
    # but the host of a webhook is shown, to tell which one is wrong
    with pytest.raises(SettingsError, match="'ftp://open.feishu.cn/...'"):
        settings_module.load({"FEISHU_TASK_WEBHOOK_URL": f"ftp://open.feishu.cn/hook/{SECRET}"})


def _start_daemon(home: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = clean_env(NIETEST_HOME=str(home), **env_extra)
    return subprocess.run([*NIETEST, "daemon"], env=env, capture_output=True, text=True, timeout=60, cwd=home.parent)


@pytest.mark.e2e  # runs `nietest daemon` once per bad variable
def test_the_daemon_refuses_to_start_with_any_wrong_variable(short_tmp: Path, a_file: Path) -> None:
    """The real `nietest daemon`, once per variable (its first wrong value) and per unknown NIETEST_* name."""
    cases = [(variable, resolve(values[0], a_file)) for variable, values in sorted(BAD.items())]
    cases += list(UNKNOWN.items())
    before = sorted(p.name for p in short_tmp.iterdir())

    def run(case: tuple[str, str]) -> tuple[str, str, Path, subprocess.CompletedProcess[str]]:
        variable, value = case
        home = Path(value) if variable == "NIETEST_HOME" else short_tmp / f"home-{variable.lower()}"
        return variable, value, home, _start_daemon(home, {} if variable == "NIETEST_HOME" else {variable: value})

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # ~0.3 s each, on 2 cores
        results = list(pool.map(run, cases))
    assert len(results) == len(BAD) + len(UNKNOWN)
    for variable, value, home, result in results:
        lines = result.stderr.splitlines()
        assert result.returncode == 2, (variable, value, result.returncode, result.stderr)
        assert len(lines) == 1, (variable, value, result.stderr)
        assert lines[0].startswith(f"nietest: configuration error: {variable}: "), (variable, value, lines[0])
        assert result.stdout == "", (variable, result.stdout)  # not even the start line
        assert SECRET not in result.stderr, (variable, lines[0])
        assert not pids_of_home(home), variable
        if variable != "NIETEST_HOME":
            assert not home.exists(), f"{variable}: the daemon created {home} before refusing"
    # nothing created anywhere, and the file some variables pointed at is untouched
    assert sorted(p.name for p in short_tmp.iterdir()) == before
    assert a_file.read_text() == "not a directory\n"
