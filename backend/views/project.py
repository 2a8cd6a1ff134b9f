"""The Project page's data: the classes table, the colour a class shows, and the changes an edit form makes."""

from __future__ import annotations

from typing import Any

from backend.ingest.starter import STARTER_NAME
from backend.store.classes import palette_colour


def shown_colour(row: dict[str, Any]) -> str:
    """The class's colour, or the palette colour Label Studio gives its index when it has none."""
    return (row["colour"] or palette_colour(row["index"])).lower()


def new_class_colour(count: int) -> str:
    """The colour a new class gets by default: the palette colour of the next index."""
    return palette_colour(count)


def own_projects(names: list[str]) -> list[str]:
    """The user's own projects (the demo project does not count)."""
    return [name for name in names if name != STARTER_NAME]


def class_lines(text: str) -> list[str]:
    """The classes typed one a line, blank lines dropped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "dex number": row["dex_number"],
            "name": row["name"],
            "description": row["description"],
            "colour": row["colour"] or f"{shown_colour(row)} (default)",
            "boxes": row["boxes"],
            "images": row["images"],
        }
        for row in rows
    ]


def edit_changes(row: dict[str, Any], name: str, dex: int | None, colour: str, description: str) -> dict[str, Any]:
    """The `service.edit_class` arguments of an edit form: the dex number and colour only when they changed (the
    palette colour left as it is stays "default")."""
    changes: dict[str, Any] = {"new_name": name, "description": description}
    if dex != row["dex_number"]:
        changes["dex_number"] = "" if dex is None else int(dex)
    if colour.lower() != shown_colour(row):
        changes["colour"] = colour
    return changes


def sentence(summary: str) -> str:
    return summary[:1].upper() + summary[1:] + "."
