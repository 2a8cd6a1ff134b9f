"""Label Studio: the synced project and its active-learning loop, and the image → task map.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "labeling_projects",
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("ls_project_id", sa.Integer(), nullable=False),
        sa.Column("ls_storage_id", sa.Integer(), nullable=True),
        sa.Column("ls_view_id", sa.Integer(), nullable=True),
        sa.Column("retrain_every", sa.Integer(), nullable=False),
        sa.Column("annotations_at_retrain", sa.Integer(), nullable=False),
        sa.Column("loop_state", sa.String(length=16), nullable=False),
        sa.Column("loop_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("loop_settings", sa.JSON(), nullable=True),
        sa.Column("last_model", sa.Text(), nullable=True),
        sa.Column("last_event", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("loop_state IN ('idle', 'queued', 'running')", name=op.f("ck_labeling_projects_loop_state")),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_labeling_projects_project_id_projects"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("project_id", name=op.f("pk_labeling_projects")),
    )
    op.create_table(
        "labeling_tasks",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("ls_project_id", sa.Integer(), nullable=False),
        sa.Column("ls_task_id", sa.Integer(), nullable=False),
        sa.Column("annotation_id", sa.Integer(), nullable=True),
        sa.Column("uncertainty", sa.Float(), nullable=True),
        sa.Column("model_version", sa.String(length=200), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_labeling_tasks_image_id_images"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_labeling_tasks")),
        sa.UniqueConstraint("ls_project_id", "ls_task_id", name="uq_labeling_tasks_project_task"),
    )


def downgrade() -> None:
    op.drop_table("labeling_tasks")
    op.drop_table("labeling_projects")
