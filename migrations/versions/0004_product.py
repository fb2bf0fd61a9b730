"""Product: workers report host memory, jobs keep a tombstone when deleted, files dedupe by sha256.

Revision ID: 0004_product
Revises: 0003_fencing
Create Date: 2025-01-03

- ``workers.host_memory_bytes``: a CPU worker's RAM (or cgroup limit), so submission can refuse a
  job whose estimate exceeds the largest worker's memory, as it does for GPU memory.
- ``jobs.deleted_at``: ``DELETE /jobs/{id}`` removes a final job's artifacts from storage and
  keeps the row as a tombstone (its id is never reused; events and webhooks naming it resolve).
- index ``files(owner, sha256)``: an identical re-upload by the same owner returns the stored file.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_product"
down_revision: str | None = "0003_fencing"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("host_memory_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("files") as batch:
        batch.create_index(batch.f("ix_files_owner_sha256"), ["owner", "sha256"])


def downgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.drop_index(batch.f("ix_files_owner_sha256"))
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("deleted_at")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("host_memory_bytes")
