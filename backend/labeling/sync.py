"""A yolodex project ⇄ its Label Studio project: sync (config, images, tasks), pull (annotations), pre-label.

Images reach Label Studio through a local-files import storage, without copies: each project gets a folder
`storage/images/labelstudio/<project id>/` of hard links to the content-addressed files, named
`<image id>_<original name>.<ext>`, and a local-files storage on that folder (Label Studio's document root is
`storage/images`, see `backend.labeling.server`). Why a folder per project: the content-addressed store is shared by
every project, and a storage syncs every file under its path. Why hard links: no copies, and Label Studio's storage
scan and file serving see ordinary files. A storage sync creates one task per new file and skips files it already
has, so re-syncing never duplicates; each task then gets our image id in `data.yolodex_image_id`, and
`labeling_tasks` keeps the image → task map.

Classes reach Label Studio by name, in its labeling config, at every sync (new, renamed and recoloured classes
included); each label carries our class id (`config.CLASS_ID_ATTRIBUTE`), so a renamed class's old label, kept
while annotations use it, still pulls into the class.

Label Studio is the place of truth for the boxes of a synced image once it has an annotation there: `pull` replaces
that image's ground truth with the latest completed annotation (see `convert.task_boxes`) and marks it labeled.
Boxes an image already had when it was first synced (a labeled import, the starter project) are sent to Label
Studio as its first annotation, so the labeling view shows them and pulling them back changes nothing.

Boxes: our xyxy original-image pixels (after EXIF orientation) inside; Label Studio percent only through
`backend.labeling.convert`.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs, urlparse

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from backend.files import NAME_MAX_BYTES, cut_to_bytes
from backend.labeling.client import LabelStudioClient, LabelStudioNotFound
from backend.labeling.config import (
    DATA_KEY,
    config_change,
    config_class_ids,
    config_labels,
    labeling_config,
    same_config,
)
from backend.labeling.convert import IMAGE_ID_KEY, boxes_to_ls_results, task_boxes, task_uncertainty
from backend.settings import Settings
from backend.store.models import (
    GROUND_TRUTH_SOURCES,
    Annotation,
    Image,
    LabelingProject,
    LabelingTask,
    Project,
    project_classes,
)
from backend.store.versions import ground_truth_boxes

if TYPE_CHECKING:  # for annotations only: inference imports torch, which the Label page must not load
    from backend.inference import Predictor
    from backend.processing import Detections

logger = logging.getLogger(__name__)

LINKS_FOLDER = "labelstudio"  # under storage/images: Label Studio's local-files document root
FILE_REGEX = r".*\.(jpe?g|png|webp|bmp|gif)$"
PROJECT_MARKER = "yolodex project {id}"  # in the Label Studio project's description: finds it again
QUEUE_VIEW_TITLE = "Least confident first"
MODEL_VERSION_PREFIX = "yolodex:"
SYNCED_STATUSES = ("ok", "near_duplicate")  # exact duplicates are never labeled twice
# Detections at or above this are sent as pre-annotation boxes; lower ones still count for the uncertainty.
DEFAULT_BOX_THRESHOLD = 0.25
UNCERTAINTY_THRESHOLD = 0.05
_LEADING_ID = re.compile(r"^(\d+)_")


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def project_folder(settings: Settings, project: Project) -> Path:
    """`storage/images/labelstudio/<project id>`: the folder the project's local-files storage scans."""
    return settings.images_dir / LINKS_FOLDER / str(project.id)


# Label Studio's project title length (its API refuses others with a 400: issue 19).
LS_TITLE_MIN, LS_TITLE_MAX = 3, 50


def link_name(image: Image) -> str:
    """`<image id>_<original name>.<ext>`: our id first (how a task finds its image), the name for people.

    Unicode is kept (Label Studio URL-encodes it); path separators and control characters become "_". The name is
    at most 80 characters and, within that, at most 255 bytes (NAME_MAX): 80 emoji are 320 bytes (issue 19). Names
    that already fitted are unchanged, so the links of earlier syncs keep their names.
    """
    extension = Path(image.path).suffix.lower() or ".jpg"
    stem = Path(image.original_name or "").stem or image.sha256[:12]
    stem = unicodedata.normalize("NFC", stem)
    stem = "".join("_" if ch in '/\\:*?"<>|' or unicodedata.category(ch).startswith("C") else ch for ch in stem)
    prefix = f"{image.id}_"
    budget = NAME_MAX_BYTES - len(prefix.encode("utf-8")) - len(extension.encode("utf-8"))
    stem = cut_to_bytes(stem.strip()[:80], budget).strip()
    return f"{prefix}{stem or image.sha256[:12]}{extension}"


