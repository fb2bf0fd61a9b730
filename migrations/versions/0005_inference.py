"""Inference: the registry of ``lorafleet inference`` servers the API proxies to.

Revision ID: 0005_inference
Revises: 0005_dpo
Create Date: 2025-01-04

- ``inference_servers``: URL, bearer token, device, the base models held, heartbeat. The API
  picks a live server from here (one holding the request's base model when there is one).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_inference"
down_revision: str | None = "0005_dpo"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "inference_servers",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("url", sa.String(length=1024), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("token", sa.String(length=128), nullable=False),
        sa.Column("device", sa.String(length=128), nullable=False),
        sa.Column("base_models", sa.JSON(), nullable=True),
        sa.Column("adapters", sa.Integer(), server_default="0", nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=True),
        sa.Column("last_heartbeat", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inference_servers")),
    )


def downgrade() -> None:
    op.drop_table("inference_servers")
