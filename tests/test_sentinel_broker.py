"""The broker under Redis Sentinel, as operators see it: the URL and its errors, the start-up line
when the Sentinels cannot name a primary, `nietest status` and `/metrics` naming the primary, a
client that carries on through a failover, and the `broker failover` alert (one per failover
however many daemons see it).

The tests marked `sentinels` start a real primary, replica and three Sentinels on 127.0.0.1
(`testing/sentinel.SentinelSet`: Debian's redis-server); they skip where it is not installed.
The one that starts a daemon is marked e2e.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.commands.core import Script

from nietest_daemon.coordination import keys
from nietest_daemon.coordination.connection import (
    ScriptCall,
    SentinelView,
    broker_primary,
    redis_client,
    run_scripts,
    sentinel_primary,
)
from nietest_daemon.coordination.events import BrokerFailover
from nietest_daemon.core.settings import Settings, SettingsError, load
from nietest_daemon.programs import cli, overview
from nietest_daemon.programs.alerts.engine import Engine
from nietest_daemon.programs.alerts.failover import FailoverWatch, record_primary
from nietest_daemon.programs.alerts.inputs import FromBroker
from nietest_daemon.programs.alerts.kinds import AlertKind
from nietest_daemon.programs.alerts.records import Alert
from nietest_daemon.programs.daemon import sentinel_problem
from nietest_daemon.programs.metrics import NietestCollector, Probe
from nietest_daemon.testing import sentinel as sentinel_rig
from nietest_daemon.testing.daemon import NIETEST, ROOT, Daemon, clean_env
from nietest_daemon.testing.sentinel import MASTER, SentinelSet, free_port
from nietest_daemon.testing.waiting import wait_for

SECRET = "Sentinel-Secret-93"
needs_sentinels = pytest.mark.skipif(
    sentinel_rig.unavailable_reason() is not None, reason=sentinel_rig.unavailable_reason() or ""
)


def settings_for(url: str, home: Path, **env: str) -> Settings:
    return load({"BROKER_REDIS_URL": url, "NIETEST_HOME": str(home), **env})


# --- the URL ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"redis+sentinel://:{SECRET}@h1:26379,h2:26379", "names no master"),
        (f"redis+sentinel://:{SECRET}@h1:26379,h2:26379/", "names no master"),
        (f"redis+sentinel://:{SECRET}@h1:2637x/mymaster/0", "bad port"),
        (f"redis+sentinel://:{SECRET}@h1:70000/mymaster/0", "bad port"),
        (f"rediss+sentinel://:{SECRET}@h1:26379/mymaster/16", "bad database number '16'"),
        (f"redis+sentinel://:{SECRET}@h1:26379/mymaster/one", "bad database number 'one'"),
        (f"redis+sentinel://:{SECRET}@h1:26379,,h2/mymaster/0", "empty Sentinel address"),
        (f"redis+sentinel://:{SECRET}@h1:26379/mymaster/0/extra", "more than MASTER_NAME/DB"),
        (f"redis+sentinel://:{SECRET}@h1:26379/mymaster/0?ssl=1", "no query"),
        (f"redis+sentinel://u:{SECRET}/x@h1:26379/mymaster/one", "bad database number"),
    ],
)
def test_a_bad_sentinel_url_is_refused_naming_the_variable_and_not_the_password(url: str, says: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load({"BROKER_REDIS_URL": url})
    message = str(caught.value)
    assert caught.value.variable == "BROKER_REDIS_URL"
    assert message.startswith("BROKER_REDIS_URL: ") and says in message, message
    assert SECRET not in message and "Secret" not in message, message


def test_a_good_sentinel_url_is_shown_without_its_password(tmp_path: Path) -> None:
    settings = settings_for(
        f"rediss+sentinel://app:{SECRET}@10.0.0.1:26379,10.0.0.2,[::1]:26380/cache/3",
        tmp_path,
        NIETEST_REDIS_SENTINEL_PASSWORD="other-Secret-5",
    )
    target = settings.sentinel
    assert target is not None
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380))
    assert (target.master, target.db, target.username, target.password, target.tls) == ("cache", 3, "app", SECRET, True)
    assert target.shown() == "rediss+sentinel://app:***@10.0.0.1:26379,10.0.0.2:26379,::1:26380/cache/3"
    assert settings.broker_description == f"redis via Sentinel {target.shown()}"
    assert SECRET in settings.secrets() and "other-Secret-5" in settings.secrets()


def test_the_sentinel_password_needs_a_sentinel_url() -> None:
    with pytest.raises(SettingsError) as caught:
        load({"BROKER_REDIS_URL": "redis://h:6379/0", "NIETEST_REDIS_SENTINEL_PASSWORD": SECRET})
    assert caught.value.variable == "NIETEST_REDIS_SENTINEL_PASSWORD" and SECRET not in str(caught.value)


# --- which primary the Sentinels name ----------------------------------------------------------------


def _state(ip: str, port: int, epoch: int, flags: str = "master") -> dict[str, Any]:
    names = set(flags.split(","))
    return {
        "ip": ip,
        "port": port,
        "config-epoch": epoch,
        "is_master": "master" in names,
        "is_sdown": "s_down" in names,
        "is_odown": "o_down" in names,
    }


def test_the_primary_is_the_newest_epoch_a_sentinel_sees_up() -> None:
    views = [
        SentinelView("s1:1", {"m": _state("10.0.0.1", 6379, 0)}),  # lags: still names the old one
        SentinelView("s2:1", None, "ConnectionError: refused"),
        SentinelView("s3:1", {"m": _state("10.0.0.2", 6379, 1), "other": _state("10.9.9.9", 1, 7)}),
    ]
    assert sentinel_primary(views, "m") == ("10.0.0.2:6379", 1)
    down = [SentinelView("s1:1", {"m": _state("10.0.0.1", 6379, 0, "master,s_down")})]
    assert sentinel_primary(down, "m") is None
    assert sentinel_primary(down + [SentinelView("s2:1", {"m": _state("10.0.0.1", 6379, 0)})], "m") == (
        "10.0.0.1:6379",
        0,
    )
    assert sentinel_primary(views, "unknown") is None
    assert sentinel_primary([], "m") is None


def test_the_primary_record_reports_each_change_once(valkey: Any) -> None:
    client = redis.Redis.from_url(valkey.url)
    try:
        assert record_primary(client, "10.0.0.1:6379", 0) is None  # the first record is silent
        assert record_primary(client, "10.0.0.1:6379", 0) is None
        assert record_primary(client, "10.0.0.2:6379", 1) == "10.0.0.1:6379"  # the failover: reported once
        assert record_primary(client, "10.0.0.2:6379", 1) is None  # a second watcher: nothing
        assert record_primary(client, "10.0.0.1:6379", 0) is None  # a lagging Sentinel: nothing
        assert client.get(keys.BROKER_PRIMARY) == b"1 10.0.0.2:6379"
        assert record_primary(client, "10.0.0.1:6379", 2) == "10.0.0.2:6379"  # and back
        client.set(keys.BROKER_PRIMARY, "garbage")
        assert record_primary(client, "10.0.0.1:6379", 2) is None  # unreadable: recorded again, silently
    finally:
        client.close()


def test_a_failover_is_one_warning_card_naming_both_primaries(tmp_path: Path) -> None:
    sent: list[Alert] = []
    settings = settings_for("redis+sentinel://127.0.0.1:1/nietest/0", tmp_path, NIETEST_ALERT_COALESCE_SECONDS="0")
    engine = Engine(settings, sent.append)
    event = BrokerFailover("nietest", "10.0.0.1:6379", "10.0.0.2:6379", 1, "h1", 1_800_000_000.0)
    assert BrokerFailover.from_json(event.to_json()) == event
    engine.handle(FromBroker(event, 1000.0))
    engine.tick(1000.0)
    [alert] = sent
    assert alert.kind is AlertKind.BROKER_FAILOVER and alert.severity == "warning"
    assert alert.title == "Broker failover: nietest now at 10.0.0.2:6379 (was 10.0.0.1:6379)"
    assert "**10.0.0.2:6379**" in alert.content and "10.0.0.1:6379" in alert.content and "h1" in alert.content


def test_status_shows_the_primary_line() -> None:
    report: dict[str, Any] = {
        "broker": "redis via Sentinel redis+sentinel://127.0.0.1:26379/nietest/0",
        "broker_primary": "127.0.0.1:6380",
        "store": "sqlite /x",
        "daemon": {"running": False},
        "processes": [],
        "queues": {},
        "slots": {},
    }
    lines = overview.render(report).splitlines()
    assert lines[:3] == [
        "broker  redis via Sentinel redis+sentinel://127.0.0.1:26379/nietest/0",
        "primary 127.0.0.1:6380",
        "store   sqlite /x",
    ]
    report["broker_primary"] = None
    assert overview.render(report).splitlines()[1] == "primary none: no Sentinel names a primary now"
    del report["broker_primary"]
    assert overview.render(report).splitlines()[1].startswith("store ")  # one server: no primary line


def test_ci_installs_redis_server_and_redis_sentinel() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    install = next(i for i, line in enumerate(lines) if line.startswith("if [ ${#need[@]} -gt 0 ]"))
    for tool in ("redis-server", "redis-sentinel"):
        assert f"command -v {tool} >/dev/null || need+=({tool})" in lines[:install]


# --- the start-up line ------------------------------------------------------------------------------


def _run_cli(argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("NIETEST_") or n == "BROKER_REDIS_URL"]:
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        code = cli.run(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", [["status"], ["submit", "examples/task.json"], ["cancel", "t1"], ["retry", "t1"]])
def test_no_sentinel_answering_stops_a_broker_command_with_one_line(
    command: list[str], short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ports = [free_port(), free_port()]
    url = f"redis+sentinel://:{SECRET}@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/nietest/0"
    env = {"BROKER_REDIS_URL": url, "NIETEST_HOME": str(short_tmp), "NIETA_XTOKEN": "x" * 20}
    started = time.monotonic()
    code, out, err = _run_cli(command, env, capsys)
    assert time.monotonic() - started < 10
    assert code == 1 and out == "", (code, out, err)
    assert err.count("\n") == 1, err
    shown = f"redis+sentinel://:***@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/nietest/0"
    assert err.startswith(f"nietest: BROKER_REDIS_URL: no Sentinel answers at {shown} ("), err
    assert SECRET not in err
    assert not list(short_tmp.iterdir()), "a command that cannot reach the broker created files"


def test_a_command_that_does_not_need_the_broker_does_not_ask_the_sentinels(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis+sentinel://127.0.0.1:{free_port()}/nietest/0"
    code, _, err = _run_cli(["tasks"], {"BROKER_REDIS_URL": url, "NIETEST_HOME": str(short_tmp)}, capsys)
    assert "Sentinel" not in err and code == 0, err


# --- real Sentinels ------------------------------------------------------------------------------------


@pytest.fixture
def sentinels(short_tmp: Path) -> Iterator[SentinelSet]:
    with SentinelSet(short_tmp / "sentinels") as found:
        yield found


@pytest.fixture
def secured(short_tmp: Path) -> Iterator[SentinelSet]:
    """Servers and Sentinels that need passwords."""
    with SentinelSet(short_tmp / "secured", password=SECRET, sentinel_password="sentinel-" + SECRET) as found:
        yield found


def _address(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


@needs_sentinels
@pytest.mark.e2e  # real Sentinels: about 7 s to start and settle
def test_the_sentinels_name_the_primary_and_the_start_up_check_passes(sentinels: SentinelSet, short_tmp: Path) -> None:
    settings = settings_for(sentinels.url(2), short_tmp)
    primary = sentinels.primary()
    assert primary is not None
    assert broker_primary(settings) == _address(primary)
    assert sentinel_problem(settings) is None
    client = redis_client(settings)
    try:
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert redis.Redis(*primary, db=2).get("k") == b"v"  # the URL's database
    finally:
        client.close()


@needs_sentinels
@pytest.mark.e2e  # real Sentinels: about 7 s to start and settle
def test_an_unknown_master_name_is_one_line_naming_what_they_watch(sentinels: SentinelSet, short_tmp: Path) -> None:
    url = sentinels.url().replace(f"/{MASTER}/", "/no-such-master/")
    problem = sentinel_problem(settings_for(url, short_tmp))
    assert problem is not None
    assert problem.startswith("BROKER_REDIS_URL: the Sentinels know no master 'no-such-master' (they watch 'nietest'):")
    assert problem.endswith(url)


@needs_sentinels
@pytest.mark.e2e  # real Sentinels: about 7 s to start and settle
def test_refused_passwords_are_named_and_never_shown(secured: SentinelSet, short_tmp: Path) -> None:
    good = {"NIETEST_REDIS_SENTINEL_PASSWORD": "sentinel-" + SECRET}
    assert sentinel_problem(settings_for(secured.url(), short_tmp, **good)) is None

    problem = sentinel_problem(settings_for(secured.url(), short_tmp))  # no Sentinel password
    assert problem is not None and "the Sentinels refuse us (NIETEST_REDIS_SENTINEL_PASSWORD?)" in problem
    assert SECRET not in problem and ":***@" in problem

    wrong = secured.url().replace(SECRET, "wrong-" + SECRET)
    problem = sentinel_problem(settings_for(wrong, short_tmp, **good))
    assert problem is not None and "refuses the URL's user or password" in problem, problem
    assert SECRET not in problem


@needs_sentinels
@pytest.mark.e2e  # real Sentinels: about 7 s to start and settle
def test_status_and_metrics_name_the_primary(sentinels: SentinelSet, short_tmp: Path) -> None:
    settings = settings_for(sentinels.url(), short_tmp)
    primary = sentinels.primary()
    assert primary is not None
    report = overview.collect(settings)
    assert report["broker_primary"] == _address(primary) and "broker_error" not in report
    assert overview.render(report).splitlines()[1] == f"primary {_address(primary)}"

    probe = Probe(settings, settings.host_name)
    families = {family.name: family for family in NietestCollector(probe).collect()}
    [sample] = families["nietest_broker_primary"].samples
    assert sample.labels == {"address": _address(primary)} and sample.value == 1


@needs_sentinels
@pytest.mark.e2e  # real Sentinels: about 7 s to start and settle
def test_a_client_and_its_scripts_carry_on_through_a_failover_and_one_watch_reports_it(
    sentinels: SentinelSet, short_tmp: Path
) -> None:
    settings = settings_for(sentinels.url(), short_tmp)
    client = redis_client(settings, socket_timeout=2)
    watches = [  # two daemons on one broker
        FailoverWatch(settings, redis_client(settings, socket_timeout=2), host) for host in ("host-a", "host-b")
    ]
    get = ScriptCall(Script(None, b"return redis.call('GET', KEYS[1])"), ["k"], [])  # type: ignore[arg-type]
    try:
        assert [watch.check() for watch in watches] == [None, None]  # the first record: silent
        client.set("k", "before")
        assert run_scripts(client, get) == [b"before"]  # the script is cached on the old primary
        assert client.execute_command("WAIT", 1, 5000) == 1  # the replica has it all before the kill

        old = sentinels.kill_primary()
        killed_at = time.monotonic()
        new = sentinels.wait_failover(old)
        wait_for(lambda: client.set("k", "after"), 30, what="a write after the failover", ignore=(redis.RedisError,))
        outage = time.monotonic() - killed_at
        assert run_scripts(client, get) == [b"after"]  # NOSCRIPT on the new primary: loaded again
        assert broker_primary(settings) == _address(new)

        events: list[BrokerFailover] = []

        def both_saw_it() -> bool:
            for watch in watches:
                with contextlib.suppress(redis.RedisError):
                    found = watch.check()
                    events.extend([found] if found else [])
            return all(watch.seen is not None and watch.seen[0] == _address(new) for watch in watches)

        wait_for(both_saw_it, 30, what="both watches saw the new primary")
        assert len(events) == 1, events
        [event] = events
        assert (event.master, event.old, event.new) == (MASTER, _address(old), _address(new))
        assert event.epoch >= 1 and event.seen_by in ("host-a", "host-b")
        assert outage < 20, f"the client took {outage:.1f} s to write again"
    finally:
        client.close()
        for watch in watches:
            watch.client.close()
            watch.close()


@pytest.mark.e2e
@needs_sentinels
def test_a_daemon_on_sentinels_refuses_an_unknown_master_then_alerts_one_failover(
    sentinels: SentinelSet, short_tmp: Path
) -> None:
    bad = sentinels.url().replace(f"/{MASTER}/", "/not-it/")
    env = clean_env(BROKER_REDIS_URL=bad, NIETEST_HOME=str(short_tmp / "refused"))
    done = subprocess.run([*NIETEST, "daemon"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1 and done.stdout == "", done
    assert done.stderr.strip().splitlines() == [
        f"nietest: BROKER_REDIS_URL: the Sentinels know no master 'not-it' (they watch 'nietest'): {bad}"
    ]
    assert not (short_tmp / "refused").exists()

    home = short_tmp / "d"
    home.mkdir()
    daemon = Daemon(
        home,
        BROKER_REDIS_URL=sentinels.url(),
        NIETEST_MASTER_PROCESSES="1",
        NIETEST_SUBTASK_PROCESSES="1",
        NIETEST_SUBTASK_OPS_PROCESSES="0",
        NIETEST_ALERT_COALESCE_SECONDS="1",
        NIETEST_DRAIN_SECONDS="3",
    )
    try:
        daemon.start()
        old = sentinels.primary()
        assert old is not None
        assert daemon.status()["broker_primary"] == _address(old)
        alerts = home / "log" / "alerts.log"

        def recorded() -> bool:  # the listener's watch has recorded the first primary
            return bool(sentinels.server(old[1]).get(keys.BROKER_PRIMARY))

        wait_for(recorded, 30, what="the failover watch's first record")
        sentinels.kill_primary()
        new = sentinels.wait_failover(old)

        def failover_alerts() -> list[dict[str, Any]]:
            lines = [json.loads(line) for line in alerts.read_text().splitlines() if line.startswith("{")]
            return [line for line in lines if line.get("event") == "alert" and line.get("kind") == "broker_failover"]

        [alert] = wait_for(failover_alerts, 60, what="the broker failover alert")
        assert alert["title"].endswith(f"Broker failover: {MASTER} now at {_address(new)} (was {_address(old)})")
        wait_for(lambda: daemon.status()["broker_primary"] == _address(new), 30, what="status names the new one")
        daemon.wait_running(60)  # every worker waited the failover out
        assert len(failover_alerts()) == 1
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(timeout=60)
        daemon.kill_everything()
