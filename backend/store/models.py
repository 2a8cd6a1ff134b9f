"""The metadata schema (SQLAlchemy 2 typed declarative). Alembic scripts in `migrations/` create it; a change here
needs a new migration (`alembic revision --autogenerate` with `backend.store.db.alembic_config()`).

Boxes (`Annotation.x1..y2`) are xyxy in original-image pixels *after EXIF orientation*, i.e. in the
`Image.width` x `Image.height` space that `backend.processing.load_image` returns; x2/y2 are the right/bottom
pixel edges. Only portable column types and constraints are used, so the same models serve SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

IMAGE_SOURCES = ("upload", "import", "crawl", "synthetic")
IMAGE_STATUSES = ("ok", "duplicate", "near_duplicate")
ANNOTATION_SOURCES = ("import", "labelstudio", "prediction")
# Annotations a person made or confirmed: what a dataset version freezes (predictions are only suggestions).
GROUND_TRUTH_SOURCES = ("import", "labelstudio")
MODEL_KINDS = ("fp32", "int8")
LOOP_STATES = ("idle", "queued", "running")
JOB_KINDS = (
    "import",
    "crawl",
    "labeling_sync",
    "labeling_prelabel",
    "labeling_retrain",
    "train",
    "evaluate",
    "quantize",
)
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")

# Deterministic constraint names: Alembic needs names to alter constraints later (and SQLite batch mode too).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utc_now() -> datetime:
    return datetime.now(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(value) for value in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)

    classes: Mapped[list[ProjectClass]] = relationship(
        back_populates="project", order_by="ProjectClass.index", cascade="all, delete-orphan", passive_deletes=True
    )


class ProjectClass(Base):
    """One class of a project and its Pokédex entry; `index` is the contiguous label 0..C-1 (category id index+1)."""

    __tablename__ = "project_classes"
    __table_args__ = (
        UniqueConstraint("project_id", "index", name="uq_project_classes_project_index"),
        UniqueConstraint("project_id", "name", name="uq_project_classes_project_name"),
        CheckConstraint('"index" >= 0', name="index_not_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    dex_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    description: Mapped[str] = mapped_column(Text, default="")
    colour: Mapped[str | None] = mapped_column(String(7), nullable=True)  # "#rrggbb"

    project: Mapped[Project] = relationship(back_populates="classes")


class Image(Base):
    """One stored image. `path` is relative to the storage folder; width/height are after EXIF orientation.

    `near_group` is the id of the first image of its near-duplicate group (None when it has no near duplicate);
    `duplicate_of_id` names the closest earlier image for a "near_duplicate". `labeled` is True once a person (or a
    labeled import) has said which boxes the image holds, so an image with no boxes is a true background image.
    """

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("project_id", "sha256", name="uq_images_project_sha256"),
        CheckConstraint(_in("source", IMAGE_SOURCES), name="source"),
        CheckConstraint(_in("status", IMAGE_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    phash: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(16))
    original_name: Mapped[str | None] = mapped_column(Text, nullable=True)
    source_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    page_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    licence_hint: Mapped[str | None] = mapped_column(Text, nullable=True)
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    status: Mapped[str] = mapped_column(String(16), default="ok")
    duplicate_of_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"), nullable=True)
    near_group: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    labeled: Mapped[bool] = mapped_column(default=False)

    annotations: Mapped[list[Annotation]] = relationship(
        back_populates="image", cascade="all, delete-orphan", passive_deletes=True
    )


class Annotation(Base):
    """One box: xyxy in original-image pixels after EXIF orientation (see the module docstring)."""

    __tablename__ = "annotations"
    __table_args__ = (CheckConstraint(_in("source", ANNOTATION_SOURCES), name="source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    class_id: Mapped[int] = mapped_column(ForeignKey("project_classes.id", ondelete="RESTRICT"), index=True)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(16))
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)

    image: Mapped[Image] = relationship(back_populates="annotations")
    project_class: Mapped[ProjectClass] = relationship()


class DatasetVersion(Base):
    """A frozen dataset: `folder` (relative to storage) holds images/, train.json, val.json[, test.json]."""

    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_dataset_versions_project_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    seed: Mapped[int] = mapped_column(Integer)
    train_fraction: Mapped[float] = mapped_column(Float)
    val_fraction: Mapped[float] = mapped_column(Float)
    test_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    folder: Mapped[str] = mapped_column(String(1024))
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Run(Base):
    """A training run (filled in by the training job): `folder` is the run folder, relative to storage."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    dataset_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("dataset_versions.id", ondelete="SET NULL"), nullable=True
    )
    folder: Mapped[str] = mapped_column(String(1024))
    status: Mapped[str] = mapped_column(String(32), default="queued")
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class ModelFile(Base):
    """An exported model of a run (filled in by the export/quantize jobs): `path` relative to storage."""

    __tablename__ = "model_files"
    __table_args__ = (CheckConstraint(_in("kind", MODEL_KINDS), name="kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(1024))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class LabelingProject(Base):
    """The Label Studio side of a project, and its active-learning loop (one row per synced project).

    `loop_state` is "idle", "queued" or "running": a retrain is claimed by moving it from "idle" in one UPDATE, so
    two pollers can never start two retrains. `annotations_at_retrain` is how many tasks were labeled in Label
    Studio when the last retrain was queued; the next one starts at that count + `retrain_every`.
    """

    __tablename__ = "labeling_projects"
    __table_args__ = (CheckConstraint(_in("loop_state", LOOP_STATES), name="loop_state"),)

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    ls_project_id: Mapped[int] = mapped_column(Integer)
    ls_storage_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ls_view_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # 0: the loop is off. Off until the user turns it on: a loop that trains unasked surprises people.
    retrain_every: Mapped[int] = mapped_column(Integer, default=0)
    annotations_at_retrain: Mapped[int] = mapped_column(Integer, default=0)
    loop_state: Mapped[str] = mapped_column(String(16), default="idle")
    loop_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    loop_settings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    last_model: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_event: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, onupdate=utc_now)


class LabelingTask(Base):
    """Our image ↔ its Label Studio task, with what we last learned about it (the image→task map)."""

    __tablename__ = "labeling_tasks"
    __table_args__ = (UniqueConstraint("ls_project_id", "ls_task_id", name="uq_labeling_tasks_project_task"),)

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    ls_project_id: Mapped[int] = mapped_column(Integer)
    ls_task_id: Mapped[int] = mapped_column(Integer)
    annotation_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the annotation last pulled
    uncertainty: Mapped[float | None] = mapped_column(Float, nullable=True)  # of the last pre-label, in [0, 1]
    model_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, onupdate=utc_now)