def _link(source: Path, target: Path) -> None:
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:
        # A filesystem without hard links (some network or Windows mounts): a copy still works, it only costs space.
        logger.warning("hard links are not possible in %s: copying %s instead", target.parent, source.name)
        shutil.copyfile(source, target)


def image_id_from_url(url: str) -> int | None:
    """Our image id from a task's local-files URL (`/data/local-files/?d=labelstudio/3/17_cat.jpg` → 17)."""
    try:
        relative = parse_qs(urlparse(url).query).get("d", [""])[0]
    except ValueError:
        return None
    match = _LEADING_ID.match(Path(relative).name)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------------------------
# Sync
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SyncReport:
    """What a sync did.

    Attributes:
        ls_project_id: the Label Studio project.
        created_project: it was created by this sync (also after it had been deleted in Label Studio).
        images: images of the project that are synced (not exact duplicates).
        new_tasks: tasks Label Studio created in this sync.
        tasks: tasks mapped to our images after the sync.
        labels_sent: new tasks whose existing boxes were sent as their first annotation.
        config: "created", "unchanged" or "updated"; `added`/`removed`/`kept` labels when updated.
        seconds: wall time.
    """

    ls_project_id: int
    created_project: bool = False
    images: int = 0
    new_tasks: int = 0
    tasks: int = 0
    labels_sent: int = 0
    config: str = "unchanged"
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        text = (
            f"Label Studio project {self.ls_project_id}: {self.tasks} tasks for {self.images} images "
            f"({self.new_tasks} new, {self.labels_sent} with their existing boxes); labeling config {self.config}"
        )
        if self.kept:
            text += f" (kept labels still in use: {', '.join(self.kept)})"
        return text


def _class_names(session: Session, project: Project) -> list[str]:
    names = [item.name for item in project_classes(session, project)]
    if not names:
        raise ValueError(
            f"project {project.name!r} has no classes yet: add at least one on the Project page "
            f"(or with yolodex classes add NAME --project {project.name!r}) before labeling"
        )
    return names


def ls_title(name: str) -> str:
    """The Label Studio title of a project: its name, made to fit Label Studio's 3 to 50 characters (a short name gets
    " · yolodex" after it, a long one is cut). Only people read it: yolodex finds its project by the description's
    marker, so a renamed title changes nothing."""
    title = " ".join(name.split())[:LS_TITLE_MAX].strip()
    return title if len(title) >= LS_TITLE_MIN else f"{title} · yolodex".strip()


def _find_ls_project(client: LabelStudioClient, project: Project) -> dict[str, Any] | None:
    marker = PROJECT_MARKER.format(id=project.id)
    for candidate in client.list_projects():
        if marker in (candidate.get("description") or ""):
            return candidate
    return None


def end_transaction(session: Session) -> None:
    """Commits what `session` wrote so far and ends its transaction, before a request to Label Studio.

    No database transaction stays open across network I/O: on a SQLite file a writer's lock would stall every other
    writer (an import, a job's progress) for as long as Label Studio takes, and a read transaction that saw an older
    state could no longer write once another writer committed (docs/sqlite_locks_and_full_disk.md). Each step of a
    sync is safe to repeat, so committing between steps loses nothing when a later one fails.
    """
    session.commit()


def _ensure_ls_project(
    session: Session, client: LabelStudioClient, project: Project, names: list[str], report_flags: dict[str, Any]
) -> tuple[LabelingProject, dict[str, Any]]:
    row = session.get(LabelingProject, project.id)
    classes = project_classes(session, project)
    end_transaction(session)
    ls_project = None
    if row is not None:
        try:
            ls_project = client.get_project(row.ls_project_id)
        except LabelStudioNotFound:
            logger.warning("Label Studio project %s of %r is gone: creating it again", row.ls_project_id, project.name)
    if ls_project is None:
        ls_project = _find_ls_project(client, project)
    if ls_project is None:
        ls_project = client.create_project(
            title=ls_title(project.name),
            label_config=labeling_config(names, [item.colour for item in classes], [item.id for item in classes]),
            description=f"{PROJECT_MARKER.format(id=project.id)}; managed by yolodex (classes change there).",
        )
        report_flags["created"] = True
    if row is None:
        row = LabelingProject(project_id=project.id, ls_project_id=ls_project["id"])
        session.add(row)
    if row.ls_project_id != ls_project["id"]:
        # Another Label Studio project now stands for ours: the old task ids mean nothing there.
        session.execute(delete(LabelingTask).where(LabelingTask.ls_project_id == row.ls_project_id))
        row.ls_project_id, row.ls_storage_id, row.ls_view_id = ls_project["id"], None, None
    session.flush()
    return row, ls_project


