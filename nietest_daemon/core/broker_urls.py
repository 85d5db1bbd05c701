"""The broker URL of BROKER_REDIS_URL when it names Redis Sentinels rather than one server:
`redis+sentinel://[user:password@]host1:26379,host2:26379/MASTER_NAME/DB` (`rediss+sentinel://`: TLS
to the servers and the Sentinels). `parse_sentinel_url` checks one and says what is wrong without
echoing its password; coordination/connection.py opens the client it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

__all__ = ["SENTINEL_SCHEMES", "SentinelTarget", "is_sentinel_url", "parse_sentinel_url"]

#: scheme -> whether it asks for TLS.
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """Where the broker is: ask these Sentinels for the primary of `master`, then use database `db`."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None  # of the Redis servers (the Sentinels': NIETEST_REDIS_SENTINEL_PASSWORD)
    password: str | None = None
    tls: bool = False

    def shown(self) -> str:
        """The URL without its password, for messages and `nietest status`."""
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        user = f"{self.username or ''}:***@" if self.password else f"{self.username}@" if self.username else ""
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"{scheme}://{user}{hosts}/{self.master}/{self.db}"


def is_sentinel_url(url: str | None) -> bool:
    return bool(url) and url.split("://", 1)[0].lower() in SENTINEL_SCHEMES  # type: ignore[union-attr]


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The Sentinels, master name and database `url` names; ValueError naming what is wrong (never the password)."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"a Sentinel URL starts with {' or '.join(s + '://' for s in SENTINEL_SCHEMES)}")
    userinfo, at, location = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts_part, _, path = location.partition("/")
    if "?" in path or "#" in path:
        raise ValueError("takes no query or fragment: redis+sentinel://[user:password@]host:port,.../MASTER_NAME/DB")
    sentinels = []
    for item in hosts_part.split(","):
        host, colon, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        host = host.strip("[]")
        if not host:
            raise ValueError(f"has an empty Sentinel address in {hosts_part!r}")
        try:
            number = int(port) if colon else DEFAULT_SENTINEL_PORT
        except ValueError:
            raise ValueError(f"has a bad port in Sentinel address {item.strip()!r}") from None
        if not 0 < number < 65536:
            raise ValueError(f"has a bad port in Sentinel address {item.strip()!r}")
        sentinels.append((host, number))
    names = [p for p in path.split("/") if p]
    if not names:
        raise ValueError("names no master: redis+sentinel://[user:password@]host:port,.../MASTER_NAME/DB")
    if len(names) > 2:
        raise ValueError(f"has more than MASTER_NAME/DB after the Sentinels: {'/'.join(names)!r}")
    db = 0
    if len(names) == 2:
        if not names[1].isdigit() or not 0 <= int(names[1]) <= 15:
            raise ValueError(f"has a bad database number {names[1]!r} (0-15)")
        db = int(names[1])
    return SentinelTarget(tuple(sentinels), unquote(names[0]), db, username, password, SENTINEL_SCHEMES[scheme.lower()])
