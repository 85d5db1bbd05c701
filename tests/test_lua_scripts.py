"""The Lua scripts: each in its own file beside its module (`lua/<module>_<name>.lua`), loaded
through `coordination.connection.lua_script` only, and each one valid Lua to a real valkey-server."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import nietest_daemon
from nietest_daemon.coordination import markers
from nietest_daemon.coordination.connection import LUA_DIR, ScriptCall, lua_script, run_scripts
from nietest_daemon.testing.valkey import PrivateValkey

PACKAGE = Path(nietest_daemon.__file__).parent
LOADED = re.compile(r'lua_script\(__name__, "(\w+)"\)')


def lua_files() -> set[Path]:
    return set(PACKAGE.rglob(f"{LUA_DIR}/*.lua"))


def loaded_by_modules() -> dict[Path, str]:
    """Each script file a module loads, with the module that loads it."""
    found: dict[Path, str] = {}
    for source in PACKAGE.rglob("*.py"):
        module = ".".join(source.relative_to(PACKAGE.parent).with_suffix("").parts)
        for name in LOADED.findall(source.read_text()):
            found[source.parent / LUA_DIR / f"{source.stem}_{name}.lua"] = module
    return found


@pytest.fixture
def client(valkey: PrivateValkey) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(valkey.url)
    yield c
    c.close()


def test_every_script_file_is_loaded_by_its_module_and_every_load_has_its_file() -> None:
    files, loaded = lua_files(), loaded_by_modules()
    assert len(files) >= 12  # scheduler 4, markers 4, streaks, counters, rate limit, dramatiq_redis
    assert set(loaded) == files, {"never loaded": files - set(loaded), "missing": set(loaded) - files}


def test_no_script_is_written_inline_or_loaded_another_way() -> None:
    for source in PACKAGE.rglob("*.py"):
        text = source.read_text()
        assert "register_script(" not in text, source
        assert "redis.call(" not in text, source  # Lua text belongs in a .lua file


def test_every_script_compiles_on_valkey_under_the_sha_the_loader_gives_it(client: redis.Redis) -> None:
    for path, module in loaded_by_modules().items():
        name = path.stem.removeprefix(f"{module.rsplit('.', 1)[1]}_")
        script = lua_script(module, name)
        assert client.script_load(path.read_bytes()) == script.sha, path  # a syntax error raises here


def test_a_missing_script_fails_at_import_not_at_first_use() -> None:
    with pytest.raises(FileNotFoundError):
        lua_script("nietest_daemon.coordination.markers", "no_such_script")


def test_scripts_run_again_after_the_server_forgot_them(client: redis.Redis) -> None:
    """A broker restart empties its script cache: alone or in one round trip, a call loads its script again."""
    token = markers.take_retry_lock(client, "t-lua")
    assert token is not None
    client.script_flush()
    assert markers.release_retry_lock(client, "t-lua", token)  # one script, called on its own
    client.set("lua:a", "1")
    client.set("lua:b", "1")
    client.script_flush()
    forget = ScriptCall(lua_script("nietest_daemon.coordination.markers", "forget"), ["lua:a", "lua:b"], [])
    assert run_scripts(client, forget) == [2]
    assert client.exists("lua:a", "lua:b") == 0
