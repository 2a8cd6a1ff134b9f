"""The Label Studio labeling config (XML) of a yolodex project: one image, one RectangleLabels control.

The names used here (`image` for the object tag and `$image` for its task-data key, `label` for the control) are
the ones every result we read or write carries as `to_name`/`from_name`; `backend.labeling.convert` uses the same
defaults. Labels appear in class-index order so that Label Studio's sidebar numbers them as our classes
(hotkeys 1..9 follow the order). Label Studio 1.23.2 does not check results against the config
(docs/label_studio.md, Results and boxes), so the config only shapes the labeling view; `convert` validates what
comes back.

Each label also carries our class's database id (`yolodexClass="17"`, an attribute Label Studio keeps and ignores):
a renamed class keeps its old label in the config while annotations use it (`config_change`), and the id says that
the old name still means that class, so its boxes are pulled into it (`config_class_ids`).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Collection, Sequence
from typing import NamedTuple
from xml.sax.saxutils import escape

from backend.store.classes import DEFAULT_COLOURS  # the palette of classes without a colour of their own

OBJECT_NAME = "image"  # the <Image name=...>; results carry it as "to_name"
CONTROL_NAME = "label"  # the <RectangleLabels name=...>; results carry it as "from_name"
DATA_KEY = "image"  # task["data"][DATA_KEY] holds the image URL ("$image" in the config)
CLASS_ID_ATTRIBUTE = "yolodexClass"  # on each <Label>: our ProjectClass.id (stable across renames)

_COLOUR_PATTERN = re.compile(r"^#[0-9a-fA-F]{6}$")


def _attribute(text: str) -> str:
    """A double-quoted XML attribute value (always double quotes: one quoting style throughout the config)."""
    return '"' + escape(text, {'"': "&quot;", "\n": "&#10;", "\t": "&#9;"}) + '"'


def labeling_config(
    class_names: Sequence[str],
    colours: Sequence[str | None] | None = None,
    class_ids: Sequence[int | None] | None = None,
) -> str:
    """Builds the RectangleLabels config for a project's classes.

    Args:
        class_names: one name per class index 0..C-1; non-empty after stripping, unique. Any characters are
            allowed: they are escaped for XML (`&`, `<`, `>`, quotes).
        colours: optional "#rrggbb" per class (same length as `class_names`; None entries take the default
            palette colour of that index).
        class_ids: optional id of our class per label (same length; None entries carry none), written as the
            `yolodexClass` attribute.

    Returns:
        `<View><Image name="image" value="$image" zoom="true"/><RectangleLabels name="label" toName="image">`
        with one `<Label value=... background=.../>` per class, in class-index order.

    Raises:
        ValueError: no classes, an empty or duplicate name, a colour that is not "#rrggbb", or a colour list of
            the wrong length.
    """
    names = [str(name) for name in class_names]
    if not names:
        raise ValueError("a labeling config needs at least one class: add a class to the project first")
    for name in names:
        if not name.strip():
            raise ValueError(f"class names must not be empty or blank (got {names!r}): rename the class")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate class names {duplicates}: every class needs its own name")
    if colours is not None and len(colours) != len(names):
        raise ValueError(f"{len(colours)} colours for {len(names)} classes: give one colour (or None) per class")
    if class_ids is not None and len(class_ids) != len(names):
        raise ValueError(f"{len(class_ids)} class ids for {len(names)} classes: give one id (or None) per class")
    chosen = []
    for index, name in enumerate(names):
        colour = colours[index] if colours is not None else None
        colour = colour or DEFAULT_COLOURS[index % len(DEFAULT_COLOURS)]
        if not _COLOUR_PATTERN.match(colour):
            raise ValueError(f"class {name!r}: colour {colour!r} is not of the form #rrggbb")
        chosen.append(colour)
    ids = list(class_ids) if class_ids is not None else [None] * len(names)
    labels = "".join(
        f"\n    <Label value={_attribute(name)} background={_attribute(colour)}"
        + (f' {CLASS_ID_ATTRIBUTE}="{int(class_id)}"' if class_id is not None else "")
        + "/>"
        for name, colour, class_id in zip(names, chosen, ids)
    )
    return (
        f'<View>\n  <Image name="{OBJECT_NAME}" value="${DATA_KEY}" zoom="true"/>\n'
        f'  <RectangleLabels name="{CONTROL_NAME}" toName="{OBJECT_NAME}">{labels}\n  </RectangleLabels>\n</View>'
    )


def _config_entries(xml: str) -> list[tuple[str, str | None, int | None]]:
    """(label value, background colour or None, our class id or None) of the RectangleLabels control, in order."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as error:
        raise ValueError(
            f"the labeling config is not valid XML ({error}): rebuild it with labeling_config()"
        ) from error
    controls = list(root.iter("RectangleLabels"))
    if not controls:
        raise ValueError("the labeling config has no <RectangleLabels> control: rebuild it with labeling_config()")
    # Our configs have exactly one control; prefer ours by name should someone have added another.
    control = next((element for element in controls if element.get("name") == CONTROL_NAME), controls[0])
    return [
        (label.get("value", ""), label.get("background"), _class_id(label.get(CLASS_ID_ATTRIBUTE)))
        for label in control.iter("Label")
    ]


