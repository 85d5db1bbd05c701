"""What a failed HTTP call says about its request: whether it may have reached the server.

The Nieta API has no idempotency key and a Feishu webhook posts every card it gets: a request that may
have arrived is never sent again (a second image paid for, a second card posted), while one that
cannot have arrived is retried freely.
"""

from __future__ import annotations

import httpx


def maybe_delivered(exc: httpx.TransportError) -> bool:
    """Whether the request may have reached the server: anything but a failure to connect (or to get
    a connection from the pool), after which no byte of it went out."""
    return not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
