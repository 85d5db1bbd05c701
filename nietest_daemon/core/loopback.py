"""Whether a host is this machine's loopback: the one check, for an address to listen on
(programs/metrics.py) and for the host of a URL (clients/nieta.py, which extracts it first)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for `localhost` (in any case), 127.0.0.0/8, `::1`, and 127.0.0.0/8 mapped into IPv6
    (`::ffff:127.0.0.1`, loopback whatever the Python version: 3.13 changed `is_loopback` there);
    an IPv6 literal may come in brackets (`[::1]`). False for anything else: an empty host (every
    interface), and any other name, which is not resolved."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if name.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