def _update_config(
    session: Session, client: LabelStudioClient, project: Project, ls_project: dict[str, Any], names: list[str]
) -> tuple[str, list[str], list[str], list[str]]:
    current = ls_project.get("label_config") or ""
    try:
        current_labels = config_labels(current)
    except ValueError:
        current_labels = []
    classes = project_classes(session, project)
    end_transaction(session)
    colours, class_ids = [item.colour for item in classes], [item.id for item in classes]
    if current_labels:
        # Only labels leaving the classes (removed or renamed) need to know whether annotations still use them.
        leaving = [label for label in current_labels if label not in names]
        in_use = client.labels_in_use(ls_project["id"]) if leaving else {}
        change = config_change(current, names, in_use, colours, class_ids)
        xml, added, removed, kept = change.xml, change.added, change.removed, change.kept
    else:
        xml, added, removed, kept = labeling_config(names, colours, class_ids), list(names), [], []
    if same_config(xml, current):  # a colour or a class id (older configs have none) also counts as a change
        return "unchanged", [], [], kept
    client.update_project(ls_project["id"], label_config=xml)
    return "updated", added, removed, kept


def _ensure_storage(client: LabelStudioClient, row: LabelingProject, folder: Path) -> int:
    storages = client.list_local_storages(row.ls_project_id)
    for storage in storages:
        if storage.get("id") == row.ls_storage_id or Path(storage.get("path", "")) == folder:
            row.ls_storage_id = storage["id"]
            return storage["id"]
    created = client.create_local_storage(row.ls_project_id, str(folder), FILE_REGEX, title="yolodex images")
    row.ls_storage_id = created["id"]
    return created["id"]


