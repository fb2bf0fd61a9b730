"""Strategy: the parallel strategy a job's latest run trains with.

Revision ID: 0005_strategy
Revises: 0005_gang
Create Date: 2025-01-04

- ``jobs.strategy``: ``ddp`` or ``fsdp``, what ``training.strategy`` (``auto`` by default)
  resolved to when the run started on its worker; null until a run starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_strategy"
down_revision: str | None = "0005_gang"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("strategy", sa.String(length=8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("strategy")
