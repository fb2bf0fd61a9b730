"""A gang member's worker side against the real database (no training needed): waiting in a
forming gang (worker/gang.py: runs it once full, moves to an earlier forming gang, gives its seat
back in time or when draining), and how a node other than 0 ends when its ranks fail."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.db import session_factory
from shared.services import fleet as fleet_service
from shared.services import gangs, jobs, runs
from shared.services.gangs import GangPlan, NodeOffer, Seat
from shared.services.runs import Lease
from worker import fleet
from worker.gang import GangWait
from worker.job_runner import JobRunner
from worker.training.run import Outcome, RunResult

OFFER = NodeOffer(host="127.0.0.1", port=29500, gpus=0, cpu_procs=1)


@pytest.fixture
def workers(session: Session) -> Iterator[None]:
    for wid in ("a", "b", "c"):
        fleet_service.register_worker(session, wid, "host")
    yield
    fleet.draining.clear()


def _seat(session: Session, job_id: str, worker: str) -> Seat:
    seat = gangs.join(session, job_id, worker, OFFER, 30)
    assert seat is not None
    return seat


def _wait(seat: Seat, settings: Settings, seconds: float = 20.0) -> GangWait:
    quick = settings.model_copy(update={"gang_wait_seconds": seconds})
    return GangWait(seat, OFFER, quick, poll_seconds=0.1)


def test_runs_once_the_gang_fills(
    session: Session, settings: Settings, workers: None, make_job: Callable[..., Any]
) -> None:
    job = make_job(resources={"nodes": 2})
    wait = _wait(_seat(session, job.id, "a"), settings)

    def second() -> None:
        time.sleep(0.5)
        with session_factory()() as own:
            _seat(own, job.id, "b")

    joiner = threading.Thread(target=second)
    joiner.start()
    plan = wait.run()
    joiner.join()
    assert isinstance(plan, GangPlan) and plan.workers == ("a", "b") and plan.slot == 0
    assert not wait.gave_up


def test_gives_the_seat_back_in_time(
    session: Session, settings: Settings, workers: None, make_job: Callable[..., Any]
) -> None:
    job = make_job(resources={"nodes": 2})
    seat = _seat(session, job.id, "a")
    started = time.monotonic()
    wait = _wait(seat, settings, seconds=0.6)
    assert wait.run() is None
    assert 0.6 <= time.monotonic() - started < 10
    assert wait.gave_up == {job.id}
    assert gangs.workers_of(session, [job]) == {job.id: []}  # the seat is free again


def test_moves_to_the_earlier_forming_gang(
    session: Session, settings: Settings, workers: None, make_job: Callable[..., Any]
) -> None:
    older = make_job(resources={"nodes": 2})
    younger = make_job(resources={"nodes": 2})
    _seat(session, older.id, "b")
    wait = _wait(_seat(session, younger.id, "a"), settings)
    plan = wait.run()
    assert isinstance(plan, GangPlan) and plan.job_id == older.id
    assert set(plan.workers) == {"a", "b"}
    assert gangs.workers_of(session, [younger]) == {younger.id: []}


def test_a_draining_worker_gives_its_seat_back(
    session: Session, settings: Settings, workers: None, make_job: Callable[..., Any]
) -> None:
    job = make_job(resources={"nodes": 2})
    wait = _wait(_seat(session, job.id, "a"), settings)
    fleet.draining.set()
    assert wait.run() is None and not wait.gave_up
    assert gangs.workers_of(session, [job]) == {job.id: []}


def _running(session: Session, make_job: Callable[..., Any]) -> tuple[Any, GangPlan]:
    job = make_job(resources={"nodes": 2})
    _seat(session, job.id, "a")
    seat = _seat(session, job.id, "b")
    plan = gangs.poll(session, seat, 30)
    assert isinstance(plan, GangPlan) and plan.slot == 1
    return job, plan


def _member(settings: Settings, plan: GangPlan) -> JobRunner:
    quick = settings.model_copy(update={"lease_seconds": 1.0})
    runner = JobRunner(Lease(plan.job_id, "b", plan.epoch, plan.slot), 1, quick, gang=plan)
    runner.work.mkdir(parents=True, exist_ok=True)
    runner.keeper.start()
    return runner


FAILED = RunResult(Outcome.FAILED, exit_code=1)


def test_a_failed_member_leaves_the_outcome_to_node_0(
    session: Session, settings: Settings, workers: None, make_job: Callable[..., Any]
) -> None:
    job, plan = _running(session, make_job)
    runner = _member(settings, plan)
    node0 = Lease(job.id, "a", plan.epoch, 0)

    def node0_decides() -> None:
        time.sleep(0.3)
        with session_factory()() as own:
            assert runs.retry_job(own, node0, "collective_failed", "peer lost") == "queued"

    deciding = threading.Thread(target=node0_decides)
    deciding.start()
    try:
        assert runner._conclude_member(FAILED) == "member failed"
    finally:
        deciding.join()
        runner.keeper.stop()
    messages = [e.message for e in jobs.list_events(session, "alice", job.id)]
    assert any(m.startswith("node 1 (b) failed: ") for m in messages), messages
    assert sum("retrying from the last checkpoint" in m for m in messages) == 1


def test_a_failed_member_requeues_when_node_0_does_not(
    session: Session, settings: Settings, workers: None, make_job: Callable[..., Any]
) -> None:
    """Node 0's ranks may wait at the rendezvous for a rank that died before joining it: the
    member whose rank died requeues the gang after a lease instead of leaving it hanging."""
    job, plan = _running(session, make_job)
    runner = _member(settings, plan)
    started = time.monotonic()
    try:
        assert runner._conclude_member(FAILED) == "retrying"
    finally:
        runner.keeper.stop()
    assert 1.0 <= time.monotonic() - started < 10
    row = jobs.get_job(session, "alice", job.id)
    assert (row.status, row.attempts) == ("queued", 1)
