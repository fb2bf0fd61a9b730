"""Job routing columns: ``jobs.gpus_required`` and ``jobs.gpu_type`` (copies of spec.resources).

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02

The claim query (``runs.claim_next``) filters queued jobs by what a worker can run; reading the
JSON spec of every queued job in Python would not scale, so the two fields become columns. Jobs
already in the table are backfilled from their spec, so a queued job keeps its constraints across
the upgrade.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_jobs = sa.table(
    "jobs",
    sa.column("id", sa.String),
    sa.column("spec", sa.JSON),
    sa.column("gpus_required", sa.Integer),
    sa.column("gpu_type", sa.String),
)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("gpus_required", sa.Integer(), server_default="0", nullable=False)
        )
        batch.add_column(sa.Column("gpu_type", sa.String(64), nullable=True))
        batch.create_index(batch.f("ix_jobs_status_gpus_required"), ["status", "gpus_required"])
    connection = op.get_bind()
    rows = connection.execute(sa.select(_jobs.c.id, _jobs.c.spec)).all()
    for job_id, spec in rows:
        resources = (spec or {}).get("resources") or {}
        gpus = resources.get("gpus", "all")
        gpu_type = resources.get("gpu_type")
        if (isinstance(gpus, int) and gpus > 0) or gpu_type:
            connection.execute(
                _jobs.update()
                .where(_jobs.c.id == job_id)
                .values(gpus_required=gpus if isinstance(gpus, int) else 0, gpu_type=gpu_type)
            )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index(batch.f("ix_jobs_status_gpus_required"))
        batch.drop_column("gpu_type")
        batch.drop_column("gpus_required")
