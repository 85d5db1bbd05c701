"""The store URLs of NIETEST_STORE_URL: which store a scheme names (`StoreKind`), the checks of a
PostgreSQL and a SQLite URL, and their passwords (to mask them: `masked_url`, `url_passwords`).

core/settings.py reads the variable with these; store/__init__.py opens the store a URL names.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from nietest_daemon.core.redaction import redact_url

__all__ = [
    "ESCAPE_HINT",
    "SQLITE_FILENAME",
    "STORE_SCHEMES",
    "STORE_URL_FORMS",
    "StoreKind",
    "check_sqlite_file",
    "masked_url",
    "postgres_url",
    "shown_url",
    "sqlite_path_of",
    "url_passwords",
]

ESCAPE_HINT = "percent-encode special characters of the user name and password (%2F for /, %23 for #, %40 for @)"


class StoreKind(StrEnum):
    """The three implementations of the task store (store/__init__.py opens the one settings name)."""

    SQLITE = "sqlite"  # the embedded default: one file, one host
    MONGODB = "mongodb"
    POSTGRESQL = "postgresql"

    @classmethod
    def of_url(cls, url: str) -> StoreKind:
        """The kind a store URL names by its scheme (ValueError for a scheme that names none)."""
        scheme = url.strip().partition(":")[0].lower()
        try:
            return STORE_SCHEMES[scheme]
        except KeyError:
            raise ValueError(f"no store has the scheme {scheme!r}") from None


#: NIETEST_STORE_URL's schemes and the store each names.
STORE_SCHEMES: dict[str, StoreKind] = {
    "postgresql": StoreKind.POSTGRESQL,
    "postgres": StoreKind.POSTGRESQL,
    "mongodb": StoreKind.MONGODB,
    "mongodb+srv": StoreKind.MONGODB,
    "sqlite": StoreKind.SQLITE,
}
#: The SQLite file in the data dir when no NIETEST_STORE_URL names another (store/sqlite_file.py).
SQLITE_FILENAME = "nietest.sqlite3"


STORE_URL_FORMS = "postgresql://user@host:5432/db, mongodb://..., mongodb+srv://... or sqlite:///abs/path.db"


def shown_url(value: str) -> str:
    """What an error may echo of a URL: with user info, no more than its scheme and host (a
    password holding '/', '#' or '?' is split at the wrong place by any parser)."""
    if "@" not in value and "password=" not in value.lower():
        return redact_url(value)
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
    except ValueError:
        host = ""
    return f"{value.partition(':')[0]}://{host}/..."


def sqlite_path_of(url: str) -> Path:
    """The file a `sqlite:///abs/path/file.db` URL names. The path after `sqlite://` is the file's
    absolute path, as in a `file:///` URL (SQLAlchemy's `sqlite:////abs/path` is read the same);
    a host (`sqlite://name.db`), a relative path or a query is refused: a relative path would mean
    another file for each working directory. ValueError says why."""
    parts = urlsplit(url.strip())
    if parts.scheme != "sqlite" or parts.netloc or not parts.path.startswith("/") or parts.query or parts.fragment:
        raise ValueError(
            f"a SQLite store URL is sqlite:/// followed by the file's absolute path (sqlite:///var/lib/nietest/tasks.db),"
            f" got {shown_url(url.strip())!r}"
        )
    path = Path("/" + unquote(parts.path).lstrip("/"))
    if path == Path("/") or url.strip().endswith("/"):
        raise ValueError(f"names a directory, not a file: {str(path)!r}")
    return path


def check_sqlite_file(path: Path) -> None:
    """ValueError unless `path` can be a SQLite file: not a directory, under directories (existing
    or to be made), so that the daemon refuses it before it starts anything."""
    for existing in (path, *path.parents):
        if os.path.lexists(existing):
            if existing == path and path.is_dir():
                raise ValueError(f"names a directory, not a file: {str(path)!r}")
            if existing != path and not existing.is_dir():
                raise ValueError(f"{str(existing)!r} is not a directory, so {str(path)!r} cannot be created")
            return


def postgres_url(value: str) -> str:
    """A libpq URL: `postgresql://[user[:password]@][host][:port][,host2[:port2]...]/dbname[?param=value...]`.
    No host: libpq's default unix socket (or a `host=` parameter). The database must be named."""
    shown = shown_url(value)
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValueError(f"is not a valid URL ({ESCAPE_HINT}): {shown!r}") from None
    hosts = parts.netloc.rpartition("@")[2]
    for host in hosts.split(","):
        name, colon, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if colon and not (port.isdigit() and 1 <= int(port) <= 65535):
            hint = f" ({ESCAPE_HINT})" if "@" in value else ""
            raise ValueError(f"has a port that is not a number between 1 and 65535: {shown!r}{hint}")
        if colon and not name and "," in hosts:
            raise ValueError(f"has an empty host in its host list: {shown!r}")
    if "@" in f"{parts.path}?{parts.query}#{parts.fragment}":
        raise ValueError(f"has an '@' after its host ({shown!r}): {ESCAPE_HINT}")
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ValueError(f"must name one database after the host (postgresql://user@host:5432/nietest), got {shown!r}")
    if parts.fragment:
        raise ValueError(f"has a '#', which libpq does not read ({shown!r}): {ESCAPE_HINT}")
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if not re.fullmatch(r"[a-z_]+", name):
            raise ValueError(f"has a query parameter libpq cannot know ({name[:40]!r}): {shown!r}")
    return value


def url_passwords(url: str) -> list[str]:
    """Every password a URL carries, as written and percent-decoded: its user info's and any
    `password=` parameter (libpq reads one there too)."""
    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
    except ValueError:
        return []
    found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k == "password" and v]
    found += re.findall(r"(?:^|&)password=([^&]+)", parts.query)
    return sorted({form for value in found for form in (value, unquote(value))})


def masked_url(url: str) -> str:
    """The URL with its password masked, in the user info and in a `password=` parameter."""
    return re.sub(r"((?:\?|&)password=)[^&#]*", r"\1***", redact_url(url))
