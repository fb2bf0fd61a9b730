"""The worker-side service: claims, leases, recovery, progress, artifacts."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from shared.db import session_factory
from shared.models import Job, utcnow
from shared.services import jobs, runs


def test_claim_only_once(session: Session, make_job: Callable[..., Any]) -> None:
    job = make_job()
    first = runs.claim_job(session, job.id, "w1", 30)
    assert first is not None and first.status == "running" and first.attempts == 1
    assert first.worker_id == "w1" and first.started_at is not None
    assert runs.claim_job(session, job.id, "w2", 30) is None


def test_concurrent_claims_one_winner(session: Session, make_job: Callable[..., Any]) -> None:
    for _ in range(3):
        job = make_job()
        barrier = threading.Barrier(4)
        winners: list[str] = []

        def claim(
            worker: str,
            job_id: str = job.id,
            barrier: threading.Barrier = barrier,
            winners: list[str] = winners,
        ) -> None:
            with session_factory()() as own:
                barrier.wait()
                if runs.claim_job(own, job_id, worker, 30) is not None:
                    winners.append(worker)

        threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(winners) == 1
        assert jobs.get_job(session, "alice", job.id).worker_id == winners[0]


def test_lease_renewal_and_finish_are_ours_only(
    session: Session, make_job: Callable[..., Any]
) -> None:
    job = make_job()
    runs.claim_job(session, job.id, "w1", 30)
    assert runs.renew_lease(session, job.id, "w1", 30)
    assert not runs.renew_lease(session, job.id, "w2", 30)
    assert not runs.finish_job(session, job.id, "w2", "failed", error_code="x")
    assert runs.finish_job(
        session,
        job.id,
        "w1",
        "succeeded",
        adapter_key="adapters/x.tar.gz",
        adapter_sha256="ab" * 32,
        adapter_bytes=10,
        manifest={"steps": 2},
        trained_tokens=123,
    )
    done = jobs.get_job(session, "alice", job.id)
    assert (done.status, done.trained_tokens, done.adapter_bytes) == ("succeeded", 123, 10)
    assert not runs.renew_lease(session, job.id, "w1", 30)
    assert not runs.finish_job(session, job.id, "w1", "failed")
    assert jobs.list_events(session, "alice", job.id)[-1].message == "job succeeded"


def _expire(session: Session, job_id: str) -> None:
    job = session.get(Job, job_id)
    assert job is not None
    job.lease_expires_at = utcnow() - timedelta(seconds=5)
    session.commit()


def test_reap_requeues_then_fails(session: Session, make_job: Callable[..., Any]) -> None:
    job = make_job(max_attempts=2)
    runs.claim_job(session, job.id, "w1", 30)
    assert runs.reap_expired(session) == []  # lease still valid
    _expire(session, job.id)
    assert runs.reap_expired(session) == [(job.id, "queued")]
    requeued = jobs.get_job(session, "alice", job.id)
    assert requeued.status == "queued" and requeued.worker_id is None
    messages = [e.message for e in jobs.list_events(session, "alice", job.id)]
    assert "worker lost; requeued (attempt 1 of 2)" in messages

    again = runs.claim_job(session, job.id, "w2", 30)
    assert again is not None and again.attempts == 2
    _expire(session, job.id)
    assert runs.reap_expired(session) == [(job.id, "failed")]
    failed = jobs.get_job(session, "alice", job.id)
    assert failed.status == "failed" and failed.error_code == "max_attempts_exceeded"
    assert "max attempts" in (failed.error_message or "")


def test_reap_cancel_requested(session: Session, make_job: Callable[..., Any]) -> None:
    job = make_job()
    runs.claim_job(session, job.id, "w1", 30)
    jobs.cancel_job(session, "alice", job.id)
    _expire(session, job.id)
    assert runs.reap_expired(session) == [(job.id, "cancelled")]


def test_stale_queued_touches_once(session: Session, make_job: Callable[..., Any]) -> None:
    job = make_job()
    later = utcnow() + timedelta(seconds=120)
    assert [j.id for j in runs.stale_queued(session, 60, now=later)] == [job.id]
    assert runs.stale_queued(session, 60, now=later) == []  # touched: not republished twice
    assert runs.stale_queued(session, later - timedelta(seconds=1)) == []


def test_progress_metrics_checkpoints(session: Session, make_job: Callable[..., Any]) -> None:
    job = make_job()
    runs.claim_job(session, job.id, "w1", 30)
    runs.record_progress(session, job.id, {"step": 3, "total_steps": 10, "train_loss": 1.5})
    progress = jobs.get_progress(session, "alice", job.id)
    assert progress["step"] == 3 and progress["status"] == "running" and progress["updated_at"]
    runs.add_metrics(session, job.id, [{"step": 1, "train_loss": 2.0}, {"step": 2}])
    runs.add_metrics(session, job.id, [{"step": 2, "train_loss": 1.0}, {"step": 3}])
    series = jobs.list_metrics(session, "alice", job.id)
    assert [(m.step, m.train_loss) for m in series] == [(1, 2.0), (2, 1.0), (3, None)]
    for step in (5, 10, 15):
        runs.record_checkpoint(session, job.id, step, f"ckpt/{step}/", "s", {"loss": 1})
    runs.record_checkpoint(session, job.id, 15, "ckpt/15b/", "s2", None)
    latest = runs.latest_checkpoint(session, job.id)
    assert latest is not None and (latest.step, latest.storage_key) == (15, "ckpt/15b/")
    assert runs.prune_checkpoints(session, job.id, 2) == ["ckpt/5/"]
    assert [c.step for c in jobs.list_checkpoints(session, "alice", job.id)] == [10, 15]
