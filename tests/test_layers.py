"""The layering of nietest_daemon is a checked contract: the import-linter contracts of
pyproject.toml ([tool.importlinter]) hold, and the repository points to no file outside itself."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_layers_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_nothing_points_outside_the_repository() -> None:
    outside = re.compile(r"DESIGN\.md|NIETA_API\.md|\.\./shared")
    found = []
    for top in ("nietest_daemon", "tests", "bench", "docs", "etc", "systemd", "scripts"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and path.suffix in {".py", ".md", ".conf", ".service", ".toml", ".sh", ""}:
                text = path.read_text(errors="replace")
                found += [f"{path.relative_to(ROOT)}: {m.group()}" for m in outside.finditer(text)]
    for name in ("README.md", "pyproject.toml"):
        found += [f"{name}: {m.group()}" for m in outside.finditer((ROOT / name).read_text())]
    found = [f for f in found if not f.startswith("tests/test_layers.py")]
    assert not found, "\n".join(found)