def _queue_view_data() -> dict[str, Any]:
    # The unlabeled tasks, lowest prediction score first: our prediction score is 1 - uncertainty (see prelabel).
    return {
        "title": QUEUE_VIEW_TITLE,
        "ordering": ["tasks:predictions_score"],
        "filters": {
            "conjunction": "and",
            "items": [{"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0}],
        },
    }


def _ensure_view(client: LabelStudioClient, row: LabelingProject) -> None:
    views = client.list_views(row.ls_project_id)
    existing = next((view for view in views if (view.get("data") or {}).get("title") == QUEUE_VIEW_TITLE), None)
    if existing is None:
        existing = client.create_view(row.ls_project_id, _queue_view_data())
    row.ls_view_id = existing["id"]


def sync_project(
    session: Session, settings: Settings, project: Project, client: LabelStudioClient, *, send_labels: bool = True
) -> SyncReport:
    """Brings the project's Label Studio project up to date: config, image links, storage sync, task map, view.

    Safe to run any number of times: no task is ever created twice for an image, and no annotation is lost (a
    removed class stays in the config while annotations use it, see `config.config_change`).

    Args:
        send_labels: images that already have boxes (or are labeled as background) when their task is first
            created get them as the task's first annotation.

    Raises:
        LabelStudioError: Label Studio is down, refuses the token, or refuses a change (its detail is in the message).
        ValueError: the project has no classes.
    """
    started = time.monotonic()
    names = _class_names(session, project)
    flags: dict[str, Any] = {}
    row, ls_project = _ensure_ls_project(session, client, project, names, flags)
    report = SyncReport(ls_project_id=row.ls_project_id, created_project=bool(flags.get("created")))
    if report.created_project:
        report.config = "created"
    else:
        report.config, report.added, report.removed, report.kept = _update_config(
            session, client, project, ls_project, names
        )

    folder = project_folder(settings, project)
    images = _link_images(session, settings, project, folder)
    report.images = len(images)

    end_transaction(session)
    storage_id = _ensure_storage(client, row, folder)
    before = {task.ls_task_id for task in _task_rows(session, row.ls_project_id)}
    end_transaction(session)
    client.sync_local_storage(storage_id)

    known = {task.image_id: task for task in _task_rows(session, row.ls_project_id)}
    end_transaction(session)
    new_links, newly_mapped, seen_tasks = _map_tasks(client, row.ls_project_id, images, known)
    report.new_tasks = len(seen_tasks - before)
    report.tasks = len(seen_tasks)
    session.add_all(new_links)
    session.flush()

    if send_labels and newly_mapped:
        report.labels_sent = _send_existing_labels(session, client, project, names, images, newly_mapped)
    end_transaction(session)
    _ensure_view(client, row)
    row.last_event = report.summary()
    report.seconds = time.monotonic() - started
    return report


def _link_images(session: Session, settings: Settings, project: Project, folder: Path) -> dict[int, Image]:
    """The project's images to sync ({id: image}), each hard-linked into the project's Label Studio `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {
        image.id: image
        for image in session.scalars(
            select(Image).where(Image.project_id == project.id, Image.status.in_(SYNCED_STATUSES))
        )
    }
    for image in images.values():
        _link(settings.storage / image.path, folder / link_name(image))
    return images


def _map_tasks(
    client: LabelStudioClient, ls_project_id: int, images: dict[int, Image], known: dict[int, LabelingTask]
) -> tuple[list[LabelingTask], dict[int, int], set[int]]:
    """Matches the Label Studio project's tasks to our images (by `data.yolodex_image_id`, else the file name,
    which then gets written into the task), updating `known` rows whose task changed.

    Returns:
        the task rows of images not mapped before, {image id: task id} of those whose task has no annotation yet,
        and the ids of every task of a synced image.
    """
    new_links: list[LabelingTask] = []
    newly_mapped: dict[int, int] = {}
    seen_tasks = set()
    for task in client.iter_tasks(ls_project_id, fields="all"):
        data = task.get("data") or {}
        image_id = data.get(IMAGE_ID_KEY)
        if not isinstance(image_id, int):
            image_id = image_id_from_url(str(data.get(DATA_KEY, "")))
        if image_id is None or image_id not in images:
            continue  # a task someone added by hand, or an image no longer synced
        if data.get(IMAGE_ID_KEY) != image_id:
            client.update_task_data(task["id"], {**data, IMAGE_ID_KEY: image_id})
        seen_tasks.add(task["id"])
        mapped = known.get(image_id)
        if mapped is None:
            new_links.append(LabelingTask(image_id=image_id, ls_project_id=ls_project_id, ls_task_id=task["id"]))
            if not task.get("total_annotations") and not task.get("annotations"):
                newly_mapped[image_id] = task["id"]
        elif mapped.ls_task_id != task["id"]:
            mapped.ls_task_id = task["id"]
    return new_links, newly_mapped, seen_tasks


def _task_rows(session: Session, ls_project_id: int) -> list[LabelingTask]:
    return list(session.scalars(select(LabelingTask).where(LabelingTask.ls_project_id == ls_project_id)))


def _send_existing_labels(
    session: Session,
    client: LabelStudioClient,
    project: Project,
    names: list[str],
    images: dict[int, Image],
    task_of_image: dict[int, int],
) -> int:
    index_of_class = {item.id: item.index for item in project_classes(session, project)}
    ground_truth = ground_truth_boxes(session, list(task_of_image))
    end_transaction(session)
    annotation_of_image: dict[int, Any] = {}
    for image_id, task_id in task_of_image.items():
        image = images[image_id]
        boxes = ground_truth.get(image_id, [])
        if not image.labeled and not boxes:
            continue
        converted = boxes_to_ls_results(
            np.asarray([box for box, _ in boxes], dtype=np.float64).reshape(-1, 4),
            np.asarray([index_of_class[class_id] for _, class_id in boxes], dtype=np.int64),
            None,
            (image.width, image.height),
            names,
        )
        annotation_of_image[image_id] = client.create_annotation(task_id, converted.results).get("id")
    for image_id, annotation_id in annotation_of_image.items():
        mapped = session.get(LabelingTask, image_id)
        if mapped is not None:
            mapped.annotation_id = annotation_id
    return len(annotation_of_image)


def labeling_project(session: Session, project: Project) -> LabelingProject:
    """The project's Label Studio link, or a ValueError saying to sync first."""
    row = session.get(LabelingProject, project.id)
    if row is None:
        raise ValueError(
            f"project {project.name!r} is not in Label Studio yet: sync it first (yolodex label sync --project ...)"
        )
    return row


# ----------------------------------------------------------------------------------------------------------------
# Pull
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PullReport:
    """What a pull did.

    Attributes:
        tasks: tasks read.
        labeled: tasks with a completed annotation (the project's labeled count in Label Studio).
        updated: images whose boxes were replaced by Label Studio's.
        unlabeled_again: images whose annotation was deleted or cancelled in Label Studio since the last pull.
        boxes: boxes now stored from Label Studio.
        problems: reason → count ("unknown label", "clipped", "no original size", ...).
        details: the first problems, one line each with its task id (all of them are in `problems` counts).
        unmapped: tasks that are not ours (no image id, or an image of another project).
    """

    tasks: int = 0
    labeled: int = 0
    updated: int = 0
    unlabeled_again: int = 0
    boxes: int = 0
    problems: dict[str, int] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)
    unmapped: int = 0

    def summary(self) -> str:
        text = f"{self.labeled} of {self.tasks} tasks labeled; {self.updated} images updated, {self.boxes} boxes"
        if self.unlabeled_again:
            text += f"; {self.unlabeled_again} annotations removed in Label Studio"
        if self.problems:
            text += "; problems: " + ", ".join(f"{count} {reason}" for reason, count in sorted(self.problems.items()))
        return text


