"""A project's classes and their Pokédex entries, as the user edits them: create a project with its classes, then
add, rename, recolour, describe and remove classes.

Every function works in the caller's session (the caller commits) and raises `ClassError` with a sentence that says
what to do. The invariants kept here:
- `ProjectClass.index` stays contiguous 0..C-1 (it is the label a box carries, COCO category id index + 1): a new
  class is appended, a removal renumbers the classes after it (in two steps, so the unique (project, index)
  constraint never sees two classes on one index at once);
- names are unique in a project, compared without case ("Raccoon" and "raccoon" would be two labels a person
  cannot tell apart in Label Studio);
- a class that boxes use is never removed (the annotations' foreign key would refuse it anyway; the message gives
  the count); the classes after a removed one keep the colour they showed (a class without a colour of its own
  shows the palette colour of its index, which the removal changes, so that colour is written down first);
- a colour is "#rrggbb" (stored lower case) or None (the palette colour of the class's index), a dex number an
  integer >= 0 or None.

Label Studio learns of these changes at the next sync (`backend.labeling.sync`): its labeling config lists the
classes by name, and a renamed class's old name still maps to the class when its boxes are pulled.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from backend.palette import PALETTE, palette_hex
from backend.store.models import (
    Annotation,
    Image,
    Project,
    ProjectClass,
    _checked_name,
    ensure_class,
    project_classes,
)

COLOUR_PATTERN = re.compile(r"^#[0-9a-fA-F]{6}$")

# Used in class-index order (cycling) for a class without a colour of its own (Label Studio's labeling config,
# the Project page): the app's one palette.
DEFAULT_COLOURS = PALETTE


def palette_colour(index: int) -> str:
    """The colour a class without one of its own shows at label `index`."""
    return palette_hex(index)


class ClassError(ValueError):
    """A class operation that cannot be done as asked; the message says why and what to do."""


class _Keep:
    """The default of `describe_class`'s fields: leave this field as it is."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()


@dataclass(frozen=True)
class ClassRow:
    """One class as the Project page and `yolodex classes list` show it.

    Attributes:
        index: the class's label 0..C-1.
        boxes: boxes (labeled and predicted) that use the class; it can be removed only when 0.
        images: images with at least one of those boxes.
    """

    index: int
    name: str
    dex_number: int | None
    description: str
    colour: str | None
    boxes: int
    images: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_colour(colour: str | None) -> str | None:
    """ "#rrggbb" in lower case, or None for "" / None (the class then takes its palette colour)."""
    if colour is None or not str(colour).strip():
        return None
    text = str(colour).strip()
    if not COLOUR_PATTERN.match(text):
        raise ClassError(f"colour {text!r} is not of the form #rrggbb (for example #3cb44b)")
    return text.lower()


def parse_dex_number(value: int | str | None) -> int | None:
    """An integer >= 0, or None for "" / None (no dex number: the Pokédex then shows index + 1)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ClassError(f"dex number {value!r} is not a whole number: give one like 25, or leave it empty") from None
    if isinstance(number, bool) or number < 0:
        raise ClassError(f"dex number {value!r} is negative: give 0 or more, or leave it empty")
    return number


def class_rows(session: Session, project: Project) -> list[ClassRow]:
    """The project's classes in index order, with how many boxes and images use each."""
    usage = dict(
        (class_id, (boxes, images))
        for class_id, boxes, images in session.execute(
            select(Annotation.class_id, func.count(), func.count(func.distinct(Annotation.image_id)))
            .join(Image, Image.id == Annotation.image_id)
            .where(Image.project_id == project.id)
            .group_by(Annotation.class_id)
        )
    )
    return [
        ClassRow(
            index=item.index,
            name=item.name,
            dex_number=item.dex_number,
            description=item.description or "",
            colour=item.colour,
            boxes=usage.get(item.id, (0, 0))[0],
            images=usage.get(item.id, (0, 0))[1],
        )
        for item in project_classes(session, project)
    ]


def find_class(session: Session, project: Project, name: str) -> ProjectClass:
    """The project's class called `name` (exactly, after stripping), or a ClassError naming the classes there are."""
    wanted = str(name).strip()
    classes = project_classes(session, project)
    for item in classes:
        if item.name == wanted:
            return item
    known = ", ".join(item.name for item in classes) or "none yet"
    raise ClassError(f"project {project.name!r} has no class called {wanted!r}; its classes: {known}")


def _check_free(classes: Sequence[ProjectClass], name: str, project: Project, allow: ProjectClass | None) -> None:
    for item in classes:
        if item is not allow and item.name.casefold() == name.casefold():
            raise ClassError(f"project {project.name!r} already has a class called {item.name!r}: choose another name")


