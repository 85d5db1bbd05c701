"""The fake Nieta API's script: `Rule`, one scripted behaviour, and the actions it may name
(the package's docstring lists them)."""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Any

OUTCOME_ACTIONS = frozenset({"failure", "illegal_image", "timeout", "no_url", "status", "never", "slow", "success"})
RESPONSE_ACTIONS = frozenset(
    {
        "http_500",
        "http_429",
        "http",
        "drop",
        "html",
        "empty",
        "huge",
        "wrong_type",
        "raw",
        "unknown_job",
        "shape",
        "delay",
    }
)
SHAPES = frozenset(
    {"string", "bare", "uuid", "task_uuid", "id", "task_id", "data", "data.uuid", "data.task_uuid", "data.id"}
    | {"data.task_id"}
)


@dataclass
class Rule:
    """One scripted behaviour (see the package's docstring)."""

    action: str
    endpoint: str = "create"
    nth: int | None = None
    marker: str | None = None
    lumina: bool | None = None
    times: int | None = None
    error: str | None = None
    error_field: str = "err_msg"
    status: int | None = None
    task_status: str | None = None
    body: Any = None
    content_type: str | None = None
    retry_after: float | str | None = None
    delay: float = 0.0
    generation_time: float | None = None
    shape: str = "string"
    size: int = 4 * 1024 * 1024
    probability: float | None = None
    used: int = 0

    def __post_init__(self) -> None:
        if self.action not in OUTCOME_ACTIONS | RESPONSE_ACTIONS:
            raise ValueError(f"unknown fake rule action {self.action!r}")
        if self.endpoint not in ("create", "poll", "any"):
            raise ValueError(f"unknown fake rule endpoint {self.endpoint!r}")
        if self.action in OUTCOME_ACTIONS and self.endpoint != "create":
            raise ValueError(f"outcome action {self.action!r} applies to create rules only")
        if self.action == "shape" and self.shape not in SHAPES:
            raise ValueError(f"unknown uuid shape {self.shape!r}")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be within [0, 1], got {self.probability!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rule:
        known = {f.name for f in fields(cls)} - {"used"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown rule fields: {sorted(unknown)}")
        return cls(**data)

    @property
    def is_outcome(self) -> bool:
        return self.action in OUTCOME_ACTIONS

    def active(self) -> bool:
        return self.times is None or self.used < self.times

    def matches(self, endpoint: str, nth: int, text: str, ops: bool) -> bool:
        if self.endpoint not in ("any", endpoint) or not self.active():
            return False
        if self.nth is not None and self.nth != nth:
            return False
        if self.lumina is not None and self.lumina != ops:
            return False
        if self.marker is not None and self.marker not in text:
            return False
        return self.probability is None or random.random() < self.probability
