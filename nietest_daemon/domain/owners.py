"""Who submitted a task: its `owner`, the key by which job slots are shared between people.

An owner is one line of printable text, 1 to `MAX_OWNER_CHARS` characters once stripped: no
control, line-break or bidirectional formatting character (the checks of the task format's one-line
fields, domain/task_fields.py), and no other invisible character (a zero-width space, a soft hyphen:
`str.isprintable`), so that two owners never look alike in `nietest tasks`, a report or a Feishu
card. An integer (the old back end's numeric `user_id`) becomes its decimal text; a boolean is no
owner. Where it comes from: `nietest submit --owner`, else the task file's `owner` or `user_id`,
else the invoking user; for a producer's message, its task data's `owner` or `user_id`
(`owner_in`). Pure Python, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

from nietest_daemon.domain.task_fields import TaskValidationError, check_string, kind_of

__all__ = ["MAX_OWNER_CHARS", "OWNER_FIELDS", "check_owner", "owner_in", "shown_owner"]

#: The longest owner, in characters (after stripping).
MAX_OWNER_CHARS = 128
#: The fields of a task's JSON that name its owner, the first given winning.
OWNER_FIELDS = ("owner", "user_id")


def check_owner(value: object, field: str) -> str:
    """`value` as an owner (stripped), or TaskValidationError(field, problem)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TaskValidationError(field, f"must be a string or an integer, got {kind_of(value)}")
    if isinstance(value, int):
        if abs(value) >= 10**MAX_OWNER_CHARS:  # str() of a huge int is slow, and it would be too long anyway
            raise TaskValidationError(field, f"is an integer of over {MAX_OWNER_CHARS} digits")
        value = str(value)
    text = value.strip()
    # Length, controls, line breaks, bidirectional formatting characters, empty: as a task's name.
    check_string(text, field, max_chars=MAX_OWNER_CHARS, required=True)
    for position, char in enumerate(text, 1):
        if not char.isprintable():
            raise TaskValidationError(
                field, f"must be printable text, found the invisible character U+{ord(char):04X} at position {position}"
            )
    return text


def owner_in(payload: Mapping[str, object]) -> str | None:
    """The owner a task's JSON names: its `owner`, else its `user_id` (checked, the error naming that
    field); None when it gives neither (absent or null)."""
    for field in OWNER_FIELDS:
        value = payload.get(field)
        if value is not None:
            return check_owner(value, field)
    return None


def shown_owner(value: object) -> str:
    """An owner as text output shows it: `-` for a task stored without one; anything not printable
    (a document no check let through) as U+FFFD."""
    if value is None or value == "":
        return "-"
    return "".join(c if c.isprintable() else "\ufffd" for c in str(value))
