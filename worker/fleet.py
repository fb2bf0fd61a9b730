"""What every worker does besides training: register itself, heartbeat, and reap dead jobs.

Why the reaper lives in every worker (not Celery beat, not the API): it needs no extra process to
deploy, it keeps running as long as any worker can take the requeued job (a reaper with no worker
alive would requeue into the void), and the conditional UPDATEs make concurrent reapers safe.
A job whose worker died is requeued after its lease expires; a queued job whose broker message
was lost (Redis flushed or restarted without persistence) is re-published after a grace period.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import threading
from datetime import UTC, datetime, timedelta
from importlib import metadata

from shared.config import get_settings
from shared.db import session_scope
from shared.queueing import pending_job_ids, publish_job
from shared.routing import Capacity
from shared.services import fleet as fleet_service
from shared.services import gangs, runs, webhooks
from shared.services.fleet import DeviceTaken, stale_after
from shared.services.gangs import NodeOffer
from shared.states import WorkerStatus
from worker.gpus import gpu_stats, gpu_uuids
from worker.host_memory import host_memory_bytes

log = logging.getLogger("lorafleet.fleet")

_state_lock = threading.Lock()
_current_job: str | None = None
_worker_id: str | None = None
_capacity: Capacity | None = None
_uuids: list[str] = []
_stop = threading.Event()
draining = threading.Event()  # set on warm shutdown: checkpoint the current job and hand it back
_threads: list[threading.Thread] = []


def worker_id(hostname: str | None = None) -> str:
    """This worker's id: its Celery node name (unique per process, see `lorafleet worker`)."""
    global _worker_id
    if _worker_id is None:
        _worker_id = hostname or f"worker-{os.getpid()}@{socket.gethostname()}"
    return _worker_id


def set_current_job(job_id: str | None) -> None:
    global _current_job
    with _state_lock:
        _current_job = job_id
    _heartbeat_once()


def current_job() -> str | None:
    with _state_lock:
        return _current_job


def capacity() -> dict[str, object]:
    """GPUs (count, type, memory) or CPU processes this worker trains with."""
    settings = get_settings()
    gpus, gpu_type, gpu_memory = 0, None, None
    try:
        import torch

        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            props = torch.cuda.get_device_properties(0)
            gpu_type, gpu_memory = props.name, int(props.total_memory)
    except Exception:  # a worker without torch cannot train anyway; report no GPUs
        log.exception("GPU detection failed")
    return {
        "gpus": gpus,
        "gpu_type": settings.worker_gpu_type or gpu_type,
        "gpu_memory_bytes": gpu_memory,
        "procs": gpus or settings.worker_procs,
    }


def routing_capacity() -> Capacity:
    """What this worker offers the claim query (detected once: torch.cuda is slow to ask)."""
    global _capacity
    if _capacity is None:
        info = capacity()
        _capacity = Capacity(
            gpus=int(info["gpus"]),  # type: ignore[call-overload]
            gpu_type=info["gpu_type"],  # type: ignore[arg-type]
            gpu_memory_bytes=info["gpu_memory_bytes"],  # type: ignore[arg-type]
        )
    return _capacity


def _version() -> str:
    try:
        return metadata.version("lorafleet")
    except metadata.PackageNotFoundError:
        return "unknown"


def _heartbeat_once() -> None:
    if _worker_id is None:
        return
    job = current_job()
    stats = gpu_stats(_uuids)
    try:
        with session_scope() as session:
            status = (
                WorkerStatus.DRAINING
                if draining.is_set()
                else (WorkerStatus.BUSY if job else WorkerStatus.IDLE)
            )
            fleet_service.heartbeat_worker(session, _worker_id, status, job, stats)
    except Exception:
        log.exception("worker heartbeat failed")


