"""The one colour palette of class indices: Label Studio's labeling config, the Project page, the Pokédex's boxes and
the augmentation preview all colour a class without a colour of its own by its index in this list (cycling).

Sasha Trubetskoy's "List of 20 simple, distinct colors" (https://sashamaps.net/docs/resources/20-colors/), the first
sixteen: distinct from each other, readable on photos and under white or black text.
"""

from __future__ import annotations

PALETTE = (
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#bfef45",
    "#fabed4",
    "#469990",
    "#dcbeff",
    "#9a6324",
    "#800000",
    "#aaffc3",
    "#808000",
    "#000075",
)


def palette_hex(index: int) -> str:
    """The "#rrggbb" colour of class `index`."""
    return PALETTE[index % len(PALETTE)]


def palette_rgb(index: int) -> tuple[int, int, int]:
    """The (r, g, b) colour of class `index`, 0-255."""
    value = palette_hex(index)
    return int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16)