class Job(Base):
    """One background job (`backend.jobs`): what it runs, where it stands, and how it ended.

    `state` moves queued → running → succeeded | failed | cancelled | interrupted, or queued → cancelled; a
    terminal state is never left (a resumed training is a new job, `resumed_from_id` pointing back). The worker
    writes progress in short, throttled transactions; `log_tail` holds the job's last log lines (a JSON list).
    `worker_host`/`worker_pid` name the process running it, so a restarted worker can tell a dead one's jobs;
    `heartbeat_at` is refreshed every few seconds by that process, so any reader on any machine can tell a job whose
    worker died (`backend.jobs.api.interrupt_stale_jobs`).
    """

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("kind", JOB_KINDS), name="kind"),
        CheckConstraint(_in("state", JOB_STATES), name="state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    project: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[float | None] = mapped_column(Float, nullable=True)  # 0..1
    eta_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    log_tail: Mapped[list[str]] = mapped_column(JSON, default=list)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    traceback: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    task_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the huey task's id (for revoke)
    worker_host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    worker_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    resumed_from_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, onupdate=utc_now)


class JobMetric(Base):
    """One event a job reported (a training "step", "epoch", "eval", a quantize "stage"...), in order (`seq` 1..n)."""

    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_metrics_job_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    event: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


# ----------------------------------------------------------------------------------------------------------------
# Small helpers every caller needs
# ----------------------------------------------------------------------------------------------------------------


# Project and class names are String(200): PostgreSQL refuses longer values where SQLite would keep them, so both
# backends check them here with one message.
NAME_MAX_CHARS = 200


def _checked_name(name: str, what: str) -> str:
    name = name.strip()
    if not name:
        raise ValueError(f"a {what} needs a name")
    if len(name) > NAME_MAX_CHARS:
        raise ValueError(f"a {what} name has at most {NAME_MAX_CHARS} characters; {name[:40]!r}... has {len(name)}")
    return name


def get_or_create_project(session: Session, name: str) -> Project:
    """The project called `name`, created (and flushed, so it has an id) when missing."""
    name = _checked_name(name, "project")
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def ensure_class(
    session: Session,
    project: Project,
    name: str,
    *,
    dex_number: int | None = None,
    description: str = "",
    colour: str | None = None,
) -> tuple[ProjectClass, bool]:
    """The project's class called `name`, appended with the next index (keeping 0..C-1 contiguous) when missing.

    Returns:
        (the class, whether it was added).
    """
    name = _checked_name(name, "class")
    existing = session.scalar(
        select(ProjectClass).where(ProjectClass.project_id == project.id, ProjectClass.name == name)
    )
    if existing is not None:
        return existing, False
    count = session.scalar(select(func.count()).select_from(ProjectClass).where(ProjectClass.project_id == project.id))
    added = ProjectClass(
        project_id=project.id,
        index=int(count or 0),
        name=name,
        dex_number=dex_number,
        description=description,
        colour=colour,
    )
    session.add(added)
    session.flush()
    return added, True


def project_classes(session: Session, project: Project) -> list[ProjectClass]:
    """The project's classes in index order (index i is label i, COCO category id i + 1)."""
    return list(
        session.scalars(select(ProjectClass).where(ProjectClass.project_id == project.id).order_by(ProjectClass.index))
    )