def reap_once() -> None:
    """Mark silent workers offline, requeue jobs of dead workers, re-publish lost messages."""
    settings = get_settings()
    now = datetime.now(UTC)
    with session_scope() as session:
        gone = fleet_service.mark_stale_workers_offline(session, stale_after(settings))
    for wid in gone:
        log.warning("worker %s sent no heartbeat for %.0f s: offline", wid, stale_after(settings))
    with session_scope() as session:
        changed = runs.reap_expired(session, now)
    with session_scope() as session:
        gangs.purge_forming(session, now)  # seats of workers that died waiting for a gang
    for job_id, status in changed:
        log.warning("job %s lost its worker: now %s", job_id, status)
        if status == "queued":
            wake(job_id)
        else:  # failed (out of attempts) or cancelled: final without a worker to announce it
            webhooks.notify_final(job_id)
    with session_scope() as session:
        stale = runs.stale_queued(session, now - timedelta(seconds=settings.requeue_grace_seconds))
        republish = [(job.id, job.queue, job.nodes) for job in stale]
    if republish:
        queues = tuple({queue for _, queue, _ in republish})
        pending = pending_job_ids(settings, queues)
        if pending is not None:
            republish = [r for r in republish if r[0] not in pending]
    for job_id, queue, nodes in republish:
        log.info("re-publishing queued job %s", job_id)
        publish_job(job_id, queue, tokens=nodes)


def wake(job_id: str) -> None:
    """Publish a queued job's wake-up tokens: one per node (each of a gang's workers needs one)."""
    from shared.models import Job

    with session_scope() as session:
        job = session.get(Job, job_id)
        queue, nodes = (job.queue, job.nodes) if job is not None else ("lorafleet", 1)
    publish_job(job_id, queue, tokens=nodes)


def node_offer() -> NodeOffer:
    """What this worker brings to a gang: its address, a rendezvous port, its ranks."""
    from worker.training.launch import free_port

    settings = get_settings()
    offer = routing_capacity()
    return NodeOffer(
        host=worker_address(),
        port=settings.rendezvous_port or free_port(""),
        gpus=offer.gpus,
        cpu_procs=settings.worker_procs,
    )


def worker_address() -> str:
    """How the other workers of a gang reach this one: ``LORAFLEET_WORKER_ADDRESS``, else the
    address this host's name resolves to (what other hosts usually resolve it to as well)."""
    configured = get_settings().worker_address
    if configured:
        return configured
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _loop(interval: float, action: object) -> None:
    while not _stop.wait(interval):
        try:
            action()  # type: ignore[operator]
        except Exception:
            log.exception("background task failed")


def start_background(hostname: str) -> None:
    """Register this worker and start the heartbeat and reaper threads (idempotent)."""
    settings = get_settings()
    wid = worker_id(hostname)
    offer = routing_capacity()
    _uuids[:] = gpu_uuids()
    try:
        _register(wid, offer, settings.worker_procs)
    except DeviceTaken as exc:
        # Two workers on one GPU would each assume all of its memory: refuse to start.
        log.critical("refusing to start: %s", exc)
        logging.shutdown()
        os._exit(78)  # EX_CONFIG
    if _threads:
        return
    _stop.clear()
    try:
        reap_once()
    except Exception:
        log.exception("initial reap failed")
    period = max(0.5, min(settings.lease_seconds / 3, 10.0))
    for target in (_heartbeat_once, reap_once):
        thread = threading.Thread(target=_loop, args=(period, target), daemon=True)
        thread.start()
        _threads.append(thread)


def _register(wid: str, offer: Capacity, cpu_procs: int) -> None:
    with session_scope() as session:
        fleet_service.register_worker(
            session,
            wid,
            hostname=platform.node(),
            gpus=offer.gpus,
            gpu_type=offer.gpu_type,
            gpu_memory_bytes=offer.gpu_memory_bytes,
            procs=offer.gpus or cpu_procs,
            version=_version(),
            gpu_uuids=_uuids,
            host_memory_bytes=host_memory_bytes(),  # submit checks CPU jobs against it
        )


def stop_background() -> None:
    _stop.set()
    if _worker_id is not None:
        try:
            with session_scope() as session:
                fleet_service.mark_worker_offline(session, _worker_id)
        except Exception:
            log.exception("could not mark worker offline")
