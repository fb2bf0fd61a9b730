"""``transition`` is the only writer of ``Job.status``: checked moves, one winner, no lost job.

The property tests drive jobs through random interleavings of what the real actors do (workers
claiming, finishing and draining; a user cancelling; reapers requeueing), each actor on its own
database session, and checks after every operation that the status moved only along
``shared.states.ALLOWED`` and that the job is never stranded (a queued job is claimable, a
running one has an owner and a lease the reaper can expire). The gang test does the same for
multi-node jobs: seats joined, moved, given back and lapsed, gangs started, failed, drained,
cancelled and reaped.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from shared.db import session_factory
from shared.models import GangMember, Job, JobEvent, Worker, utcnow
from shared.routing import Capacity
from shared.services import fleet, gangs, jobs, runs
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


# ------------------------------------------------------------------ gangs
GANG_OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "claim",
                "race",
                "poll",
                "switch",
                "leave",
                "finish",
                "retry",
                "cancel",
                "die",
                "release",
            ]
        ),
        st.sampled_from(WORKERS),
        st.integers(0, 1),
    ),
    min_size=1,
    max_size=16,
)
OFFER = gangs.NodeOffer(host="127.0.0.1", port=29500, gpus=0, cpu_procs=1)


class GangWorld:
    """Three workers, two gang jobs (2 and 3 nodes), each actor on its own session; a worker
    holds at most one thing at a time, as a real one does: a waiting seat or a running lease."""

    def __init__(self, owner: str, job_ids: list[str]) -> None:
        self.owner = owner
        self.job_ids = job_ids
        self.sessions = {w: session_factory()() for w in WORKERS}
        self.observer = session_factory()()
        self.seat: dict[str, gangs.Seat] = {}
        self.lease: dict[str, runs.Lease] = {}

    def close(self) -> None:
        self.observer.close()
        for own in self.sessions.values():
            own.close()

    def free(self, worker: str) -> bool:
        return worker not in self.seat and worker not in self.lease

    def poll(self, worker: str) -> None:
        seat = self.seat.get(worker)
        if seat is None:
            return
        state = gangs.poll(self.sessions[worker], seat, 30)
        if isinstance(state, gangs.GangPlan):
            del self.seat[worker]
            self.lease[worker] = runs.Lease(seat.job_id, worker, seat.epoch, seat.slot)
        elif state != gangs.FORMING:
            gangs.leave(self.sessions[worker], seat)
            del self.seat[worker]

    def apply(self, op: str, worker: str, which: int) -> None:
        own = self.sessions[worker]
        seat, lease = self.seat.get(worker), self.lease.get(worker)
        if op == "claim" and self.free(worker):
            got = runs.claim_next(own, worker, Capacity(), 30, offer=OFFER)
            if isinstance(got, gangs.Seat):
                self.seat[worker] = got
        elif op == "race" and self.free(worker):
            # Two workers that claimed at the same moment each saw no forming gang and started
            # one: a seat in whichever job, regardless of the order.
            got = gangs.join(own, self.job_ids[which], worker, OFFER, 30)
            if got is not None:
                self.seat[worker] = got
        elif op == "poll":
            self.poll(worker)
        elif op == "switch" and seat is not None:  # worker.gang.GangWait's move, step by step
            ahead = gangs.earlier_forming(own, seat, Capacity())
            if ahead and gangs.leave(own, seat):
                del self.seat[worker]
                for job_id in [*ahead, seat.job_id]:
                    moved = gangs.join(own, job_id, worker, OFFER, 30)
                    if moved is not None:
                        self.seat[worker] = moved
                        break
        elif op == "leave" and seat is not None:  # gave up waiting
            if gangs.leave(own, seat):
                del self.seat[worker]
            else:
                self.poll(worker)
        elif op == "finish" and lease is not None:
            if lease.leads:
                runs.finish_job(own, lease, "succeeded", trained_tokens=1)
            gangs.end_run(own, lease.job_id, lease.epoch, worker)
            del self.lease[worker]
        elif op == "retry" and lease is not None:  # a member's ranks failed (infrastructure)
            runs.retry_job(own, lease, "collective_failed", "peer lost")
            gangs.end_run(own, lease.job_id, lease.epoch, worker)
            del self.lease[worker]
        elif op == "release" and lease is not None:  # drained
            runs.release_job(own, lease, None)
            gangs.end_run(own, lease.job_id, lease.epoch, worker)
            del self.lease[worker]
        elif op == "cancel":
            try:
                jobs.cancel_job(own, self.owner, self.job_ids[which])
            except Exception as exc:  # a final job refuses: that is the contract
                assert "already" in str(exc)
        elif op == "die":  # SIGKILL or SIGSTOP: its seat stops being renewed and runs out
            own.execute(
                update(GangMember)
                .where(GangMember.worker_id == worker, GangMember.left_at.is_(None))
                .values(lease_expires_at=utcnow() - timedelta(seconds=1))
            )
            own.commit()
            runs.reap_expired(own)
            gangs.purge_forming(own)
            self.seat.pop(worker, None)
            self.lease.pop(worker, None)

    def check(self, previous: dict[str, JobStatus], op: str) -> dict[str, JobStatus]:
        obs = self.observer
        rows = {j: obs.get(Job, j, populate_existing=True) for j in self.job_ids}
        seats = list(obs.scalars(select(GangMember).execution_options(populate_existing=True)))
        obs.rollback()
        now = {}
        held: dict[str, list[str]] = {}
        for job_id, row in rows.items():
            assert row is not None, "the job vanished"
            status = JobStatus(row.status)
            assert status == previous[job_id] or status in ALLOWED[previous[job_id]], (op, status)
            mine = [s for s in seats if s.job_id == job_id]
            if status == RUNNING:
                gang = [s for s in mine if s.epoch == row.lease_epoch]
                assert sorted(s.slot for s in gang) == list(range(row.nodes)), (op, gang)
                assert len({s.worker_id for s in gang}) == row.nodes, "a worker in two slots"
                slot0 = next(s for s in gang if s.slot == 0)
                assert row.worker_id == slot0.worker_id and row.lease_expires_at is not None
                live = [s for s in gang if s.left_at is None]
            else:
                live = [s for s in mine if s.epoch == row.lease_epoch + 1 and status == QUEUED]
            if status == QUEUED:
                assert row.worker_id is None and not row.cancel_requested, "queued but stuck"
                assert len(live) < row.nodes, "a full gang that did not start"
            if status in FINAL:
                assert row.finished_at is not None and row.lease_expires_at is None
            for s in live:
                held.setdefault(s.worker_id, []).append(job_id)
            now[job_id] = status
        for worker, in_jobs in held.items():
            assert len(in_jobs) == 1, f"{worker} sits in the gangs of {in_jobs} ({op})"
        return now

    def settle(self) -> None:
        """Every worker keeps doing what a real one does (poll, move earlier, claim): the gang
        that can form must form; two half-filled gangs never hold the workers."""
        for _ in range(3):
            for worker in WORKERS:
                self.poll(worker)
                self.apply("switch", worker, 0)
                self.apply("claim", worker, 0)
            for worker in WORKERS:
                self.poll(worker)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=GANG_OPS)
# Every worker seated, neither gang full: the state the order rule exists for.
@example(ops=[("race", "w1", 0), ("race", "w0", 1), ("race", "w2", 1)])
def test_gang_join_leave_reap_interleavings(
    session: Session, make_job: Callable[..., Any], ops: list[tuple[str, str, int]]
) -> None:
    """Seats taken, moved, given back, lapsed; gangs started, failed, drained, cancelled, reaped,
    in any order: each job moves only along ALLOWED, a running job has exactly its N members
    (slot 0 its worker), a queued one fewer than N seats, no worker sits in two gangs, and once
    the workers settle, a gang that the free workers can fill is running (no deadlock)."""
    # Hypothesis reuses the database between examples: earlier examples' jobs must not
    # attract this example's workers.
    session.execute(
        update(Job).where(Job.status.in_(["queued", "running"])).values(status="failed")
    )
    session.execute(delete(GangMember))
    for worker in WORKERS:
        if session.get(Worker, worker) is None:
            fleet.register_worker(session, worker, "host")
    session.execute(update(Worker).values(last_heartbeat=utcnow(), status="idle"))
    session.commit()
    owner = f"gang-{secrets.token_hex(4)}"
    job_ids = [
        make_job(owner=owner, resources={"nodes": 2}).id,
        make_job(owner=owner, resources={"nodes": 3}).id,
    ]
    world = GangWorld(owner, job_ids)
    try:
        previous = {j: QUEUED for j in job_ids}
        for op, worker, which in ops:
            world.apply(op, worker, which)
            previous = world.check(previous, op)
        world.settle()
        previous = world.check(previous, "settle")
        free = [w for w in WORKERS if w not in world.lease]
        rows = [world.observer.get(Job, j, populate_existing=True) for j in job_ids]
        world.observer.rollback()
        waiting = [r for r in rows if r is not None and r.status == QUEUED.value]
        if waiting and not any(r is not None and r.status == RUNNING.value for r in rows):
            assert min(r.nodes for r in waiting) > len(free), ("deadlock", ops)
    finally:
        world.close()
