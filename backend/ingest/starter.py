"""The "Starter Pokédex": a labeled project made from the synthetic shapes generator, so that every page has real
data to show on a fresh machine before the user brings anything. Original art (drawn shapes), never copyrighted
images; each class gets its dex entry (number, name, description, colour).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.data.synthetic import SHAPE_COLOURS, generate_synthetic_dataset
from backend.ingest.importer import import_paths
from backend.store.models import Image, Project, ensure_class, get_or_create_project

STARTER_NAME = "Starter Pokédex"
STARTER_CLASSES = ("circle", "square", "triangle")
DEX_ENTRIES = {
    "circle": "Rolls wherever the floor tilts. Seen in every colour of red, it has no corners to hide behind.",
    "square": "Stacks neatly with its own kind. Four equal sides and four right angles: it never argues.",
    "triangle": "Always points somewhere. The sturdiest of the three; it keeps its shape under any load.",
}


def create_starter_project(
    session: Session, storage: Path, *, train: int = 48, val: int = 16, seed: int = 0
) -> tuple[Project, dict[str, Any] | None]:
    """Creates the starter project once: dex entries for its classes and `train + val` labeled synthetic images.

    Returns:
        (the project, the import report as a dict, or None when the project already had images).
    """
    project = get_or_create_project(session, STARTER_NAME)
    for number, name in enumerate(STARTER_CLASSES, start=1):
        red, green, blue = SHAPE_COLOURS[name]
        ensure_class(
            session,
            project,
            name,
            dex_number=number,
            description=DEX_ENTRIES[name],
            colour=f"#{red:02x}{green:02x}{blue:02x}",
        )
    if session.scalar(select(Image.id).where(Image.project_id == project.id).limit(1)) is not None:
        return project, None
    with tempfile.TemporaryDirectory(prefix="yolodex-starter-") as scratch:
        folder = generate_synthetic_dataset(
            Path(scratch) / "shapes", num_train=train, num_val=val, class_names=STARTER_CLASSES, seed=seed
        )
        report = import_paths(session, storage, project, [folder], source="synthetic")
    return project, report.to_dict()
