"""One TLS context per process for the HTTP clients.

httpx builds a new `ssl.SSLContext` (loading the whole CA bundle, ~25 ms) for every client unless
it is given one; a process builds a Nieta and a Feishu client, the tests build hundreds. An
`SSLContext` is safe to share between clients and threads.
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def shared_ssl_context(trust_env: bool) -> ssl.SSLContext:
    """httpx's default context; with `trust_env`, `SSL_CERT_FILE` / `SSL_CERT_DIR` as the process started with."""
    return httpx.create_ssl_context(trust_env=trust_env)
