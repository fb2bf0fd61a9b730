"""The worker-side service: claims, leases, recovery, progress, artifacts."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session

from shared.db import session_factory
from shared.models import Job, utcnow
from shared.services import jobs, runs
from shared.services.runs import Lease, LeaseLost


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
    lease = Lease.of(runs.claim_job(session, job.id, "w1", 30))  # type: ignore[arg-type]
    assert lease.epoch == 1
    other = Lease(job.id, "w2", lease.epoch)
    assert runs.renew_lease(session, lease, 30)
    assert not runs.renew_lease(session, other, 30)
    assert not runs.finish_job(session, other, "failed", error_code="x")
    assert runs.finish_job(
        session,
        lease,
        "succeeded",
        adapter_key="adapters/x.tar.gz",
        adapter_sha256="ab" * 32,
        adapter_bytes=10,
        manifest={"steps": 2},
        trained_tokens=123,
    )
    done = jobs.get_job(session, "alice", job.id)
    assert (done.status, done.trained_tokens, done.adapter_bytes) == ("succeeded", 123, 10)
    assert not runs.renew_lease(session, lease, 30)
    assert not runs.finish_job(session, lease, "failed")
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
    lease = Lease.of(runs.claim_job(session, job.id, "w1", 30))  # type: ignore[arg-type]
    runs.record_progress(session, lease, {"step": 3, "total_steps": 10, "train_loss": 1.5})
    progress = jobs.get_progress(session, "alice", job.id)
    assert progress["step"] == 3 and progress["status"] == "running" and progress["updated_at"]
    runs.add_metrics(session, lease, [{"step": 1, "train_loss": 2.0}, {"step": 2}])
    runs.add_metrics(session, lease, [{"step": 2, "train_loss": 1.0}, {"step": 3}])
    series = jobs.list_metrics(session, "alice", job.id)
    assert [(m.step, m.train_loss) for m in series] == [(1, 2.0), (2, 1.0), (3, None)]
    for step in (5, 10, 15):
        runs.record_checkpoint(session, lease, step, f"ckpt/{step}/", "s", {"loss": 1})
    runs.record_checkpoint(session, lease, 15, "ckpt/15b/", "s2", None)
    latest = runs.committed_checkpoints(session, job.id)[0]
    assert (latest.step, latest.storage_key, latest.epoch) == (15, "ckpt/15b/", 1)
    assert runs.prune_checkpoints(session, lease, 2) == ["ckpt/5/"]
    assert [c.step for c in jobs.list_checkpoints(session, "alice", job.id)] == [10, 15]


def test_every_write_of_a_stale_attempt_is_fenced(
    session: Session, make_job: Callable[..., Any]
) -> None:
    """A frozen worker's attempt (epoch 1) thaws after the job was requeued and re-claimed
    by the SAME worker id (epoch 2): attempts alone could not tell them apart, the epoch does."""
    job = make_job()
    stale = Lease.of(runs.claim_job(session, job.id, "w1", 30))  # type: ignore[arg-type]
    assert runs.release_job(session, stale, 3)  # attempts goes back to 0...
    live = Lease.of(runs.claim_job(session, job.id, "w1", 30))  # type: ignore[arg-type]
    assert (stale.epoch, live.epoch) == (1, 2)
    assert jobs.get_job(session, "alice", job.id).attempts == 1  # ...so attempts repeats
    assert not runs.renew_lease(session, stale, 30)
    for write in (
        lambda: runs.record_progress(session, stale, {"step": 99}),
        lambda: runs.add_event(session, stale, "info", "from the past"),
        lambda: runs.add_metrics(session, stale, [{"step": 99, "train_loss": 9.0}]),
        lambda: runs.record_checkpoint(session, stale, 99, "k/", "sha", None),
        lambda: runs.prune_checkpoints(session, stale, 1),
    ):
        with pytest.raises(LeaseLost):
            write()
    assert not runs.finish_job(session, stale, "failed", error_code="stale")
    assert not runs.release_job(session, stale, 1)
    assert runs.retry_job(session, stale, "rank_killed", "x") is None
    row = jobs.get_job(session, "alice", job.id)
    assert (row.status, row.worker_id, row.lease_epoch, row.progress) == ("running", "w1", 2, None)
    assert runs.committed_checkpoints(session, job.id) == []
    messages = [e.message for e in jobs.list_events(session, "alice", job.id)]
    assert "from the past" not in messages
    runs.add_event(session, live, "info", "live")
    assert runs.finish_job(session, live, "succeeded")


def test_retry_requeues_with_the_cause_then_fails(
    session: Session, make_job: Callable[..., Any]
) -> None:
    job = make_job(max_attempts=2)
    first = Lease.of(runs.claim_job(session, job.id, "w1", 30))  # type: ignore[arg-type]
    assert runs.retry_job(session, first, "rank_killed", "rank 1 was killed by SIGKILL") == "queued"
    second = Lease.of(runs.claim_job(session, job.id, "w2", 30))  # type: ignore[arg-type]
    assert runs.retry_job(session, second, "disk_full", "rank 0: disk full") == "failed"
    row = jobs.get_job(session, "alice", job.id)
    assert row.status == "failed" and row.error_code == "disk_full"
    assert "disk full" in (row.error_message or "") and "attempt 2 of 2" in (
        row.error_message or ""
    )
    messages = [e.message for e in jobs.list_events(session, "alice", job.id)]
    assert any("SIGKILL" in m and "retrying from the last checkpoint" in m for m in messages)


def test_release_after_a_cancel_request_ends_cancelled(
    session: Session, make_job: Callable[..., Any]
) -> None:
    """Found by the interleaving property test: claim, cancel, drain-release used to requeue the
    job with its cancel flag set, where no worker would ever claim it again."""
    job = make_job()
    lease = Lease.of(runs.claim_job(session, job.id, "w1", 30))  # type: ignore[arg-type]
    jobs.cancel_job(session, "alice", job.id)
    assert runs.release_job(session, lease, 3)
    row = jobs.get_job(session, "alice", job.id)
    assert (row.status, row.worker_id) == ("cancelled", "w1")
    assert row.finished_at is not None
