"""Gangs: multi-node jobs (``resources.nodes``) and the seats of their members.

Revision ID: 0005_gang
Revises: 0004_product
Create Date: 2025-01-04

- ``jobs.nodes``: routing copy of ``spec.resources.nodes`` (the claim query reads it in SQL).
- ``gang_members``: one row per (job, attempt epoch, node slot): which worker holds the seat,
  where it can be reached (slot 0 hosts the rendezvous), how many ranks it runs, and the seat's
  own lease. The database decides membership (``shared.services.gangs``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.models import UTCDateTime

revision: str = "0005_gang"
down_revision: str | None = "0004_product"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("nodes", sa.Integer(), server_default="1", nullable=False))
    op.create_table(
        "gang_members",
        sa.Column("id", BigIntPK, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(255), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("ranks", sa.Integer(), nullable=False),
        sa.Column("joined_at", UTCDateTime(), nullable=False),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=False),
        sa.Column("left_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_gang_members_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gang_members")),
        sa.UniqueConstraint(
            "job_id", "epoch", "slot", name=op.f("uq_gang_members_job_id_epoch_slot")
        ),
        sa.UniqueConstraint(
            "job_id", "epoch", "worker_id", name=op.f("uq_gang_members_job_id_epoch_worker_id")
        ),
    )
    op.create_index(op.f("ix_gang_members_worker_id"), "gang_members", ["worker_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_gang_members_worker_id"), table_name="gang_members")
    op.drop_table("gang_members")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("nodes")
