"""The one secret redactor of nietest: log lines and error messages are masked by the same rules.

`redact(text)` masks, in this order:

- every known secret value (the Nieta token, webhook URLs and secrets, passwords), also in the
  form it takes inside a JSON string;
- the password of any URL (`scheme://user:password@host`);
- the token of any Feishu webhook (`/open-apis/bot/v2/hook/<token>`), known or not.

Secrets come from two places that must not erase each other: the worker configures the
`Settings.secrets()` at start (`set_secrets`, which replaces that configured set), while the
clients add their own credentials when they are built (`add_secrets`, which only ever adds).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

__all__ = ["MASK", "REDACTOR", "Redactor", "add_secrets", "redact", "redact_url", "set_secrets"]

MASK = "***"
#: Shorter values are not masked: they would match everywhere and hide the line rather than a secret.
MIN_SECRET_CHARS = 4

# Bounded repetitions keep the URL pattern linear on long lines (no catastrophic backtracking).
_URL_PASSWORD = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.\-]{0,15}://)(?P<user>[^:/@\s\"]{0,256}):(?P<pw>[^@/\s\"]{1,256})@", re.I
)
# The token runs to the next space, quote, query, fragment or backslash: stopping at a backslash keeps
# an escaped quote of a rendered JSON line intact (the line stays valid JSON).
_FEISHU_HOOK = re.compile(r"(/open-apis/bot/v2/hook/)[^\s\"'?#\\]+")


def _usable(secrets: Iterable[str | None] | str | None) -> set[str]:
    if secrets is None:
        return set()
    if isinstance(secrets, str):  # one secret, not its characters
        secrets = (secrets,)
    return {s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_CHARS}


class Redactor:
    """Masks known secrets, URL passwords and Feishu hook tokens in a text (see the module docstring).

    Thread-safe: calls read one compiled pattern; `set_secrets` / `add_secrets` swap it.
    """

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._lock = threading.Lock()
        self._configured: frozenset[str] = frozenset()
        self._added: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        self.set_secrets(secrets)

    @property
    def secrets(self) -> frozenset[str]:
        """Every value masked today (configured and added)."""
        return self._configured | self._added

    def set_secrets(self, secrets: Iterable[str | None]) -> None:
        """Replace the configured secrets; those given to `add_secrets` stay."""
        with self._lock:
            self._configured = frozenset(_usable(secrets))
            self._compile()

    def add_secrets(self, secrets: Iterable[str | None]) -> None:
        """Mask these values too, from now on (never removed by `set_secrets`)."""
        with self._lock:
            new = _usable(secrets) - self._added
            if new:
                self._added = self._added | new
                self._compile()

    def _compile(self) -> None:
        forms: set[str] = set()
        for secret in self._configured | self._added:
            forms.add(secret)
            forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])  # as it appears inside JSON
        ordered = sorted(forms, key=len, reverse=True)  # longest first: a secret may contain another
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        pattern = self._pattern
        if pattern is not None:
            text = pattern.sub(MASK, text)
        if "://" in text:
            text = _URL_PASSWORD.sub(rf"\g<scheme>\g<user>:{MASK}@", text)
        if "/hook/" in text:
            text = _FEISHU_HOOK.sub(rf"\g<1>{MASK}", text)
        return text


#: The process-wide redactor: the log renderer, the clients' error messages and alerts all use it.
REDACTOR = Redactor()


def redact(text: str) -> str:
    """`text` with every known secret, URL password and Feishu hook token masked."""
    return REDACTOR(text)


def set_secrets(secrets: Iterable[str | None]) -> None:
    """Replace the configured secrets (the worker's `Settings.secrets()`); added ones stay."""
    REDACTOR.set_secrets(secrets)


def add_secrets(secrets: Iterable[str | None]) -> None:
    """Mask these values from now on, in this process (a client's token, webhook URL, secret)."""
    REDACTOR.add_secrets(secrets)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{netloc[1]}"))
    except ValueError:
        return "<unparsable url>"
