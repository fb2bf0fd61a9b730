"""Queries only the OpenAI facade needs: its event feed and cursor pages of checkpoints.

OpenAI's job events are one feed, newest first, mixing history lines with per-step ``metrics``
events. lorafleet keeps those in two tables (``job_events`` and ``job_metrics``, the latter
upserted per step), so the feed is a merge of both, ordered by the key (created_at, kind, id).
The cursor is the last event id of the previous page (``ftevent-N`` / ``ftmetric-N``): its row
gives the key, and each table is asked only for rows strictly below it, then merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from shared.errors import InvalidInput
from shared.models import Checkpoint, Job, JobEvent, JobMetric
from shared.services.jobs import get_job, list_checkpoints

EVENT_PREFIX = "ftevent-"
METRIC_PREFIX = "ftmetric-"
CHECKPOINT_PREFIX = "ftckpt-"
# Tie-break between the two tables at the same instant: metrics sort above messages.
_RANK = {"message": 0, "metrics": 1}


@dataclass(frozen=True)
class FeedItem:
    """One entry of the merged feed: a history line or a metric point."""

    kind: str  # "message" | "metrics"
    row: JobEvent | JobMetric

    @property
    def key(self) -> tuple[datetime, int, int]:
        return (self.row.created_at, _RANK[self.kind], self.row.id)


def _cursor(session: Session, job_id: str, after: str) -> tuple[datetime, int, int]:
    for prefix, kind, model in (
        (EVENT_PREFIX, "message", JobEvent),
        (METRIC_PREFIX, "metrics", JobMetric),
    ):
        number = after.removeprefix(prefix)
        if after.startswith(prefix) and number.isdigit():
            row: Any = session.get(model, int(number))
            if row is not None and row.job_id == job_id:
                return FeedItem(kind, row).key
    raise InvalidInput(f"after {after!r} names no event of this job", param="after")


def _below(model: Any, kind: str, key: tuple[datetime, int, int]) -> Any:
    """Rows of one table whose feed key is strictly below ``key``."""
    at, rank, row_id = key
    mine = _RANK[kind]
    if mine < rank:
        return model.created_at <= at
    if mine > rank:
        return model.created_at < at
    return or_(model.created_at < at, and_(model.created_at == at, model.id < row_id))


def event_feed(
    session: Session, owner: str, job_id: str, after: str | None = None, limit: int = 20
) -> tuple[Job, list[FeedItem], bool]:
    """A page of the job's merged feed, newest first; returns (job, items, has_more)."""
    job = get_job(session, owner, job_id)
    key = _cursor(session, job_id, after) if after else None
    items: list[FeedItem] = []
    sources: tuple[tuple[str, Any], ...] = (("message", JobEvent), ("metrics", JobMetric))
    for kind, model in sources:
        query = select(model).where(model.job_id == job_id)
        if key is not None:
            query = query.where(_below(model, kind, key))
        query = query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
        items.extend(FeedItem(kind, row) for row in session.scalars(query))
    items.sort(key=lambda item: item.key, reverse=True)
    return job, items[:limit], len(items) > limit


def checkpoint_page(
    session: Session, owner: str, job_id: str, after: str | None = None, limit: int = 10
) -> tuple[Job, list[Checkpoint], bool]:
    """The job's checkpoints newest first, after the cursor ``ftckpt-N``.

    A job keeps only a few checkpoints (``checkpoints_keep``), so paging in memory is fine.
    """
    job = get_job(session, owner, job_id)
    rows = sorted(list_checkpoints(session, owner, job_id), key=lambda r: r.step, reverse=True)
    if after:
        ids = [f"{CHECKPOINT_PREFIX}{r.id}" for r in rows]
        if after not in ids:
            raise InvalidInput(f"after {after!r} names no checkpoint of this job", param="after")
        rows = rows[ids.index(after) + 1 :]
    return job, rows[:limit], len(rows) > limit
