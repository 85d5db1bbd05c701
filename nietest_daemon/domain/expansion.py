"""A task's expansion into subtasks: `expand()` lazily yields one `SubtaskSpec` per combination of
variable values, last dimension fastest; `subtask_id()` derives a subtask's id from the task id and
its coordinate. Pure Python, no I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nietest_daemon.domain.images import ratio_to_size
from nietest_daemon.domain.task_fields import is_empty

if TYPE_CHECKING:
    from nietest_daemon.domain.taskspec import Task


@dataclass(frozen=True)
class SubtaskSpec:
    """One combination of variable values: everything a subtask needs to make its image."""

    variable_indices: list[int]
    prompts: list[dict[str, Any]]
    ratio: str
    width: int
    height: int
    seed: int | None  # None: choose a random seed when the job is created
    use_polish: bool
    is_lumina: bool
    lumina_model_name: str | None
    lumina_cfg: float | None
    lumina_step: int | None

    def subtask_id(self, task_id: str) -> str:
        """This subtask's id within the task `task_id`."""
        return subtask_id(task_id, self.variable_indices)

    def as_dict(self) -> dict[str, Any]:
        """The stored subtask fields this spec determines (fresh copies)."""
        return {
            "variable_indices": list(self.variable_indices),
            "prompts": [dict(p) for p in self.prompts],
            "ratio": self.ratio,
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "use_polish": self.use_polish,
            "is_lumina": self.is_lumina,
            "lumina_model_name": self.lumina_model_name,
            "lumina_cfg": self.lumina_cfg,
            "lumina_step": self.lumina_step,
        }


def subtask_id(task_id: str, variable_indices: Sequence[int]) -> str:
    """Deterministic id of the subtask at `variable_indices`: `"<task_id>:1.0.2"`, `"<task_id>:-"` with no variables.

    Injective for task ids without ":" (those are refused), so no two coordinates of any tasks share an id.
    """
    if not isinstance(task_id, str) or not task_id or ":" in task_id:
        raise ValueError(f"task id must be a non-empty string without ':', got {task_id!r}")
    if not variable_indices:
        return f"{task_id}:-"
    return f"{task_id}:" + ".".join(str(int(i)) for i in variable_indices)


def subtask_at(task: Task, variable_indices: Sequence[int]) -> SubtaskSpec:
    """The subtask at one coordinate (ValueError when the coordinate is not in the task)."""
    indices = list(variable_indices)
    if len(indices) != len(task.dimensions):
        raise ValueError(f"the task has {len(task.dimensions)} dimensions, got {len(indices)} indices")
    for dim, i in zip(task.dimensions, indices, strict=True):
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < dim.size:
            raise ValueError(f"index {i!r} out of range for dimension {dim.index} of size {dim.size}")
    return _build(task, indices)


def expand(task: Task) -> Iterator[SubtaskSpec]:
    """Yield every subtask, the Cartesian product of the dimensions, last dimension fastest.

    A generator: one spec at a time. A task without variables yields exactly one, with `[]`.
    """
    for combination in itertools.product(*(range(size) for size in task.sizes)):
        yield _build(task, list(combination))


def _build(task: Task, indices: list[int]) -> SubtaskSpec:
    by_prompt = task.prompt_dimensions
    prompts = []
    for i, prompt in enumerate(task.prompts):
        dim = by_prompt.get(i)
        chosen = dim.values[indices[dim.index]] if dim is not None else prompt
        if not is_empty(chosen):
            prompts.append(dict(chosen))
    values = {p.name: p.value for p in task.parameters}
    for dim in task.parameter_dimensions:
        values[dim.variable_type] = dim.values[indices[dim.index]]
    width, height = ratio_to_size(values["ratio"])
    return SubtaskSpec(
        variable_indices=indices,
        prompts=prompts,
        ratio=values["ratio"],
        width=width,
        height=height,
        seed=values["seed"] or None,
        use_polish=values["use_polish"],
        is_lumina=values["is_lumina"],
        lumina_model_name=values["lumina_model_name"],
        lumina_cfg=values["lumina_cfg"],
        lumina_step=values["lumina_step"],
    )