MAX_DETAILS = 50


def pull_annotations(session: Session, project: Project, client: LabelStudioClient) -> PullReport:
    """Copies Label Studio's annotations into our store (see the module docstring for what wins).

    Every result that cannot become a box (unknown label, no original size, outside the image, ...) is counted and
    described in the report; a box reaching outside the image is clipped, kept and reported.

    Raises:
        LabelStudioError: Label Studio is down or refuses the token.
        ValueError: the project was never synced.
    """
    row = labeling_project(session, project)
    classes = project_classes(session, project)
    names = [item.name for item in classes]
    class_id_of_index = {item.index: item.id for item in classes}
    end_transaction(session)
    renamed = _renamed_labels(client, row, classes)
    exported = client.export_tasks(row.ls_project_id)
    mapped = {task.ls_task_id: task for task in _task_rows(session, row.ls_project_id)}
    images = {image.id: image for image in session.scalars(select(Image).where(Image.project_id == project.id))}
    report = PullReport()
    problems: Counter[str] = Counter()
    for task in exported:
        report.tasks += 1
        task_id = task.get("id")
        link = mapped.get(task_id) if isinstance(task_id, int) else None
        image = images.get(link.image_id) if link is not None else None
        if link is None or image is None:
            report.unmapped += 1
            continue
        if renamed:
            task = _with_current_names(task, renamed)
        converted = task_boxes(task, names, image_size=(image.width, image.height))
        for problem in converted.problems:
            if problem.reason == "no image id":
                continue  # the map found it; the id is written into the task at the next sync
            problems[problem.reason] += 1
            if len(report.details) < MAX_DETAILS:
                report.details.append(f"task {task.get('id')} (image {image.id}): {problem.detail}")
        if converted.labeled:
            report.labeled += 1
            _replace_ground_truth(session, image, converted.boxes, converted.labels, class_id_of_index)
            image.labeled = True
            link.annotation_id = converted.annotation_id
            report.updated += 1
            report.boxes += len(converted.boxes)
        elif link.annotation_id is not None:
            _replace_ground_truth(session, image, np.zeros((0, 4)), np.zeros(0, dtype=np.int64), class_id_of_index)
            image.labeled = False
            link.annotation_id = None
            report.unlabeled_again += 1
    report.problems = dict(problems)
    session.flush()
    row.last_event = "pull: " + report.summary()
    return report


def _renamed_labels(client: LabelStudioClient, row: LabelingProject, classes: list[Any]) -> dict[str, str]:
    """Old label → the class's current name, for labels of the project's Label Studio config that are no class's name
    now but carry the id of one (a class renamed since its boxes were drawn)."""
    try:
        by_label = config_class_ids(client.get_project(row.ls_project_id).get("label_config") or "")
    except ValueError:  # a config someone broke by hand: names alone, as before
        return {}
    name_of_id = {item.id: item.name for item in classes}
    current = set(name_of_id.values())
    return {
        label: name_of_id[class_id]
        for label, class_id in by_label.items()
        if label not in current and class_id in name_of_id
    }


