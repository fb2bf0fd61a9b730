"""Multi-node jobs: the body's ``resources.nodes``, the fleet checks, and gang membership in the
database (join, leave, start, fencing, reaping, the no-deadlock order)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.errors import InvalidInput
from shared.models import GangMember, Job, JobEvent, Worker, utcnow
from shared.routing import Capacity, node_ranks, requirements, split_over_nodes
from shared.services import fleet, gangs, runs
from shared.services.gangs import FORMING, GangPlan, NodeOffer, Seat
from shared.services.runs import Lease, LeaseLost
from shared.spec import JobSpec, Resources
from shared.storage import Storage

CPU = Capacity(gpus=0)
GPU8 = Capacity(gpus=8, gpu_type="NVIDIA H100", gpu_memory_bytes=80 * 1024**3)


def _spec(**resources: Any) -> JobSpec:
    return JobSpec.model_validate(
        {"base_model": "tiny", "training_file": "f", "resources": resources}
    )


def _offer(port: int = 29500) -> NodeOffer:
    return NodeOffer(host="127.0.0.1", port=port, gpus=0, cpu_procs=1)


def _register(session: Session, *workers: str, cap: Capacity = CPU) -> None:
    for wid in workers:
        fleet.register_worker(
            session, wid, "host", cap.gpus, cap.gpu_type, cap.gpu_memory_bytes, max(cap.gpus, 1)
        )


# ------------------------------------------------------------------ the job body
def test_resources_nodes_validation_names_the_field() -> None:
    assert _spec().resources.nodes == 1 and _spec().resources.node_gpus == 0
    assert _spec(nodes=2, gpus=16).resources.node_gpus == 8
    assert _spec(nodes=2, gpus_per_node=4).resources.node_gpus == 4
    assert _spec(nodes=3, gpus=12, gpus_per_node=4).resources.node_gpus == 4
    for bad, words in [
        ({"nodes": 0}, "nodes"),
        ({"nodes": 65}, "nodes"),
        ({"nodes": 2, "gpus": 3}, "cannot be split evenly over resources.nodes 2"),
        ({"nodes": 2, "gpus": 8, "gpus_per_node": 2}, "must equal resources.nodes 2 x"),
        ({"gpus": 0, "gpus_per_node": 2}, "contradicts resources.gpus_per_node"),
        ({"gpus_per_node": 0}, "gpus_per_node"),
    ]:
        with pytest.raises(ValidationError) as exc:
            _spec(**bad)
        assert words in str(exc.value), (bad, str(exc.value))


def test_routing_per_node() -> None:
    assert requirements(_spec(nodes=2, gpus=16, gpu_type="h100")) == (8, "h100")
    assert requirements(_spec(nodes=2)) == (0, None)  # any worker, each with all it has
    assert node_ranks(Resources(nodes=2), gpus=0, cpu_procs=3) == 3
    assert node_ranks(Resources(nodes=2, gpus_per_node=2), gpus=8, cpu_procs=1) == 2
    assert node_ranks(Resources(nodes=2), gpus=4, cpu_procs=1) == 4
    # A count larger than any one worker: the fewest equal nodes that fit.
    fleet8 = [GPU8, GPU8, CPU]
    split = split_over_nodes(_spec(gpus=16), fleet8).resources
    assert (split.nodes, split.gpus_per_node, split.gpus) == (2, 8, 16)
    split = split_over_nodes(_spec(gpus=12), fleet8).resources
    assert (split.nodes, split.gpus_per_node) == (2, 6)
    assert split_over_nodes(_spec(gpus=8), fleet8).resources.nodes == 1
    assert split_over_nodes(_spec(gpus=16, nodes=4), fleet8).resources.gpus_per_node is None
    assert split_over_nodes(_spec(gpus=16), [CPU]).resources.nodes == 1  # nothing to split over


# ------------------------------------------------------------------ submit and estimate
def test_submit_refuses_a_gang_larger_than_the_fleet_but_queues_for_busy_workers(
    session: Session, make_job: Callable[..., Any]
) -> None:
    make_job(resources={"nodes": 3})  # no worker ever registered: accepted, queued
    _register(session, "a", "b")
    with pytest.raises(InvalidInput) as exc:
        make_job(resources={"nodes": 3})
    assert exc.value.param == "resources.nodes" and exc.value.code == "not_enough_workers"
    assert "needs 3 workers at once" in exc.value.message
    assert "only 2 registered worker(s)" in exc.value.message
    # Both workers busy with other jobs: the gang waits for them.
    session.execute(update(Worker).values(status="busy", current_job="ftjob-other"))
    session.commit()
    job = make_job(resources={"nodes": 2})
    assert (job.status, job.nodes, job.gpus_required) == ("queued", 2, 0)
    # GPU nodes: each node needs gpus_per_node.
    _register(session, "g1", "g2", cap=GPU8)
    with pytest.raises(InvalidInput) as exc:
        make_job(resources={"nodes": 2, "gpus_per_node": 16})
    assert "16 GPUs requested but the largest worker has 8" in exc.value.message
    # gpus 16 on 8-GPU workers: split into two nodes, stored in the job.
    split = make_job(resources={"gpus": 16})
    assert (split.nodes, split.gpus_required) == (2, 8)
    assert split.resources["nodes"] == 2 and split.resources["gpus_per_node"] == 8
    with pytest.raises(InvalidInput) as exc:
        make_job(resources={"gpus": 24})
    assert exc.value.param == "resources.gpus"
    assert "24 GPUs requested but the largest worker has 8; split into 3 nodes" in (
        exc.value.message
    )


def test_estimate_counts_nodes(
    session: Session, settings: Settings, storage: Storage, make_file: Callable[..., Any]
) -> None:
    record = make_file()
    _register(session, "a", "b")
    spec = _spec(nodes=2).model_copy(update={"training_file": record.id})
    answer = fleet.estimate_job(session, storage, "alice", spec, record.id, settings)
    assert answer["fleet"]["nodes"] == 2 and answer["world_size"] == 2
    three = _spec(nodes=3).model_copy(update={"training_file": record.id})
    answer = fleet.estimate_job(session, storage, "alice", three, None, settings)
    assert answer["fits"] is False and "needs 3 workers at once" in answer["reason"]


# ------------------------------------------------------------------ membership
def _job(session: Session, job_id: str) -> Job:
    row = session.get(Job, job_id, populate_existing=True)
    session.rollback()
    assert row is not None
    return row


def _join(session: Session, job_id: str, worker: str, port: int = 29500) -> Seat | None:
    return gangs.join(session, job_id, worker, _offer(port), 30)


def test_gang_starts_only_when_full_and_slot_zero_hosts_the_rendezvous(
    session: Session, make_job: Callable[..., Any]
) -> None:
    _register(session, "a", "b", "c")
    job = make_job(resources={"nodes": 3})
    first = _join(session, job.id, "a", 1111)
    assert first is not None and (first.slot, first.epoch, first.nodes) == (0, 1, 3)
    assert gangs.poll(session, first, 30) == FORMING
    second = _join(session, job.id, "b", 2222)
    assert second is not None and second.slot == 1
    assert _job(session, job.id).status == "queued"
    assert _join(session, job.id, "b") is not None  # the same worker twice: still one seat
    assert gangs.workers_of(session, [_job(session, job.id)]) == {job.id: ["a", "b"]}
    third = _join(session, job.id, "c", 3333)
    assert third is not None and third.slot == 2
    row = _job(session, job.id)
    assert (row.status, row.attempts, row.lease_epoch, row.worker_id) == ("running", 1, 1, "a")
    assert _join(session, job.id, "d") is None  # full and running
    plan = gangs.poll(session, third, 30)
    assert isinstance(plan, GangPlan)
    assert (plan.master_addr, plan.master_port, plan.world_size) == ("127.0.0.1", 1111, 3)
    assert (plan.rank_offset, plan.run_id, plan.attempt) == (2, f"{job.id}-1", 1)
    assert plan.workers == ("a", "b", "c")
    events = session.scalars(select(JobEvent.message).where(JobEvent.job_id == job.id)).all()
    assert any(m.startswith("gang of 3 workers formed") for m in events), events


def test_leave_while_forming_never_after_start(
    session: Session, make_job: Callable[..., Any]
) -> None:
    _register(session, "a", "b")
    job = make_job(resources={"nodes": 2})
    a = _join(session, job.id, "a")
    assert a is not None and gangs.leave(session, a)
    assert gangs.poll(session, a, 30) is None  # the seat is gone
    b = _join(session, job.id, "b")
    assert b is not None and b.slot == 0  # slot 0 was free again
    a = _join(session, job.id, "a")
    assert a is not None and _job(session, job.id).status == "running"
    assert not gangs.leave(session, a)  # started with this seat: it must run
    assert isinstance(gangs.poll(session, a, 30), GangPlan)


def test_no_gang_starts_on_a_fleet_too_small_for_it(
    session: Session, make_job: Callable[..., Any]
) -> None:
    _register(session, "a", "b")
    job = make_job(resources={"nodes": 2})
    session.execute(
        update(Worker).where(Worker.id == "b").values(last_heartbeat=utcnow() - timedelta(hours=1))
    )
    session.commit()
    assert _join(session, job.id, "a") is None  # b is gone: a would wait for nothing


def test_concurrent_joins_fill_each_slot_once(
    session: Session, make_job: Callable[..., Any]
) -> None:
    import threading

    from shared.db import session_factory

    _register(session, *[f"w{i}" for i in range(5)])
    job = make_job(resources={"nodes": 2})
    barrier = threading.Barrier(5)
    seats: list[Seat] = []

    def join(worker: str) -> None:
        with session_factory()() as own:
            barrier.wait()
            for _ in range(3):  # SQLite may answer "locked" under contention: try again
                try:
                    seat = _join(own, job.id, worker)
                    break
                except Exception:
                    own.rollback()
            else:
                return
            if seat is not None:
                seats.append(seat)

    threads = [threading.Thread(target=join, args=(f"w{i}",)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    row = _job(session, job.id)
    assert (row.status, row.attempts) == ("running", 1)
    assert sorted(s.slot for s in seats) == [0, 1]
    members = session.scalars(select(GangMember).where(GangMember.job_id == job.id)).all()
    assert sorted(m.slot for m in members) == [0, 1]


def _started(session: Session, job_id: str, *workers: str) -> list[Lease]:
    for worker in workers:
        assert _join(session, job_id, worker) is not None
    row = _job(session, job_id)
    assert row.status == "running"
    return [Lease(job_id, w, row.lease_epoch, slot) for slot, w in enumerate(workers)]


def test_member_leases_fence_and_the_reaper_requeues_the_whole_gang(
    session: Session, make_job: Callable[..., Any]
) -> None:
    _register(session, "a", "b")
    job = make_job(resources={"nodes": 2})
    lead, member = _started(session, job.id, "a", "b")
    outsider = Lease(job.id, "c", lead.epoch, 1)
    assert runs.renew_lease(session, lead, 30) and runs.renew_lease(session, member, 30)
    assert not runs.renew_lease(session, outsider, 30)
    runs.add_event(session, member, "info", "node 1 says hello")  # a member may write events
    with pytest.raises(LeaseLost):
        runs.add_event(session, outsider, "info", "not a member")
    # Node 1's worker stops renewing (killed or frozen): its seat runs out.
    session.execute(
        update(GangMember)
        .where(GangMember.job_id == job.id, GangMember.worker_id == "b")
        .values(lease_expires_at=utcnow() - timedelta(seconds=1))
    )
    session.commit()
    assert runs.reap_expired(session) == [(job.id, "queued")]
    row = _job(session, job.id)
    assert (row.status, row.worker_id, row.attempts) == ("queued", None, 1)
    message = session.scalars(
        select(JobEvent.message).where(JobEvent.job_id == job.id).order_by(JobEvent.id.desc())
    ).first()
    assert message is not None and message.startswith("gang member lost (b)"), message
    # Every member is fenced, node 0 included, although its own lease was fine.
    for lease in (lead, member):
        assert not runs.renew_lease(session, lease, 30)
        with pytest.raises(LeaseLost):
            runs.record_progress(session, lease, {"step": 9})
    # A new gang forms at the next epoch and resumes.
    lead2, _ = _started(session, job.id, "b", "a")
    assert (lead2.epoch, _job(session, job.id).attempts, _job(session, job.id).worker_id) == (
        2,
        2,
        "b",
    )
    assert gangs.workers_of(session, [_job(session, job.id)]) == {job.id: ["b", "a"]}


def test_a_member_whose_run_ended_is_not_reaped(
    session: Session, make_job: Callable[..., Any]
) -> None:
    _register(session, "a", "b")
    job = make_job(resources={"nodes": 2})
    lead, member = _started(session, job.id, "a", "b")
    gangs.end_run(session, job.id, member.epoch, "b")  # node 1 finished; node 0 uploads
    session.execute(
        update(GangMember)
        .where(GangMember.worker_id == "b")
        .values(lease_expires_at=utcnow() - timedelta(seconds=1))
    )
    session.commit()
    assert runs.reap_expired(session) == []
    assert runs.finish_job(session, lead, "succeeded", trained_tokens=1)
    assert gangs.workers_of(session, [_job(session, job.id)]) == {job.id: ["a", "b"]}


def test_a_dead_waiting_seat_is_forgotten(session: Session, make_job: Callable[..., Any]) -> None:
    _register(session, "a", "b", "c")
    job = make_job(resources={"nodes": 2})
    dead = _join(session, job.id, "a")
    assert dead is not None
    session.execute(update(GangMember).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    session.commit()
    assert gangs.purge_forming(session) == 1
    assert gangs.poll(session, dead, 30) is None  # thawed too late: its seat is gone
    b = _join(session, job.id, "b")
    assert b is not None and b.slot == 0
    assert _job(session, job.id).status == "queued"


def test_oldest_gang_fills_first_no_deadlock(
    session: Session, make_job: Callable[..., Any]
) -> None:
    """Two 2-node jobs, two workers that each started a different gang: the member of the later
    gang sees the earlier one forming and moves there; a third worker would have joined it."""
    _register(session, "a", "b", "c")
    older = make_job(resources={"nodes": 2})
    younger = make_job(resources={"nodes": 2})
    in_older = _join(session, older.id, "a")
    in_younger = _join(session, younger.id, "b")
    assert in_older is not None and in_younger is not None
    assert gangs.earlier_forming(session, in_older, CPU) == []
    assert gangs.earlier_forming(session, in_younger, CPU) == [older.id]
    # A free worker about to start a gang joins the earliest forming one instead.
    seat = runs.claim_next(session, "c", CPU, 30, preferred_job_id=younger.id, offer=_offer())
    assert isinstance(seat, Seat) and seat.job_id == older.id
    assert _job(session, older.id).status == "running"


def test_claim_next_joins_gangs_only_with_an_offer_and_skips_given_up_ones(
    session: Session, make_job: Callable[..., Any]
) -> None:
    _register(session, "a", "b")
    gang = make_job(resources={"nodes": 2})
    single = make_job()
    # A caller that cannot host ranks for a gang (no offer) is given the 1-node job.
    got = runs.claim_next(session, "a", CPU, 30)
    assert isinstance(got, Job) and got.id == single.id
    runs.finish_job(session, Lease.of(got), "succeeded", trained_tokens=1)
    other = make_job()
    seat = runs.claim_next(session, "a", CPU, 30, offer=_offer())
    assert isinstance(seat, Seat) and seat.job_id == gang.id
    assert gangs.leave(session, seat)
    # Having given up on the gang, the worker takes the job behind it (backfill).
    got = runs.claim_next(session, "a", CPU, 30, offer=_offer(), skip={gang.id})
    assert isinstance(got, Job) and got.id == other.id
