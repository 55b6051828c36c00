"""The option tables in docs/servers/*.md list exactly each server's options and defaults."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from amgi.options import flag_name
from amgi.servers import SERVERS, load

DOCS = Path(__file__).resolve().parents[2] / "docs" / "servers"
ROW = re.compile(r"^\| (`--[^|]*) \| ([^|]*) \|", re.MULTILINE)
FLAG = re.compile(r"`(--[a-z0-9-]+)")


def _documented(server: str) -> dict[str, str]:
    """Flag -> default cell of the table rows (a row may name several flags)."""
    out = {}
    for cell, default in ROW.findall((DOCS / f"{server}.md").read_text()):
        for flag in FLAG.findall(cell):
            if not flag.startswith("--no-"):
                out[flag] = default.strip()
    return out


def _shown(value: Any) -> set[str]:
    """How a default may be written in the docs."""
    if isinstance(value, bool):
        return {"on"} if value else {"off"}
    if value == "":
        return {'`""`', "`''`", "(empty)"}
    texts = {str(value)}
    if isinstance(value, float) and value.is_integer():
        texts.add(str(int(value)))
    return texts | {f"`{t}`" for t in texts}


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_the_option_table_matches_the_dataclass(server: str) -> None:
    documented = _documented(server)
    fields = {flag_name(f.name): f for f in dataclasses.fields(load(server).options)}
    assert set(documented) == set(fields), f"docs/servers/{server}.md: option table is stale"
    for flag, f in fields.items():
        if f.default is dataclasses.MISSING or f.default is None:
            continue  # a fallback or an empty list: the docs say what happens instead
        written = documented[flag].split(" (")[0]  # `""` (default exchange)
        assert written in _shown(f.default), (
            f"docs/servers/{server}.md: {flag} default {documented[flag]!r}, code {f.default!r}"
        )


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_whole_list_options_are_documented_as_one_item_per_flag(server: str) -> None:
    """A list option whose items may hold commas (``"whole"``) takes one item per flag:
    its row must say so, not that it splits on commas."""
    rows = {
        flag: line
        for line in (DOCS / f"{server}.md").read_text().splitlines()
        if line.startswith("| `--")
        for flag in FLAG.findall(line.split(" | ")[0])
    }
    for f in dataclasses.fields(load(server).options):
        if f.metadata.get("whole"):
            row = rows[flag_name(f.name)]
            assert "one per flag" in row, row
            assert "commas included" in row, row
            assert "comma-separated" not in row, row
