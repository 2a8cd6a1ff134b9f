"""Initial schema: projects and their classes, images, annotations, dataset versions, runs and model files.

Revision ID: 0001
Revises:
Create Date: 2026-11-28

Written once from `backend.store.models` (autogenerate) and frozen: later model changes get their own revision,
so the check values below stay as they were when this revision was written.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projects")),
        sa.UniqueConstraint("name", name=op.f("uq_projects_name")),
    )
    op.create_table(
        "dataset_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("train_fraction", sa.Float(), nullable=False),
        sa.Column("val_fraction", sa.Float(), nullable=False),
        sa.Column("test_fraction", sa.Float(), nullable=False),
        sa.Column("folder", sa.String(length=1024), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_dataset_versions_project_id_projects"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_versions")),
        sa.UniqueConstraint("project_id", "name", name="uq_dataset_versions_project_name"),
    )
    op.create_index(op.f("ix_dataset_versions_project_id"), "dataset_versions", ["project_id"], unique=False)

    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("phash", sa.String(length=16), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(length=8), nullable=False),
        sa.Column("path", sa.String(length=255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("original_name", sa.Text(), nullable=True),
        sa.Column("source_url", sa.Text(), nullable=True),
        sa.Column("page_url", sa.Text(), nullable=True),
        sa.Column("licence_hint", sa.Text(), nullable=True),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("duplicate_of_id", sa.Integer(), nullable=True),
        sa.Column("near_group", sa.Integer(), nullable=True),
        sa.Column("labeled", sa.Boolean(), nullable=False),
        sa.CheckConstraint("source IN ('upload', 'import', 'crawl', 'synthetic')", name=op.f("ck_images_source")),
        sa.CheckConstraint("status IN ('ok', 'duplicate', 'near_duplicate')", name=op.f("ck_images_status")),
        sa.ForeignKeyConstraint(
            ["duplicate_of_id"], ["images.id"], name=op.f("fk_images_duplicate_of_id_images"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_images_project_id_projects"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("project_id", "sha256", name="uq_images_project_sha256"),
    )
    op.create_index(op.f("ix_images_near_group"), "images", ["near_group"], unique=False)
    op.create_index(op.f("ix_images_project_id"), "images", ["project_id"], unique=False)

    op.create_table(
        "project_classes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("dex_number", sa.Integer(), nullable=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("colour", sa.String(length=7), nullable=True),
        sa.CheckConstraint('"index" >= 0', name=op.f("ck_project_classes_index_not_negative")),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_project_classes_project_id_projects"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_project_classes")),
        sa.UniqueConstraint("project_id", "index", name="uq_project_classes_project_index"),
        sa.UniqueConstraint("project_id", "name", name="uq_project_classes_project_name"),
    )
    op.create_index(op.f("ix_project_classes_project_id"), "project_classes", ["project_id"], unique=False)

    op.create_table(
        "annotations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column("x1", sa.Float(), nullable=False),
        sa.Column("y1", sa.Float(), nullable=False),
        sa.Column("x2", sa.Float(), nullable=False),
        sa.Column("y2", sa.Float(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("source IN ('import', 'labelstudio', 'prediction')", name=op.f("ck_annotations_source")),
        sa.ForeignKeyConstraint(
            ["class_id"],
            ["project_classes.id"],
            name=op.f("fk_annotations_class_id_project_classes"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_annotations_image_id_images"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotations")),
    )
    op.create_index(op.f("ix_annotations_class_id"), "annotations", ["class_id"], unique=False)
    op.create_index(op.f("ix_annotations_image_id"), "annotations", ["image_id"], unique=False)

    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("dataset_version_id", sa.Integer(), nullable=True),
        sa.Column("folder", sa.String(length=1024), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("config", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_version_id"],
            ["dataset_versions.id"],
            name=op.f("fk_runs_dataset_version_id_dataset_versions"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_runs_project_id_projects"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    op.create_index(op.f("ix_runs_project_id"), "runs", ["project_id"], unique=False)

    op.create_table(
        "model_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('fp32', 'int8')", name=op.f("ck_model_files_kind")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_model_files_run_id_runs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_files")),
    )
    op.create_index(op.f("ix_model_files_run_id"), "model_files", ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_model_files_run_id"), table_name="model_files")

    op.drop_table("model_files")
    op.drop_index(op.f("ix_runs_project_id"), table_name="runs")

    op.drop_table("runs")
    op.drop_index(op.f("ix_annotations_image_id"), table_name="annotations")
    op.drop_index(op.f("ix_annotations_class_id"), table_name="annotations")

    op.drop_table("annotations")
    op.drop_index(op.f("ix_project_classes_project_id"), table_name="project_classes")

    op.drop_table("project_classes")
    op.drop_index(op.f("ix_images_project_id"), table_name="images")
    op.drop_index(op.f("ix_images_near_group"), table_name="images")

    op.drop_table("images")
    op.drop_index(op.f("ix_dataset_versions_project_id"), table_name="dataset_versions")

    op.drop_table("dataset_versions")
    op.drop_table("projects")
