"""docs/conformance.md names only tests that exist (a renamed test must update the map)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_named_in_the_conformance_map_exists():
    doc = (ROOT / "docs" / "conformance.md").read_text(encoding="utf-8")
    missing = []
    current = None
    for match in re.finditer(r"`(tests/[\w/]+\.py)?::(test_\w+)", doc):
        current = match.group(1) or current
        assert current, f"{match.group(0)} names no file"
        source = (ROOT / current).read_text(encoding="utf-8")
        if not re.search(r"def " + re.escape(match.group(2)), source):
            missing.append(f"{current}::{match.group(2)}")
    assert not missing, "docs/conformance.md names tests that do not exist: " + ", ".join(missing)
