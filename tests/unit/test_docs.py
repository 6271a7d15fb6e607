"""The operations guide's settings table and the Settings model say the same thing."""

from __future__ import annotations

import re
from pathlib import Path

from schemas.config import Settings

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def documented_variables() -> set[str]:
    """Every ``BORDERFLOW_*`` name in the table; "`BORDERFLOW_A_B` / `_C`" also names A_C."""
    names: set[str] = set()
    for line in OPERATIONS.read_text().splitlines():
        if not line.startswith("| `BORDERFLOW_"):
            continue
        cell = line.split("|")[1]
        tokens = re.findall(r"`([A-Z_]+)`", cell)
        first = tokens[0]
        names.add(first)
        stem = first.rsplit("_", 1)[0]
        names.update(stem + suffix for suffix in tokens[1:] if suffix.startswith("_"))
    return names


def test_every_setting_is_documented_and_every_documented_setting_exists() -> None:
    expected = {f"BORDERFLOW_{name.upper()}" for name in Settings.model_fields}
    documented = documented_variables()
    assert expected - documented == set(), "settings missing from docs/operations.md"
    assert documented - expected == set(), "docs/operations.md names settings that do not exist"
