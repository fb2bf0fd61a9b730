"""A worker waiting in a forming gang (worker/gang.py) against the real database: it runs the
gang once full, moves to an earlier forming gang, gives its seat back in time or when draining."""

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
from shared.services import gangs
from shared.services.gangs import GangPlan, NodeOffer, Seat
from worker import fleet
from worker.gang import GangWait

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