def add_class(
    session: Session,
    project: Project,
    name: str,
    *,
    dex_number: int | str | None = None,
    description: str = "",
    colour: str | None = None,
) -> ProjectClass:
    """Appends a class (index C). A name the project has (in any case) is an error, not a no-op."""
    checked = _checked(name)
    _check_free(project_classes(session, project), checked, project, None)
    added, _ = ensure_class(
        session,
        project,
        checked,
        dex_number=parse_dex_number(dex_number),
        description=(description or "").strip(),
        colour=parse_colour(colour),
    )
    return added


def create_project(session: Session, name: str, classes: Sequence[str | dict[str, Any]]) -> Project:
    """A new project with its classes in the given order (index 0, 1, ...).

    Args:
        classes: at least one; a name, or a dict with "name" and optionally "dex_number", "description", "colour".

    Raises:
        ClassError: the name is taken, there is no class, or a class is invalid (nothing is created then: the
            caller's transaction is rolled back by the raise).
    """
    checked = _checked(name, "project")
    if session.scalar(select(Project).where(Project.name == checked)) is not None:
        raise ClassError(f"a project called {checked!r} already exists: choose another name, or pick it to edit it")
    specs = [{"name": item} if isinstance(item, str) else dict(item) for item in classes]
    specs = [spec for spec in specs if str(spec.get("name") or "").strip()]
    if not specs:
        raise ClassError(f"project {checked!r} needs at least one class: name the things it should detect")
    project = Project(name=checked)
    session.add(project)
    session.flush()
    for spec in specs:
        add_class(
            session,
            project,
            spec["name"],
            dex_number=spec.get("dex_number"),
            description=spec.get("description") or "",
            colour=spec.get("colour"),
        )
    return project


def rename_class(session: Session, project: Project, old_name: str, new_name: str) -> ProjectClass:
    """Renames a class; its index, boxes and dex entry stay. Only a change of case of its own name is allowed to
    collide with itself."""
    item = find_class(session, project, old_name)
    checked = _checked(new_name)
    _check_free(project_classes(session, project), checked, project, item)
    item.name = checked
    session.flush()
    return item


def describe_class(
    session: Session,
    project: Project,
    name: str,
    *,
    dex_number: int | str | None = KEEP,
    description: str | None = KEEP,
    colour: str | None = KEEP,
) -> tuple[ProjectClass, list[str]]:
    """Sets a class's dex number, description and/or colour; a field left at KEEP is not changed, "" clears it.

    Returns:
        (the class, the names of the fields whose value changed).
    """
    item = find_class(session, project, name)
    wanted: dict[str, Any] = {}
    if dex_number is not KEEP:
        wanted["dex_number"] = parse_dex_number(dex_number)
    if description is not KEEP:
        wanted["description"] = (description or "").strip()
    if colour is not KEEP:
        wanted["colour"] = parse_colour(colour)
    changed = [field for field, value in wanted.items() if getattr(item, field) != value]
    for field in changed:
        setattr(item, field, wanted[field])
    session.flush()
    return item, changed


def remove_class(session: Session, project: Project, name: str) -> int:
    """Removes a class no box uses; the classes after it move down one index (0..C-1 stays contiguous).

    Returns:
        The removed class's index.

    Raises:
        ClassError: boxes use the class (the message gives how many, on how many images), or it does not exist.
    """
    item = find_class(session, project, name)
    boxes, images = session.execute(
        select(func.count(), func.count(func.distinct(Annotation.image_id))).where(Annotation.class_id == item.id)
    ).one()
    if boxes:
        raise ClassError(
            f"class {item.name!r} is used by {boxes} box{'' if boxes == 1 else 'es'} on {images} "
            f"image{'' if images == 1 else 's'}: relabel or delete those boxes first (or rename the class instead)"
        )
    removed, count = item.index, len(project_classes(session, project))
    for later in project_classes(session, project)[removed + 1 :]:
        # A class without a colour shows the palette colour of its index: keep the one it has shown so far.
        later.colour = later.colour or palette_colour(later.index)
    session.delete(item)
    session.flush()
    # Two steps, so no moment has two classes on one index (the unique constraint is checked row by row): first
    # every later class moves above all indices in use, then down to its final place.
    after_removed = and_(ProjectClass.project_id == project.id, ProjectClass.index > removed)
    session.execute(update(ProjectClass).where(after_removed).values(index=ProjectClass.index + count))
    session.execute(
        update(ProjectClass)
        .where(ProjectClass.project_id == project.id, ProjectClass.index >= count)
        .values(index=ProjectClass.index - count - 1)
    )
    session.expire_all()
    return removed


def _checked(name: str, what: str = "class") -> str:
    try:
        return _checked_name(str(name or ""), what)
    except ValueError as error:
        raise ClassError(str(error)) from None