def _with_current_names(task: dict[str, Any], renamed: dict[str, str]) -> dict[str, Any]:
    """A copy of a task whose box results say the current name where they said a renamed class's old one."""
    task = copy.deepcopy(task)
    for annotation in task.get("annotations") or []:
        for result in (annotation.get("result") if isinstance(annotation, dict) else None) or []:
            value = result.get("value") if isinstance(result, dict) else None
            if not isinstance(value, dict):
                continue
            labels = value.get("rectanglelabels")
            if isinstance(labels, list):
                value["rectanglelabels"] = [
                    renamed.get(label, label) if isinstance(label, str) else label for label in labels
                ]
    return task


def _replace_ground_truth(
    session: Session, image: Image, boxes: np.ndarray, labels: np.ndarray, class_id_of_index: dict[int, int]
) -> None:
    """Replaces the image's ground-truth boxes; `boxes` (N, 4) xyxy original-image pixels, `labels` (N,) indices."""
    session.execute(
        delete(Annotation).where(Annotation.image_id == image.id, Annotation.source.in_(GROUND_TRUTH_SOURCES))
    )
    for (x1, y1, x2, y2), label in zip(np.asarray(boxes).tolist(), np.asarray(labels).tolist()):
        session.add(
            Annotation(
                image_id=image.id,
                class_id=class_id_of_index[int(label)],
                x1=x1,
                y1=y1,
                x2=x2,
                y2=y2,
                source="labelstudio",
            )
        )


def labeled_count(session: Session, project: Project) -> int:
    """Tasks of the project that had a completed annotation at the last pull."""
    row = labeling_project(session, project)
    query = (
        select(func.count())
        .select_from(LabelingTask)
        .where(LabelingTask.ls_project_id == row.ls_project_id, LabelingTask.annotation_id.is_not(None))
    )
    return int(session.scalar(query) or 0)


# ----------------------------------------------------------------------------------------------------------------
# Pre-label and the least-confident-first order
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PrelabelReport:
    """What a pre-label did.

    Attributes:
        model_version: the `model_version` the predictions carry (`yolodex:<run or file name>`).
        tasks: tasks that got a prediction.
        boxes: boxes sent.
        clipped: boxes clipped to their image before sending.
        dropped: boxes not sent, by reason (classes the project does not have, degenerate, ...).
        replaced: earlier yolodex predictions removed (one prediction per task keeps the score sort meaningful).
        seconds: wall time.
    """

    model_version: str
    tasks: int = 0
    boxes: int = 0
    clipped: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    replaced: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        text = f"{self.model_version}: {self.boxes} boxes on {self.tasks} tasks in {self.seconds:.1f} s"
        if self.dropped:
            text += " (not sent: " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items())) + ")"
        return text


def model_version_of(model_path: str | Path) -> str:
    """`yolodex:<run folder>/<file>` for a run's file, so Label Studio shows which model pre-labeled a task."""
    path = Path(model_path)
    name = f"{path.parent.name}/{path.name}" if path.is_file() else path.name
    version = MODEL_VERSION_PREFIX + name
    # The column holds 200 characters (PostgreSQL refuses more): a very long run name keeps its end, which differs.
    return (
        version if len(version) <= 200 else MODEL_VERSION_PREFIX + "…" + version[-(199 - len(MODEL_VERSION_PREFIX)) :]
    )


