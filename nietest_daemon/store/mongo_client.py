"""The MongoDB client of the store: the settings it pins over the URI's, its time limit, and what
a deployment puts at risk (the warning `MongoStore.prepare` logs at the daemon's start).

Durability: `w="majority"`, `journal=True`, primary reads and `retryWrites=True` (`PINNED`) keep an
acknowledged write through a failover; `timeoutMS` (`TIMEOUT_MS`) bounds every operation. They are
keyword arguments of `pymongo.MongoClient`, which win over the options of the URI; the URI's
options that contradict them are dropped (`DROPPED_URI_OPTIONS`), and each one it asked for that is
overridden or dropped is told, with what it would have put at risk (`overridden_options`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import pymongo

from nietest_daemon.core.redaction import add_secrets, redact_url

#: The longest one operation may take, server selection and pymongo's retries included (the
#: client's `timeoutMS`, which stands in for `serverSelectionTimeoutMS` and `socketTimeoutMS`): far
#: above a write's usual milliseconds and above a replica set's election (about 12 s), so that a
#: failover is waited out, yet far below the actors' time limits (5 and 30 minutes), so that a
#: half-open connection fails the operation instead of hanging its worker thread until the
#: watchdog kills the process. A shorter one is kept: the URI's `timeoutMS`, or the caller's
#: (`timeout_seconds`: the metrics probe must answer within 2 s).
TIMEOUT_MS = 30_000

#: The client options nietest pins (keyword arguments: they win over the URI), each with the values
#: of it a URI may ask for that are weaker, and what those would put at risk.
PINNED: dict[str, tuple[object, frozenset[str], str]] = {
    "w": (
        "majority",
        frozenset({"0", "1"}),
        "a failover can roll back an acknowledged write: an image may be paid twice",
    ),
    "journal": (
        True,
        frozenset({"false"}),
        "a server crash can lose an acknowledged write: an image may be paid twice",
    ),
    "readPreference": (
        "primary",
        frozenset({"primarypreferred", "secondary", "secondarypreferred", "nearest"}),
        "a secondary lags behind: a retry or a repair would count from stale data",
    ),
    "retryWrites": (
        True,
        frozenset({"false"}),
        "a write cut by a failover is not retried: a finish would leave its count to the repair pass",
    ),
}
#: URI options dropped (by lower-case name: their name, why), as they contradict what is pinned:
#: pymongo refuses primary reads with tags or a staleness bound, and `timeoutMS` bounds every
#: write in place of `wTimeoutMS`.
DROPPED_URI_OPTIONS: dict[str, tuple[str, str]] = {
    "readpreferencetags": ("readPreferenceTags", "reads go to the primary"),
    "maxstalenessseconds": ("maxStalenessSeconds", "reads go to the primary"),
    "wtimeoutms": ("wTimeoutMS", "timeoutMS bounds every write"),
}
STANDALONE_RISK = (
    "the server is standalone, not a replica set: a write cut by a network error or a restart is"
    " not retried (a finish would leave its count to the repair pass) and every task lives on one"
    " disk; a replica set, even of one member, retries writes"
)


def uri_options(uri: str) -> tuple[str, dict[str, str]]:
    """The URI without `DROPPED_URI_OPTIONS` (the rest of it as written), and the options it
    gives, by lower-case name. No I/O (`pymongo.uri_parser` resolves `mongodb+srv://` names)."""
    base, _, query = uri.partition("?")
    if not query:
        return uri, {}
    options: dict[str, str] = {}
    kept = []
    for pair in filter(None, re.split("[&;]", query)):
        name, _, value = pair.partition("=")
        key = unquote_plus(name).lower()
        options[key] = unquote_plus(value)
        if key not in DROPPED_URI_OPTIONS:
            kept.append(pair)
    return (f"{base}?{'&'.join(kept)}" if kept else base), options


def overridden_options(asked: Mapping[str, str], timeout_ms: int) -> list[str]:
    """What the URI asked for (`asked`: `uri_options`) that the client overrides or drops, each
    with what it would have put at risk when weaker than what is pinned."""
    notes = []
    for name, (value, weaker, risk) in PINNED.items():
        given = asked.get(name.lower())
        pinned_text = str(value).lower()
        if given is None or given.lower() == pinned_text:
            continue
        note = f"MONGO_URI's {name}={given} is overridden by {name}={pinned_text}"
        notes.append(f"{note} (with it, {risk})" if given.lower() in weaker else note)
    if "timeoutms" in asked and _milliseconds(asked["timeoutms"]) != timeout_ms:
        note = f"MONGO_URI's timeoutMS={asked['timeoutms']} is overridden by timeoutMS={timeout_ms}"
        notes.append(f"{note} (with it, an operation has no time limit)" if asked["timeoutms"] == "0" else note)
    for key in sorted(DROPPED_URI_OPTIONS.keys() & asked.keys()):
        name, why = DROPPED_URI_OPTIONS[key]
        notes.append(f"MONGO_URI's {name} is ignored: {why}")
    return notes


def _milliseconds(text: str | None) -> int | None:
    """A positive whole number of milliseconds (a URI option's text), else None."""
    try:
        value = int(float(text)) if text is not None else 0
    except ValueError:
        return None
    return value if value > 0 else None


def time_limit(asked: Mapping[str, str], timeout_seconds: float | None) -> int:
    """The client's `timeoutMS`: `TIMEOUT_MS`, or the caller's `timeout_seconds`, or the URI's own
    `timeoutMS` (`asked`) when it is shorter (no limit, 0, is overridden)."""
    limit = TIMEOUT_MS if timeout_seconds is None else max(1, int(timeout_seconds * 1000))
    return min(limit, _milliseconds(asked.get("timeoutms")) or limit)


def durability_risks(overridden: Iterable[str], hello: Mapping[str, Any] | None) -> list[str]:
    """The durability warnings of a deployment: the URI's options the client overrides
    (`overridden_options`), and a standalone server (`hello`: its reply; a replica set member
    names its set, a mongos says `isdbgrid`)."""
    risks = list(overridden)
    if hello is not None and "setName" not in hello and hello.get("msg") != "isdbgrid":
        risks.append(STANDALONE_RISK)
    return risks


@dataclass(frozen=True)
class OpenedClient:
    """A client (not connected yet), how the store names it (its password masked), and the notes of
    what the URI asked for that the client overrides (`overridden_options`)."""

    client: pymongo.MongoClient[Any]
    address: str
    overridden: list[str] = field(default_factory=list)


def open_client(
    *,
    uri: str | None = None,
    host: str | None = None,
    port: int = 27017,
    user: str | None = None,
    password: str | None = None,
    timeout_seconds: float | None = None,
    **client_options: Any,
) -> OpenedClient:
    """The client of a URI, or of host/port/user/password, with `PINNED` and `timeoutMS`
    (`time_limit`: `TIMEOUT_MS`, shorter for a caller that must answer quickly, `timeout_seconds`,
    or when the URI asks for less) as keyword arguments. No I/O: pymongo connects in the background.
    The password joins the secrets the redactor masks. `address` ends with the host's port when
    there is no URI (the store adds its database)."""
    url, asked = uri_options(uri) if uri else ("", {})
    timeout_ms = time_limit(asked, timeout_seconds)
    options: dict[str, Any] = {"tz_aware": True, **client_options, "timeoutMS": timeout_ms}
    options.update({name: value for name, (value, _, _) in PINNED.items()})
    if uri:
        add_secrets([urlsplit(uri).password])
        return OpenedClient(
            pymongo.MongoClient(url, **options), f"mongodb {redact_url(uri)}", overridden_options(asked, timeout_ms)
        )
    if not host:
        raise ValueError("a MongoDB client needs a uri or a host")
    add_secrets([password])
    if user is not None:
        options.setdefault("username", user)
    if password is not None:
        options.setdefault("password", password)
    return OpenedClient(pymongo.MongoClient(host=host, port=port, **options), f"mongodb {host}:{port}")
