"""No module of the package is over 700 lines unless it is one concept too big to split, named here
with the reason (docs/architecture.md, "Modules by layer")."""

from __future__ import annotations

from nietest_daemon.testing.daemon import ROOT

MAX_LINES = 700
#: Modules allowed past MAX_LINES, each with why it is one concept. None today.
ALLOWED: dict[str, str] = {}


def test_no_module_is_over_700_lines() -> None:
    too_long = {}
    for path in sorted((ROOT / "nietest_daemon").rglob("*.py")):
        name = str(path.relative_to(ROOT))
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES and name not in ALLOWED:
            too_long[name] = lines
    assert too_long == {}, f"split these, or name them in ALLOWED with the reason: {too_long}"
