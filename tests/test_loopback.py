"""core.loopback.is_loopback: the one loopback check (the metrics program's listen address, the
Nieta client's API hosts)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from nietest_daemon.core.loopback import is_loopback


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.8.9.10",  # all of 127.0.0.0/8
        "::1",
        "[::1]",  # as written in a URL or NIETEST_METRICS_ADDR
        "0:0:0:0:0:0:0:1",
        "::ffff:127.0.0.1",  # IPv4 loopback mapped into IPv6, whatever the Python version
        "localhost",
        "LocalHost",  # host names are case-insensitive
    ],
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host",
    [
        "",  # listen on every interface
        "0.0.0.0",
        "::",
        "10.0.0.1",
        "192.168.1.1",
        "::ffff:10.0.0.1",
        "example.com",
        "localhost.example.com",  # a name is not resolved: only `localhost` itself is known
        "my-localhost",
        "[::1",
    ],
)
def test_other_hosts(host: str) -> None:
    assert not is_loopback(host)


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("http://127.0.0.1:8089", True),
        ("http://localhost:8089/ops", True),
        ("http://[::1]:8089", True),
        ("https://user:pw@LOCALHOST/", True),
        ("https://api.talesofai.cn", False),
        ("http://0.0.0.0:8089", False),
    ],
)
def test_a_url_is_checked_by_its_host(url: str, local: bool) -> None:
    assert is_loopback(urlsplit(url).hostname or "") is local
