"""The subtask as the pipeline sees it: a typed view of the stored document, and its lane.

A subtask runs on one of two lanes, each with its own image API host, job-slot cap, polling
budget, queue and actors: the standard lane and the Lumina lane. "ops" in a name means the Lumina
lane's own resources as the seed named them: the `SUBTASK_OPS_QUEUE` queue and the Nieta "ops" API
host (`NIETA_OPS_API_BASE_URL`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class Lane(StrEnum):
    """Which image API a subtask uses. The value names its job slots (`nietest:slots:<lane>:...`)."""

    STANDARD = "standard"
    LUMINA = "lumina"

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> Lane:
        """The lane of a stored subtask (or task) document: its `is_lumina` flag."""
        return cls.LUMINA if doc.get("is_lumina") else cls.STANDARD

    @property
    def is_lumina(self) -> bool:
        return self is Lane.LUMINA

    @property
    def queue_key(self) -> str:
        """The settings key of the lane's subtask queue (`subtask` or `subtask_ops`)."""
        return "subtask_ops" if self is Lane.LUMINA else "subtask"


@dataclass(frozen=True)
class Subtask:
    """What the pipeline reads of a stored subtask; `doc` is the whole document (the API request
    is built from it)."""

    id: str
    task_id: str
    status: str
    lane: Lane
    job_uuid: str | None
    seed: int | None
    attempts: int
    started_at: datetime | None
    doc: Mapping[str, Any]

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Subtask:
        return cls(
            id=doc["id"],
            task_id=doc["task_id"],
            status=doc["status"],
            lane=Lane.of(doc),
            job_uuid=doc.get("job_uuid") or None,
            seed=doc.get("seed"),
            attempts=int(doc.get("attempts") or 0),
            started_at=doc.get("started_at"),
            doc=doc,
        )
