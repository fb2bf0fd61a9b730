"""``transition`` is the only writer of ``Job.status``: checked moves, one winner, no lost job.

The property test drives one job through random interleavings of what the real actors do (workers
claiming, finishing and draining; a user cancelling; reapers requeueing), each actor on its own
database session, and checks after every operation that the status moved only along
``shared.states.ALLOWED`` and that the job is never stranded (a queued job is claimable, a
running one has an owner and a lease the reaper can expire).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.db import session_factory
from shared.models import Job, JobEvent, utcnow
from shared.services import jobs, runs
from shared.services.transitions import IllegalTransition, transition
from shared.states import ALLOWED, CANCELLED, FINAL, QUEUED, RUNNING, SUCCEEDED, JobStatus

WORKERS = ("w0", "w1", "w2")
OPS = st.lists(
    st.tuples(
        st.sampled_from(["claim", "finish", "fail", "cancel", "expire_and_reap", "release"]),
        st.sampled_from(WORKERS),
    ),
    min_size=1,
    max_size=14,
)


def _lease(session: Session, job_id: str, worker: str) -> runs.Lease:
    """The worker's view of its lease: its id with the newest epoch (stale or not)."""
    row = session.get(Job, job_id, populate_existing=True)
    session.rollback()
    assert row is not None
    return runs.Lease(job_id, worker, row.lease_epoch)


def test_refuses_moves_outside_allowed(session: Session, make_job: Callable[..., Any]) -> None:
    job = make_job()
    with pytest.raises(IllegalTransition):
        transition(session, job.id, QUEUED, SUCCEEDED)
    with pytest.raises(IllegalTransition):
        transition(session, job.id, SUCCEEDED, RUNNING)
    with pytest.raises(IllegalTransition):
        transition(session, job.id, RUNNING, QUEUED, status="failed")
    assert jobs.get_job(session, "alice", job.id).status == "queued"


def test_event_is_written_with_the_move_only(
    session: Session, make_job: Callable[..., Any]
) -> None:
    job = make_job()
    assert transition(session, job.id, QUEUED, RUNNING, event=("info", "moved"), worker_id="w")
    assert not transition(session, job.id, QUEUED, RUNNING, event=("info", "moved twice"))
    messages = [e.message for e in jobs.events_after(session, job.id, 0)]
    assert "moved" in messages and "moved twice" not in messages


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_random_interleavings_stay_in_allowed(
    session: Session, make_job: Callable[..., Any], ops: list[tuple[str, str]]
) -> None:
    owner = f"prop-{secrets.token_hex(4)}"  # a fresh owner per example: the quota stays clear
    job_id = make_job(owner=owner).id
    sessions = {w: session_factory()() for w in WORKERS}
    observer = session_factory()()
    try:
        previous = JobStatus(observer.get(Job, job_id, populate_existing=True).status)  # type: ignore[union-attr]
        for op, worker in ops:
            own = sessions[worker]
            if op == "claim":
                runs.claim_job(own, job_id, worker, 30)
            elif op == "finish":
                runs.finish_job(own, _lease(own, job_id, worker), "succeeded", trained_tokens=1)
            elif op == "fail":
                runs.finish_job(own, _lease(own, job_id, worker), "failed", error_code="x")
            elif op == "cancel":
                try:
                    jobs.cancel_job(own, owner, job_id)
                except Exception as exc:  # a final job refuses: that is the contract
                    assert "already" in str(exc)
            elif op == "expire_and_reap":
                own.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == RUNNING.value)
                    .values(lease_expires_at=utcnow() - timedelta(seconds=1))
                )
                own.commit()
                runs.reap_expired(own)
            elif op == "release":
                runs.release_job(own, _lease(own, job_id, worker), 3)
            row = observer.get(Job, job_id, populate_existing=True)
            observer.rollback()
            assert row is not None, "the job vanished"
            status = JobStatus(row.status)
            assert status == previous or status in ALLOWED[previous], (previous, status, op)
            if status == RUNNING:
                assert row.worker_id and row.lease_expires_at is not None, "running without owner"
            if status == QUEUED:
                assert row.worker_id is None and not row.cancel_requested, "queued but stuck"
            if status in FINAL:
                assert row.finished_at is not None and row.lease_expires_at is None
            if status == CANCELLED:
                assert row.cancel_requested
            assert 0 <= row.attempts <= len(ops)
            previous = status
        moves = observer.query(JobEvent).filter(JobEvent.job_id == job_id).count()
        assert moves >= 1
    finally:
        observer.close()
        for own in sessions.values():
            own.close()