def prelabel(
    session: Session,
    settings: Settings,
    project: Project,
    client: LabelStudioClient,
    model_path: str | Path,
    *,
    only_unlabeled: bool = True,
    box_threshold: float = DEFAULT_BOX_THRESHOLD,
    uncertainty: str = "least_confident",
    batch_size: int = 8,
    imgsz: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> PrelabelReport:
    """Runs a model on the project's tasks and sends its detections as predictions, with scores and uncertainty.

    Each task's prediction carries `score = 1 - uncertainty` (so Label Studio's "Prediction score" column, and the
    "Least confident first" tab sorting on it ascending, put the least confident first) and each box its own
    score. The model's classes are matched to the project's by name; detections of other classes are not sent.

    Args:
        model_path: a checkpoint, run folder (its best.pt) or yolodex ONNX file.
        only_unlabeled: skip tasks that already have an annotation (the usual case; their labels are the truth).
        box_threshold: detections at or above this score become pre-annotation boxes; lower ones (down to 0.05)
            still count for the uncertainty.
        uncertainty: "least_confident" or "margin" (see `convert.task_uncertainty`).
        on_progress: called with (done, total) after each batch.

    Raises:
        ValueError: the project was never synced, or the model shares no class with it.
        LabelStudioError: Label Studio is down or refuses the token.
    """
    started = time.monotonic()
    row = labeling_project(session, project)
    names = [item.name for item in project_classes(session, project)]
    tasks = _prelabel_tasks(session, row.ls_project_id, only_unlabeled)
    ls_project_id, project_id = row.ls_project_id, row.project_id
    # End the read transaction before the model is loaded and run and Label Studio is called (`end_transaction`):
    # on a SQLite file (WAL) a transaction that read before another connection's commit cannot write any more, and
    # a job's heartbeat and progress commit every few seconds. The results are written at the end, in a transaction
    # whose first statement is a write.
    end_transaction(session)
    predictor, model_file, to_project = _prelabel_model(model_path, imgsz, names, project.name)
    report = PrelabelReport(model_version=model_version_of(model_file))
    sender = _PredictionSender(client, names, to_project, box_threshold, uncertainty, report)
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start : start + batch_size]
        detections = predictor.predict([settings.storage / task.path for task in chunk])
        for task, found in zip(chunk, detections):
            sender.send(task, found)
        if on_progress is not None:
            on_progress(min(start + batch_size, len(tasks)), len(tasks))
    if report.tasks:
        # The labeling view pre-fills a task with the predictions of the project's model version (Label Studio
        # refuses a version it holds no prediction of).
        client.update_project(ls_project_id, model_version=report.model_version)
    report.dropped = {reason: count for reason, count in sender.dropped.items() if count}
    report.seconds = time.monotonic() - started
    _record_prelabel(session, ls_project_id, project_id, sender.uncertainties, model_file, report)
    return report


class _TaskImage(NamedTuple):
    """A task to pre-label and its image (`path` relative to the storage; width and height in pixels)."""

    image_id: int
    task_id: int
    path: str
    width: int
    height: int


def _prelabel_tasks(session: Session, ls_project_id: int, only_unlabeled: bool) -> list[_TaskImage]:
    """The Label Studio project's tasks in image order; with `only_unlabeled`, those not annotated anywhere yet."""
    query = select(LabelingTask, Image).join(Image, Image.id == LabelingTask.image_id)
    query = query.where(LabelingTask.ls_project_id == ls_project_id)
    if only_unlabeled:
        query = query.where(LabelingTask.annotation_id.is_(None), Image.labeled.is_(False))
    return [
        _TaskImage(link.image_id, link.ls_task_id, image.path, image.width, image.height)
        for link, image in session.execute(query.order_by(LabelingTask.image_id))
    ]


def _prelabel_model(
    model_path: str | Path, imgsz: int | None, names: list[str], project_name: str
) -> tuple[Predictor, Path, np.ndarray]:
    """The predictor of `model_path`, its model file, and its class indices mapped to the project's by name
    ((model classes,) int64, -1 for a class the project does not have).

    Raises:
        ValueError: the model shares no class with the project.
    """
    # Imported here: torch (2-3 s) only when pre-labeling runs; the Label page imports this module.
    from backend.inference import Predictor
    from backend.processing import PostprocessConfig
    from backend.training.trainer import run_checkpoint

    path = Path(model_path)
    model_file = path if path.suffix.lower() == ".onnx" else run_checkpoint(path)
    # An ONNX model runs in the faster runtime here ("auto": OpenVINO where it loads; docs/runtimes.md has the
    # pre-labeling times in each); a checkpoint runs in PyTorch.
    postprocess = PostprocessConfig(conf_threshold=UNCERTAINTY_THRESHOLD)
    predictor = Predictor.from_path(model_file, imgsz=imgsz, postprocess=postprocess, runtime="auto")
    project_index = {name: index for index, name in enumerate(names)}
    to_project = np.asarray([project_index.get(name, -1) for name in predictor.class_names], dtype=np.int64)
    if (to_project < 0).all():
        raise ValueError(
            f"{model_file} detects {predictor.class_names}, none of which is a class of {project_name!r} ({names}): "
            "pick a model trained on this project"
        )
    return predictor, model_file, to_project


