"""The image a subtask asks for: its size from the ratio, and its seed.

Pure Python, no I/O. The task validator (domain.taskspec) and the Nieta client
(clients.nieta) both take an image's size and seed from here, so they cannot disagree.
"""

from __future__ import annotations

import math
import random
import re
from functools import lru_cache
from typing import Any

__all__ = [
    "DEFAULT_SIZE",
    "MAX_TASK_SEED",
    "RANDOM_SEED_MAX",
    "SeedError",
    "choose_seed",
    "random_seed",
    "ratio_to_size",
]

#: The largest seed a task may give: the front end's Number.MAX_SAFE_INTEGER (a larger integer
#: would not reach us exactly through JavaScript).
MAX_TASK_SEED = 2**53 - 1
#: Random seeds are drawn from 1..RANDOM_SEED_MAX, the seed range of the Nieta API (a signed 32-bit int).
RANDOM_SEED_MAX = 2_147_483_647
#: Width and height for a ratio that cannot be read.
DEFAULT_SIZE = (1024, 1024)

_RATIO = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*:\s*([0-9]+(?:\.[0-9]+)?)\s*")
_MAX_RATIO_CHARS = 64


class SeedError(ValueError):
    """A seed that is not an integer; str() says what was given."""


# --- size ---------------------------------------------------------------------------------------


def ratio_to_size(ratio: Any) -> tuple[int, int]:
    """Width and height the Nieta API expects for a ratio "a:b": about 1024x1024 pixels, multiples of 8.

    `x = sqrt(1024^2 / (a*b))`, `width = round(a*x/8)*8`, `height = round(b*x/8)*8` (halves
    rounded up); anything else than a string of two decimal numbers ("16:9", "1.5:1"), or a
    degenerate ratio (a side under 8 pixels), gives 1024x1024.
    """
    if not isinstance(ratio, str) or len(ratio) > _MAX_RATIO_CHARS:
        return DEFAULT_SIZE
    return _ratio_to_size(ratio)


@lru_cache(maxsize=256)
def _ratio_to_size(ratio: str) -> tuple[int, int]:
    match = _RATIO.fullmatch(ratio)
    if not match:
        return DEFAULT_SIZE
    a, b = float(match.group(1)), float(match.group(2))
    if not (a > 0 and b > 0 and math.isfinite(a * b) and a * b > 0):
        return DEFAULT_SIZE
    x = math.sqrt(1024 * 1024 / (a * b))
    width, height = _round8(a * x), _round8(b * x)
    if width < 8 or height < 8:
        return DEFAULT_SIZE
    return width, height


def _round8(pixels: float) -> int:
    """Nearest multiple of 8, halves rounded up."""
    if not math.isfinite(pixels):
        return 0
    return int(math.floor(pixels / 8 + 0.5)) * 8


# --- seed ---------------------------------------------------------------------------------------


def random_seed() -> int:
    """A random seed in 1..RANDOM_SEED_MAX."""
    return random.SystemRandom().randint(1, RANDOM_SEED_MAX)


def choose_seed(task_seed: Any) -> int:
    """The task's seed, or a random one when it gives none (None or 0); SeedError if not an integer."""
    if task_seed is None or isinstance(task_seed, bool):
        return random_seed()
    try:
        seed = int(task_seed)
    except (TypeError, ValueError, OverflowError):
        raise SeedError(f"seed must be an integer, got {_shown(task_seed)}") from None
    if isinstance(task_seed, float) and seed != task_seed:
        raise SeedError(f"seed must be an integer, got {task_seed!r}")
    return seed if seed != 0 else random_seed()


def _shown(value: Any, limit: int = 60) -> str:
    """repr() on one line, at most `limit` characters (repr escapes controls and lone surrogates)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
