"""The one writer of ``Job.status``: every state change of a job goes through :func:`transition`.

A transition is ONE conditional UPDATE whose WHERE clause states what must still be true (the
status it leaves, plus whatever the caller adds: still ours, still not cancelled, lease still
expired...). Of two racing writers exactly one sees a row updated; the other sees zero and drops
out. The allowed moves are checked against :data:`shared.states.ALLOWED` before anything runs, so
a transition the state machine does not know is a programming error, never a silent write.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, update
from sqlalchemy.orm import Session

from shared.models import Job, JobEvent, utcnow
from shared.states import ALLOWED, JobStatus


class IllegalTransition(ValueError):
    """A caller asked for a move ``shared.states.ALLOWED`` does not contain (a bug, not a race)."""


def rowcount(session: Session, stmt: Any) -> int:
    """Run a bulk UPDATE/DELETE and say how many rows it touched (the conditional-write idiom)."""
    result = cast(
        CursorResult[Any], session.execute(stmt.execution_options(synchronize_session=False))
    )
    return result.rowcount


def transition(
    session: Session,
    job_id: str,
    from_: JobStatus | Iterable[JobStatus],
    to: JobStatus,
    *,
    where: Iterable[ColumnElement[bool]] = (),
    event: tuple[str, str] | None = None,
    event_data: dict[str, Any] | None = None,
    **values: Any,
) -> bool:
    """Move ``job_id`` from ``from_`` (one status or several) to ``to``; commit; True if it moved.

    ``where`` adds conditions that must also hold (e.g. ``Job.worker_id == me``); ``values`` are
    the other columns to set in the same UPDATE (``status`` and ``updated_at`` are set here).
    ``event`` is ``(level, message)``, written in the same transaction as the move, so a job's
    history never shows a change that did not happen nor misses one that did. Returns False
    (after a rollback) when the row no longer matches: someone else moved it first.
    """
    sources = (from_,) if isinstance(from_, JobStatus) else tuple(from_)
    if not sources:
        raise IllegalTransition("transition needs at least one source status")
    for source in sources:
        if to not in ALLOWED[source]:
            raise IllegalTransition(f"job cannot go from {source} to {to}")
    if "status" in values:
        raise IllegalTransition("status is set by transition itself")
    now = values.pop("updated_at", None) or utcnow()
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_([s.value for s in sources]), *where)
        .values(status=to.value, updated_at=now, **values)
    )
    if not rowcount(session, stmt):
        session.rollback()
        return False
    if event is not None:
        level, message = event
        session.add(
            JobEvent(job_id=job_id, level=level, message=message, data=event_data, created_at=now)
        )
    session.commit()
    return True