@dataclass
class _PredictionSender:
    """Sends one model's detections to Label Studio task by task, counting in `report` what it sent and in
    `dropped` what it did not, and keeping each task's uncertainty (by image id)."""

    client: LabelStudioClient
    names: list[str]
    to_project: np.ndarray  # (model classes,) the project's class index of each, -1 for none
    box_threshold: float
    uncertainty: str
    report: PrelabelReport
    dropped: Counter[str] = field(default_factory=Counter)
    uncertainties: dict[int, float] = field(default_factory=dict)

    def send(self, task: _TaskImage, found: Detections) -> None:
        """Replaces the task's earlier yolodex predictions with one of `found` (boxes xyxy original-image pixels)."""
        labels = self.to_project[found.class_ids] if len(found.class_ids) else found.class_ids
        known = labels >= 0
        self.dropped["class not in project"] += int((~known).sum())
        value = task_uncertainty(found.scores[known], self.uncertainty)
        keep = known & (found.scores >= self.box_threshold)
        converted = boxes_to_ls_results(
            found.boxes[keep], labels[keep], found.scores[keep], (task.width, task.height), self.names
        )
        for reason, count in converted.dropped.items():
            self.dropped[reason] += count
        for old in self.client.list_predictions(task.task_id):
            if str(old.get("model_version", "")).startswith(MODEL_VERSION_PREFIX):
                self.client.delete_prediction(old["id"])
                self.report.replaced += 1
        self.client.create_prediction(task.task_id, converted.results, 1.0 - value, self.report.model_version)
        self.uncertainties[task.image_id] = value
        self.report.tasks += 1
        self.report.boxes += len(converted.results)
        self.report.clipped += converted.clipped


def _record_prelabel(
    session: Session,
    ls_project_id: int,
    project_id: int,
    uncertainties: dict[int, float],
    model_file: Path,
    report: PrelabelReport,
) -> None:
    """Stores each task's uncertainty and the model that pre-labeled it, and the project's last model and event."""
    for image_id, value in uncertainties.items():
        session.execute(
            update(LabelingTask)
            .where(LabelingTask.image_id == image_id, LabelingTask.ls_project_id == ls_project_id)
            .values(uncertainty=value, model_version=report.model_version)
        )
    session.execute(
        update(LabelingProject)
        .where(LabelingProject.project_id == project_id)
        .values(last_model=str(model_file), last_event="prelabel: " + report.summary())
    )
    session.flush()


@dataclass(frozen=True)
class QueueItem:
    """One unlabeled image in labeling order."""

    image_id: int
    task_id: int
    uncertainty: float | None
    model_version: str | None


def labeling_queue(session: Session, project: Project, limit: int | None = 50) -> list[QueueItem]:
    """The unlabeled images, most uncertain first; images no model has seen yet come last, oldest first."""
    row = labeling_project(session, project)
    query = (
        select(LabelingTask)
        .join(Image, Image.id == LabelingTask.image_id)
        .where(
            LabelingTask.ls_project_id == row.ls_project_id,
            LabelingTask.annotation_id.is_(None),
            Image.labeled.is_(False),
        )
        .order_by(LabelingTask.uncertainty.is_(None), LabelingTask.uncertainty.desc(), LabelingTask.image_id)
    )
    if limit is not None:
        query = query.limit(limit)
    return [
        QueueItem(task.image_id, task.ls_task_id, task.uncertainty, task.model_version)
        for task in session.scalars(query)
    ]


def task_url(base_url: str, ls_project_id: int, task_id: int) -> str:
    """The labeling view of one task (docs/label_studio.md, Embedding the labeling view)."""
    return f"{base_url.rstrip('/')}/projects/{ls_project_id}/data?task={task_id}"


def task_links(session: Session, image_ids: Iterable[int | None], base_url: str) -> dict[int, str]:
    """{our image id: its Label Studio task URL} for the images that were synced, in one query (None ids skipped)."""
    wanted = sorted({image_id for image_id in image_ids if image_id is not None})
    if not wanted:
        return {}
    rows = session.scalars(select(LabelingTask).where(LabelingTask.image_id.in_(wanted)))
    return {task.image_id: task_url(base_url, task.ls_project_id, task.ls_task_id) for task in rows}
