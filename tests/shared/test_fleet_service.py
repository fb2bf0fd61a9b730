"""Routing and the fleet checks: claim_next's fit and order, refusals at submit, the estimate."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.db import session_factory
from shared.errors import InvalidInput
from shared.models import Job, Worker, utcnow
from shared.routing import Capacity
from shared.services import fleet, runs
from shared.states import WorkerStatus
from shared.storage import Storage

CPU = Capacity(gpus=0)
A100x2 = Capacity(gpus=2, gpu_type="NVIDIA A100-SXM4-80GB", gpu_memory_bytes=80 * 1024**3)


def _register(session: Session, wid: str, cap: Capacity) -> None:
    fleet.register_worker(
        session, wid, "host", cap.gpus, cap.gpu_type, cap.gpu_memory_bytes, max(cap.gpus, 1)
    )


def test_claim_next_routes_by_gpus_and_type(session: Session, make_job: Callable[..., Any]) -> None:
    any_job = make_job(resources={"gpus": "all"})
    two = make_job(resources={"gpus": 2})
    h100 = make_job(resources={"gpus": 1, "gpu_type": "h100"})
    a100 = make_job(resources={"gpus": 1, "gpu_type": "a100"})

    # A CPU worker takes only the "all"/0 job, then nothing.
    got = runs.claim_next(session, "cpu", CPU, 30)
    assert got is not None and got.id == any_job.id
    assert runs.claim_next(session, "cpu", CPU, 30) is None
    # The A100 worker: case-insensitive substring; never the H100 job.
    taken = {runs.claim_next(session, "gpu", A100x2, 30).id for _ in range(2)}  # type: ignore[union-attr]
    assert taken == {two.id, a100.id}
    assert runs.claim_next(session, "gpu", A100x2, 30) is None
    assert runs.claim_next(session, "h", Capacity(1, "NVIDIA H100 80GB HBM3"), 30).id == h100.id  # type: ignore[union-attr]


def test_claim_next_order_priority_fairness_age(
    session: Session, make_job: Callable[..., Any]
) -> None:
    first_alice = make_job(owner="alice")
    second_alice = make_job(owner="alice")
    bob = make_job(owner="bob")
    urgent = make_job(owner="alice", priority=5)
    order = []
    for i in range(4):
        job = runs.claim_next(session, f"w{i}", CPU, 30, preferred_job_id=bob.id)
        assert job is not None
        order.append(job.id)
    # Priority first; then bob (no job running) before alice (one running); then age.
    assert order == [urgent.id, bob.id, first_alice.id, second_alice.id]


def test_claim_next_skips_cancelled_and_races_have_one_winner_each(
    session: Session, make_job: Callable[..., Any]
) -> None:
    cancelled = make_job()
    session.execute(update(Job).where(Job.id == cancelled.id).values(cancel_requested=True))
    session.commit()
    jobs = {make_job().id for _ in range(3)}
    barrier = threading.Barrier(5)
    won: list[str] = []

    def worker(name: str) -> None:
        with session_factory()() as own:
            barrier.wait()
            job = runs.claim_next(own, name, CPU, 30)
            if job is not None:
                won.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Five workers, three jobs: each job claimed exactly once, the losers moved on or got None.
    assert sorted(won) == sorted(jobs)


def test_submit_refuses_what_no_worker_can_run(
    session: Session, make_job: Callable[..., Any]
) -> None:
    make_job(resources={"gpus": 8, "gpu_type": "H100"})  # no worker ever registered: queued
    _register(session, "cpu-1", CPU)
    with pytest.raises(InvalidInput) as exc:
        make_job(resources={"gpus": 1})
    assert exc.value.param == "resources.gpus"
    assert "1 GPUs requested but the largest worker has 0" in exc.value.message
    with pytest.raises(InvalidInput) as exc:
        make_job(resources={"gpu_type": "H100"})
    assert exc.value.param == "resources.gpu_type" and "CPU workers only" in exc.value.message
    _register(session, "gpu-1", A100x2)
    with pytest.raises(InvalidInput) as exc:
        make_job(resources={"gpus": 8})
    assert "8 GPUs requested but the largest worker has 2" in exc.value.message
    assert make_job(resources={"gpus": 2, "gpu_type": "a100"}).gpus_required == 2
    # Dead workers stop counting once another worker is alive.
    session.execute(
        update(Worker)
        .where(Worker.id == "gpu-1")
        .values(last_heartbeat=utcnow() - timedelta(hours=1))
    )
    session.commit()
    with pytest.raises(InvalidInput):
        make_job(resources={"gpus": 2})


def test_submit_checks_target_modules_and_memory(
    session: Session, make_job: Callable[..., Any]
) -> None:
    with pytest.raises(InvalidInput) as exc:
        make_job(lora={"target_modules": ["c_attn"]})
    assert exc.value.param == "lora.target_modules"
    assert "q_proj" in exc.value.message and "c_attn" in exc.value.message
    _register(session, "tiny-gpu", Capacity(1, "T4", 300 * 1024**2))  # below the CUDA context
    with pytest.raises(InvalidInput) as exc:
        make_job(resources={"gpus": 1})
    assert "fits on no worker's GPU" in exc.value.message


def test_estimate_reads_file_and_fleet(
    session: Session, settings: Settings, storage: Storage, make_file: Callable[..., Any]
) -> None:
    from shared.spec import JobSpec

    record = make_file()
    spec = JobSpec.model_validate({"base_model": "tiny", "training_file": record.id})
    answer = fleet.estimate_job(session, storage, "alice", spec, record.id, settings)
    assert answer["parameters"]["trainable"] == 8 * (16 + 16) + 8 * (16 + 4)
    assert answer["fits"] is None and answer["dataset"]["rows"] == record.rows
    assert answer["dataset"]["tokens"] > 0
    _register(session, "gpu-1", A100x2)
    answer = fleet.estimate_job(session, storage, "alice", spec, None, settings)
    assert answer["fits"] is True and answer["world_size"] == 2
    assert answer["fleet"]["gpu_memory_bytes"] == A100x2.gpu_memory_bytes
    with pytest.raises(InvalidInput):
        fleet.estimate_job(session, storage, "bob", spec, record.id, settings)


def test_worker_registry(session: Session, settings: Settings) -> None:
    fleet.register_worker(session, "celery@a", "a", gpus=2, gpu_type="H100", procs=2)
    assert fleet.heartbeat_worker(session, "celery@a", WorkerStatus.BUSY, "ftjob-x")
    assert not fleet.heartbeat_worker(session, "celery@nope")
    ((worker, status),) = fleet.list_workers(session, settings)
    assert (status, worker.current_job, worker.gpus) == (WorkerStatus.BUSY, "ftjob-x", 2)
    assert worker.last_heartbeat.tzinfo is not None
    fleet.mark_worker_offline(session, "celery@a")
    assert fleet.list_workers(session, settings)[0][1] == WorkerStatus.OFFLINE
    fleet.heartbeat_worker(session, "celery@a", WorkerStatus.IDLE)
    assert fleet.mark_stale_workers_offline(session, 0) == ["celery@a"]
    with pytest.raises(ValueError):
        fleet.heartbeat_worker(session, "celery@a", "napping")  # type: ignore[arg-type]


def test_a_gpu_belongs_to_one_live_worker(session: Session, settings: Settings) -> None:
    """No GPU on this machine: the UUID lists are given to the service function directly (what
    worker.gpus.gpu_uuids would read from torch/NVML on a GPU host)."""
    fleet.register_worker(session, "w1@a", "a", gpus=2, gpu_uuids=["GPU-aaa", "GPU-bbb"])
    with pytest.raises(fleet.DeviceTaken) as refused:
        fleet.register_worker(session, "w2@a", "a", gpus=1, gpu_uuids=["GPU-bbb"])
    message = str(refused.value)
    assert "GPU-bbb" in message and "w1@a" in message and "CUDA_VISIBLE_DEVICES" in message
    assert session.get(Worker, "w2@a") is None
    fleet.register_worker(session, "w2@a", "a", gpus=1, gpu_uuids=["GPU-ccc"])  # its own: fine
    fleet.register_worker(session, "w1@a", "a", gpus=2, gpu_uuids=["GPU-aaa", "GPU-bbb"])  # again
    fleet.mark_worker_offline(session, "w1@a")  # a dead worker's devices are free again
    fleet.register_worker(session, "w3@a", "a", gpus=1, gpu_uuids=["GPU-bbb"])
