"""DPO: the per-step metric series carries DPO's own numbers (train and eval).

Revision ID: 0005_dpo
Revises: 0005_strategy
Create Date: 2025-01-05

``job_metrics`` gains the rewards of the chosen and rejected answers, the reward accuracy and the
reward margin, each for the training step and for the validation pairs (``eval_``), all nullable
(supervised jobs leave them empty). The method itself lives in ``jobs.spec``: no column.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_dpo"
down_revision: str | None = "0005_strategy"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    "rewards_chosen",
    "rewards_rejected",
    "reward_accuracy",
    "reward_margin",
    "eval_rewards_chosen",
    "eval_rewards_rejected",
    "eval_reward_accuracy",
    "eval_reward_margin",
)


def upgrade() -> None:
    with op.batch_alter_table("job_metrics") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_metrics") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