def _class_id(text: str | None) -> int | None:
    return int(text) if text is not None and text.strip().isdigit() else None


def config_labels(xml: str) -> list[str]:
    """The label values of a labeling config, in document order (unescaped).

    Raises:
        ValueError: the XML does not parse or has no RectangleLabels control.
    """
    return [value for value, _, _ in _config_entries(xml)]


def same_config(first: str, second: str) -> bool:
    """Whether two configs have the same labels, in the same order, with the same colours and class ids (the rest of
    the XML, e.g. whitespace, is not compared). A config that does not parse equals nothing."""
    try:
        normalised = [
            [(value, (colour or "").lower(), class_id) for value, colour, class_id in _config_entries(xml)]
            for xml in (first, second)
        ]
    except ValueError:
        return False
    return normalised[0] == normalised[1]


def config_class_ids(xml: str) -> dict[str, int]:
    """Label value → our class id, for the labels of a config that carry one (`yolodexClass`).

    Raises:
        ValueError: the XML does not parse or has no RectangleLabels control.
    """
    return {value: class_id for value, _, class_id in _config_entries(xml) if class_id is not None}


class ConfigChange(NamedTuple):
    """The result of `config_change`.

    Attributes:
        xml: the new config.
        added: labels new in this config, in class order.
        removed: labels of the old config that are gone from the new one.
        kept: labels no longer among the classes but kept in the config because annotations still use them.
    """

    xml: str
    added: list[str]
    removed: list[str]
    kept: list[str]


def config_change(
    old_xml: str,
    new_classes: Sequence[str],
    labels_in_use: Collection[str] = (),
    colours: Sequence[str | None] | None = None,
    class_ids: Sequence[int | None] | None = None,
) -> ConfigChange:
    """Updates a project's config to a new class list without losing annotations.

    Label Studio keeps annotations whose label is missing from the config, but its labeling view can no longer
    show or edit those boxes properly. So a label that was removed from the classes but still has annotations
    (`labels_in_use`) is KEPT in the config, after the current classes, and reported in `kept`; it goes once no
    annotation uses it. A rename is a removal plus an addition: the old name stays (if in use) until the
    annotations are relabelled; the kept old label keeps its class id, so pulling its boxes still finds the class
    (`config_class_ids`; a config written before labels carried ids has none, and its old names pull as "unknown
    label").

    Args:
        old_xml: the project's current config.
        new_classes: the class names now, in class-index order.
        labels_in_use: label values that at least one Label Studio annotation uses.
        colours: "#rrggbb" (or None) per new class; None keeps a class's colour from the old config, else the
            palette colour of its index.
        class_ids: our class id per new class (or None); kept labels keep the id they had.

    Returns:
        The new config and what changed; `removed` + `kept` are all the old labels not in `new_classes`.
    """
    old_entries = _config_entries(old_xml)
    # A hand-edited colour we cannot reuse falls back to the palette rather than failing the class change.
    old_colour = {
        value: colour if colour and _COLOUR_PATTERN.match(colour) else None for value, colour, _ in old_entries
    }
    old_id = {value: class_id for value, _, class_id in old_entries}
    new_names = [str(name) for name in new_classes]
    if colours is not None and len(colours) != len(new_names):
        raise ValueError(f"{len(colours)} colours for {len(new_names)} classes: give one colour (or None) per class")
    in_use = set(labels_in_use)
    kept = [value for value, _, _ in old_entries if value not in new_names and value in in_use]
    removed = [value for value, _, _ in old_entries if value not in new_names and value not in in_use]
    added = [name for name in new_names if name not in old_colour]
    new_colours = [
        (colours[index] if colours is not None else None) or old_colour.get(name)
        for index, name in enumerate(new_names)
    ]
    new_ids = list(class_ids) if class_ids is not None else [None] * len(new_names)
    xml = labeling_config(
        [*new_names, *kept],
        [*new_colours, *(old_colour[value] for value in kept)],
        [*new_ids, *(old_id[value] for value in kept)],
    )
    return ConfigChange(xml=xml, added=added, removed=removed, kept=kept)
