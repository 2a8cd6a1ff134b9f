"""Class changes reach Label Studio: the labeling config carries each class's id, so a renamed class's old label
(kept while annotations use it) still pulls into the class; new, renamed and recoloured classes show in the config
at the next sync. The config functions on their own, then against the real server (`labelstudio` fixture)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from backend.ingest import service as store_service
from backend.labeling import service
from backend.labeling.client import connect
from backend.labeling.config import config_change, config_class_ids, config_labels, labeling_config, same_config
from backend.store.db import session_scope
from backend.store.images import add_image_bytes
from backend.store.models import Annotation, Image, Project, ProjectClass
from tests.conftest import encode_image, textured_image
from tests.test_labelstudio_sync import rect, task_of


def test_labels_carry_class_ids_and_a_renamed_label_keeps_its_id():
    old = labeling_config(["Racoon", "Fox"], [None, "#ff0000"], [17, 18])
    assert config_class_ids(old) == {"Racoon": 17, "Fox": 18}
    assert 'yolodexClass="17"' in old
    change = config_change(old, ["Raccoon", "Fox"], {"Racoon": 3}, [None, "#ff0000"], [17, 18])
    assert config_labels(change.xml) == ["Raccoon", "Fox", "Racoon"]
    assert (change.added, change.removed, change.kept) == (["Raccoon"], [], ["Racoon"])
    assert config_class_ids(change.xml) == {"Raccoon": 17, "Fox": 18, "Racoon": 17}
    # Without ids (a config from before), labels carry none, and a colour or an id is a change.
    assert config_class_ids(labeling_config(["Fox"])) == {}
    assert not same_config(labeling_config(["Fox"]), labeling_config(["Fox"], class_ids=[18]))
    assert not same_config(labeling_config(["Fox"], ["#ff0000"]), labeling_config(["Fox"], ["#00ff00"]))
    assert same_config(labeling_config(["Fox"], ["#FF0000"], [18]), labeling_config(["Fox"], ["#ff0000"], [18]))
    with pytest.raises(ValueError, match="1 class ids for 2 classes"):
        labeling_config(["Fox", "Owl"], class_ids=[1])


def ground_truth(labelstudio, project: str) -> dict[str, list[str]]:
    """{image name: [class name of each box]} from our store."""
    engine, _ = store_service.open_store(labelstudio.settings)
    with session_scope(engine) as session:
        rows = session.execute(
            select(Image.original_name, ProjectClass.name)
            .join(Annotation, Annotation.image_id == Image.id)
            .join(ProjectClass, ProjectClass.id == Annotation.class_id)
            .join(Project, Project.id == Image.project_id)
            .where(Project.name == project)
            .order_by(Image.id)
        )
        found: dict[str, list[str]] = {}
        for name, class_name in rows:
            found.setdefault(name, []).append(class_name)
        return found


@pytest.mark.slow
def test_a_renamed_class_keeps_its_boxes_and_new_classes_reach_the_config(labelstudio):
    settings = labelstudio.settings
    store_service.create_project("garden-renames", ["Racoon", "Fox"], settings=settings)
    engine, storage = store_service.open_store(settings)
    with session_scope(engine) as session:
        project = session.scalar(select(Project).where(Project.name == "garden-renames"))
        for index, name in enumerate(("bins.png", "lawn.png")):
            data = encode_image(textured_image(7000 + index))
            add_image_bytes(session, storage, project, data, source="upload", original_name=name)
    first = service.sync("garden-renames", settings)
    client = connect(settings)
    ls_project = client.get_project(first["ls_project_id"])
    assert config_labels(ls_project["label_config"]) == ["Racoon", "Fox"]
    assert set(config_class_ids(ls_project["label_config"])) == {"Racoon", "Fox"}  # Label Studio kept our attribute

    tasks = list(task_of(client, first["ls_project_id"]).values())
    client.create_annotation(tasks[0]["id"], [rect("Racoon", 10, 10, 30, 20, 96, 64)])  # drawn under the old name
    store_service.rename_class("garden-renames", "Racoon", "Raccoon", settings=settings)
    store_service.add_class("garden-renames", "Badger", colour="#00aa00", settings=settings)
    store_service.describe_class("garden-renames", "Fox", colour="#aa0000", settings=settings)

    # A pull before the next sync already files the old label under the renamed class.
    pulled = service.pull("garden-renames", settings)
    assert pulled["problems"] == {} and pulled["boxes"] == 1, pulled["summary"]
    assert ground_truth(labelstudio, "garden-renames") == {"bins.png": ["Raccoon"]}

    synced = service.sync("garden-renames", settings)
    assert synced["config"] == "updated"
    xml = client.get_project(first["ls_project_id"])["label_config"]
    # The new name and the new class are in Label Studio's config; the old name stays while a box uses it.
    assert config_labels(xml) == ["Raccoon", "Fox", "Badger", "Racoon"]
    assert config_class_ids(xml)["Racoon"] == config_class_ids(xml)["Raccoon"]
    assert 'value="Fox" background="#aa0000"' in xml and 'value="Badger" background="#00aa00"' in xml

    client.create_annotation(
        tasks[1]["id"], [rect("Raccoon", 5, 5, 20, 20, 96, 64), rect("Badger", 40, 5, 20, 20, 96, 64)]
    )
    pulled = service.pull("garden-renames", settings)
    assert pulled["problems"] == {} and pulled["boxes"] == 3, pulled["summary"]
    assert ground_truth(labelstudio, "garden-renames") == {"bins.png": ["Raccoon"], "lawn.png": ["Raccoon", "Badger"]}
    assert service.sync("garden-renames", settings)["config"] == "unchanged"
