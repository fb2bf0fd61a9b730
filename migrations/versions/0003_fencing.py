"""Fencing: ``jobs.lease_epoch`` (one more at every claim) and the attempt of each checkpoint;
devices a worker owns (``workers.gpu_uuids``) and their live use (``workers.gpu_stats``).

Revision ID: 0003_fencing
Revises: 0002
Create Date: 2025-01-03

``attempts`` cannot fence a stale worker's writes: releasing a job hands its attempt back, so two
claims can carry the same count. ``lease_epoch`` only grows; every write of an attempt is
conditional on (worker_id, lease_epoch, status running). A checkpoint row records the epoch and
worker that committed it, so a late upload of an older attempt can never be taken for it.
A worker registers the UUIDs of its GPUs, and a second live worker claiming one of them is
refused; its heartbeat carries the devices' memory in use and utilisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_fencing"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_epoch", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("epoch", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("worker_id", sa.String(255), nullable=True))
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("gpu_uuids", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("gpu_stats", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("gpu_stats")
        batch.drop_column("gpu_uuids")
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("worker_id")
        batch.drop_column("epoch")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_epoch")
